"""``ufcal eval`` on the real engine: 5 ARC-Challenge questions x every method through a real
vLLM server serving the embedded SmolLM2 (UFCAL_ENGINE_URL). Checks the results JSONL, the
Markdown table, the report and that the reliability diagrams are written; then a rerun
resumes (nothing is scored twice)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from service.evaluation.results import read_rows, row_key
from service.scoring import METHODS
from tests.servers import EMBEDDED_NAME, ROOT, SHARED_DATA, ServerProcess

pytestmark = pytest.mark.integration

N = 5


def _eval(vllm: ServerProcess, tmp_path: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    argv = [
        sys.executable,
        "-m",
        "service.cli",
        "eval",
        "arc_challenge_test.jsonl",
        "--data-dir",
        str(SHARED_DATA),
        "--limit",
        str(N),
        "--out",
        str(tmp_path / "results.jsonl"),
        "--figures",
        str(tmp_path / "figures"),
        "--report",
        str(tmp_path / "results.md"),
        *extra,
    ]
    env = {**os.environ, "UFCAL_ENGINE_URL": vllm.base_url}
    return subprocess.run(
        argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )


def test_eval_every_method_on_real_arc_questions(vllm: ServerProcess, tmp_path: Path) -> None:
    if not (SHARED_DATA / "arc_challenge_test.jsonl").is_file():
        pytest.fail(f"evaluation data missing: {SHARED_DATA}")
    done = _eval(vllm, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "q/s" in done.stderr or "s/q" in done.stderr  # the progress bar (rate, ETA)

    rows = read_rows(tmp_path / "results.jsonl")
    assert len(rows) == N * len(METHODS)
    assert len({row_key(r) for r in rows}) == len(rows)
    modes = {r["method"]: r["mode"] for r in rows}
    assert modes["sampled"] == "sampling" and modes["token"] == "logprobs"
    assert modes["uf"] == "logprobs"  # auto on a vLLM server
    for row in rows:
        if "error" in row:
            assert row["method"] in ("verbalized", "linguistic")
            continue
        assert row["model"] == EMBEDDED_NAME
        assert 0.0 <= row["confidence"] <= 1.0
        assert row["correct"] == (row["answer"] == row["gold"])
    # The weak model states a parseable confidence for most questions.
    for method in ("verbalized", "linguistic"):
        parsed = [r for r in rows if r["method"] == method and "error" not in r]
        assert len(parsed) >= N - 1, [r.get("error") for r in rows if r["method"] == method]
    # Within one mode every method returns the same answer (they share step 1).
    by_id: dict[str, set[int]] = {}
    for row in rows:
        if row["mode"] == "logprobs" and "answer" in row:
            by_id.setdefault(row["id"], set()).add(row["answer"])
    assert all(len(answers) == 1 for answers in by_id.values())

    # stdout: the metrics table first, then the cross-fitted recalibration table.
    main_table, _, after = done.stdout.partition("Recalibrated (")
    table = [line for line in main_table.splitlines() if line.startswith("| arc_challenge")]
    assert [line.split("|")[2].strip() for line in table] == list(METHODS)
    recal = [line for line in after.splitlines() if line.startswith("| arc_challenge")]
    assert {line.split("|")[2].strip() for line in recal} <= set(METHODS)
    report = (tmp_path / "results.md").read_text()
    assert "ufcal eval arc_challenge_test.jsonl" in report and "wall time" in report
    pngs = sorted((tmp_path / "figures").glob("*.png"))
    assert len(pngs) == len(METHODS)
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in pngs)

    # A rerun resumes: everything is already there, nothing is written twice.
    again = _eval(vllm, tmp_path, "--no-progress")
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"{N} already done" in again.stderr
    assert len(read_rows(tmp_path / "results.jsonl")) == N * len(METHODS)
    assert json.loads((tmp_path / "results.jsonl").read_text().splitlines()[0])["dataset"]
