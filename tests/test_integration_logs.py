"""Logs a shipper can read, and a CLI whose stdout is only data, with the real in-process
vLLM engine on the embedded SmolLM2 (its engine-core and worker processes included).

- ``ufcal serve``: start, score, send a bad request, stop. Every line that Python wrote is
  one JSON object with ufcal's fields; the few others are the documented native lines.
- ``ufcal score --file``: stdout holds one JSON result per question and nothing else."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import CORRECTNESS_ENV, START_TIMEOUT_S, load_questions
from tests.servers import ROOT, cpu_env, running, ufcal_server

pytestmark = pytest.mark.integration

FIELDS = {"timestamp", "level", "logger", "message"}
#: Lines no Python logging configuration reaches, as documented in the README's Logs section:
#: torch's C++ warnings (c10 format ``[W1129 15:23:37.383 utils.cpp:68] Warning: ...``).
NATIVE = re.compile(r"^\[[WEIF]\d{4} \d\d:\d\d:\d\d\.\d+ .*\] ")
MAX_NATIVE = 5


def _split(text: str) -> tuple[list[dict[str, Any]], list[str]]:
    """(JSON log objects, other lines) of a process's output."""
    logged: list[dict[str, Any]] = []
    other: list[str] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError:
            other.append(line)
            continue
        assert isinstance(obj, dict) and obj.keys() >= FIELDS, line
        logged.append(obj)
    return logged, other


def _only_native(other: list[str]) -> None:
    """The lines that are not JSON are the documented few."""
    native = [line for line in other if NATIVE.search(line)]
    # Anything else, e.g. multiprocessing's resource tracker warning at exit, is Python's.
    unexpected = [line for line in other if line not in native]
    assert unexpected == [], "\n".join(unexpected)
    assert len(native) <= MAX_NATIVE, "\n".join(native)


def test_every_python_line_of_a_serve_session_is_json(server_logs: Path) -> None:
    env = {**CORRECTNESS_ENV, "UFCAL_DB_PATH": str(server_logs / "ufcal-logs.db")}
    server = ufcal_server(server_logs, "ufcal-json-logs", env)
    question = load_questions("arc_challenge_test.jsonl", 1)[0]
    with running(server, "/readyz", START_TIMEOUT_S):
        body = {"id": "logs-1", "question": question["question"], "options": question["options"]}
        scored = httpx.post(server.base_url + "/score", json=body, timeout=600)
        assert scored.status_code == 200, scored.text
        bad = httpx.post(server.base_url + "/score", json={"question": "q", "options": ["a"]})
        assert bad.status_code == 422
    assert server.process is not None and server.process.returncode == 0

    logged, other = _split(server.log_path.read_text(encoding="utf-8", errors="replace"))
    print(f"{len(logged)} JSON lines, {len(other)} others: {other}")
    _only_native(other)
    loggers = {line["logger"] for line in logged}
    processes = {line.get("process") for line in logged}
    assert {"EngineCore", "Worker"} <= processes  # vLLM's subprocesses log JSON too
    assert any(name.startswith("vllm.") for name in loggers)
    assert any(line["message"] == "scored" and line["id"] == "logs-1" for line in logged)
    assert any("422" in line["message"] for line in logged if line["logger"] == "uvicorn.access")
    assert any(line["logger"] == "uvicorn.error" for line in logged)  # start-up and shutdown


def test_score_writes_only_json_results_to_stdout(tmp_path: Path) -> None:
    questions = load_questions("arc_challenge_test.jsonl", 3)
    path = tmp_path / "q.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in questions), encoding="utf-8")
    env = {**os.environ, **cpu_env(), "UFCAL_DB_PATH": str(tmp_path / "db.sqlite")}
    env.pop("UFCAL_ENGINE_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "score", "--file", str(path)],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines()]
    assert [row["id"] for row in rows] == [str(q["id"]) for q in questions]
    assert all("confidence" in row and "correct" in row for row in rows)
    logged, other = _split(done.stderr)  # the engine's lines went to stderr, as JSON
    assert any(line.get("process") == "EngineCore" for line in logged)
    _only_native(other)
