"""Kill the real vLLM server mid-request and bring it back (integration, CPU, ~1-2 min).

The test starts its own vLLM OpenAI server on the embedded model (not the shared session
fixture: it kills it) and ``ufcal serve`` on it. It checks that

- vLLM's server aborts a request whose client disconnects (what a ufcal deadline does);
- when vLLM is SIGKILLed with requests in flight, every one of them answers 503 (or 200
  if it finished first; 429 if admission refused it up front) within the deadline,
  /readyz turns 503 and ufcal_engine_up 0;
- after vLLM restarts on the same port, ufcal recovers by itself (no restart): /readyz
  200, ufcal_engine_up 1, /score 200, and how long that took.

The figures are printed (run with -s) and written to ``engine_kill.json`` in the test's
temp dir; docs/reliability.md quotes them."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import START_TIMEOUT_S, load_questions
from tests.servers import EMBEDDED_NAME, ServerProcess, free_port_in, ufcal_server, vllm_server

pytestmark = pytest.mark.integration

DEADLINE_S = 20.0
RETRY_S = 3.0


def _vllm_on(port: int, model_dir: Path, log_dir: Path, name: str) -> ServerProcess:
    server = vllm_server(model_dir, log_dir)
    argv = list(server.argv)
    argv[argv.index("--port") + 1] = str(port)
    return ServerProcess(name, argv, server.env, port, log_dir)


def _metric(base_url: str, name: str) -> float | None:
    for line in httpx.get(base_url + "/metrics", timeout=5).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def _vllm_aborts_on_disconnect(vllm: ServerProcess) -> float:
    """Start a long generation directly on vLLM, drop the connection, and time until vLLM
    has no request running any more."""
    body = {
        "model": EMBEDDED_NAME,
        "prompt": "Tell a very long story.",
        "max_tokens": 2000,
        "ignore_eos": True,
    }
    dropped = threading.Event()

    def long_request() -> None:
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(vllm.base_url + "/v1/completions", json=body, timeout=1.5)
        dropped.set()  # the client timed out and closed its connection

    thread = threading.Thread(target=long_request, daemon=True)
    thread.start()
    time.sleep(1.0)
    assert (_metric(vllm.base_url, "vllm:num_requests_running") or 0) >= 1, "not running"
    dropped.wait(10)
    gone = time.monotonic()
    while time.monotonic() - gone < 10:
        if (_metric(vllm.base_url, "vllm:num_requests_running") or 0) == 0:
            return time.monotonic() - gone
        time.sleep(0.1)
    raise AssertionError("vLLM kept generating after the client disconnected")


def test_vllm_killed_mid_request_then_restarted(
    model_dir: Path, tmp_path: Path, server_logs: Path
) -> None:
    port = free_port_in(8500, 8600)
    vllm = _vllm_on(port, model_dir, server_logs, "vllm-kill").start()
    ufcal: ServerProcess | None = None
    figures: dict[str, Any] = {}
    try:
        vllm.wait_ready("/health", START_TIMEOUT_S)
        env = {
            "UFCAL_ENGINE_URL": vllm.base_url,
            "UFCAL_REQUEST_TIMEOUT_S": str(DEADLINE_S),
            "UFCAL_ENGINE_RETRY_S": str(RETRY_S),
            "UFCAL_HEALTH_INTERVAL_S": "0.5",
        }
        ufcal = ufcal_server(server_logs, "ufcal-kill", env).start()
        ufcal.wait_ready("/readyz", START_TIMEOUT_S)
        rows = load_questions("arc_challenge_test.jsonl", 8)
        bodies = [
            {"question": r["question"], "options": r["options"], "mode": "sampling", "samples": 16}
            for r in rows
        ]
        client = httpx.Client(base_url=ufcal.base_url, timeout=60)
        cold = time.monotonic()
        assert client.post("/score", json=bodies[0]).status_code == 200
        figures["first_score_after_cold_start_s"] = round(time.monotonic() - cold, 2)
        assert _metric(ufcal.base_url, "ufcal_engine_up") == 1.0

        figures["vllm_abort_after_disconnect_s"] = round(_vllm_aborts_on_disconnect(vllm), 2)

        # Kill vLLM with eight questions in flight.
        def timed(body: dict[str, Any]) -> tuple[int, float]:
            started = time.monotonic()
            status = client.post("/score", json=body).status_code
            return status, time.monotonic() - started

        with ThreadPoolExecutor(len(bodies)) as pool:
            futures = [pool.submit(timed, b) for b in bodies]
            time.sleep(0.5)
            assert vllm.process is not None
            os.killpg(vllm.process.pid, signal.SIGKILL)
            killed_at = time.monotonic()
            vllm.process.wait(10)
            outcomes = [f.result() for f in futures]
        codes = [code for code, _ in outcomes]
        figures["in_flight_at_kill"] = {
            "requests": len(codes),
            "by_status": {str(c): codes.count(c) for c in sorted(set(codes))},
            "slowest_answer_s": round(max(t for _, t in outcomes), 2),
        }
        # 429: admission refused it before it reached the engine (predicted past its
        # deadline on the rate measured so far); it was never in flight.
        assert set(codes) <= {200, 429, 503}, codes
        assert 503 in codes
        assert max(t for _, t in outcomes) < DEADLINE_S  # no hang, no 504

        time.sleep(1.0)  # the watchdog probes every 0.5 s
        asked = time.monotonic()
        down = client.post("/score", json=bodies[0])
        down_latency = time.monotonic() - asked
        assert down.status_code == 503
        assert down_latency < 1.0  # known down: fails fast, no retry budget spent
        assert down.headers["retry-after"]
        ready_down = client.get("/readyz")
        assert ready_down.status_code == 503
        assert _metric(ufcal.base_url, "ufcal_engine_up") == 0.0
        figures["while_down"] = {
            "score": down.status_code,
            "score_latency_s": round(down_latency, 3),
            "readyz": ready_down.status_code,
        }

        # Bring vLLM back on the same port; ufcal must notice by itself.
        restarted_at = time.monotonic()
        vllm = _vllm_on(port, model_dir, server_logs, "vllm-kill-restarted").start()
        vllm.wait_ready("/health", START_TIMEOUT_S)
        vllm_ready_at = time.monotonic()
        while time.monotonic() - vllm_ready_at < 30:
            if client.get("/readyz").status_code == 200:
                break
            time.sleep(0.1)
        readyz_back_at = time.monotonic()
        logprobs = {**bodies[1], "mode": "logprobs"}  # one quick read + chains
        recovered = client.post("/score", json=logprobs)
        scored_at = time.monotonic()
        assert recovered.status_code == 200, recovered.text
        warm = time.monotonic()
        assert client.post("/score", json=logprobs).status_code == 200
        figures["same_score_again_warm_s"] = round(time.monotonic() - warm, 2)
        assert client.get("/readyz").status_code == 200
        time.sleep(1.0)
        assert _metric(ufcal.base_url, "ufcal_engine_up") == 1.0
        assert ufcal.process is not None
        assert ufcal.process.poll() is None  # never restarted
        figures["recovery"] = {
            "vllm_restart_s": round(vllm_ready_at - restarted_at, 1),
            "ufcal_ready_after_vllm_s": round(readyz_back_at - vllm_ready_at, 2),
            "first_200_after_vllm_s": round(scored_at - vllm_ready_at, 2),
            "outage_total_s": round(scored_at - killed_at, 1),
        }
        client.close()
    finally:
        if ufcal is not None:
            ufcal.stop()
        vllm.stop()
        (tmp_path / "engine_kill.json").write_text(json.dumps(figures, indent=2))
        print("\nengine kill figures:", json.dumps(figures))


def test_in_process_engine_death_answers_503_and_exits_non_zero(
    model_dir: Path, tmp_path: Path, server_logs: Path
) -> None:
    """``ufcal serve`` with the in-process engine: SIGKILL vLLM's engine-core process with
    questions in flight. They get 503, and the service exits 3 for the orchestrator to
    restart it (an AsyncLLM cannot be revived in the same process)."""
    import psutil

    env = {
        "UFCAL_HEALTH_INTERVAL_S": "0.5",
        "UFCAL_REQUEST_TIMEOUT_S": str(DEADLINE_S),
        "UFCAL_SHUTDOWN_GRACE_S": "10",
    }
    ufcal = ufcal_server(server_logs, "ufcal-local-kill", env)
    ufcal.port = free_port_in(8500, 8600)
    ufcal.base_url = f"http://127.0.0.1:{ufcal.port}"
    ufcal.argv[ufcal.argv.index("--port") + 1] = str(ufcal.port)
    ufcal.start()
    figures: dict[str, Any] = {}
    try:
        ufcal.wait_ready("/readyz", START_TIMEOUT_S)
        assert ufcal.process is not None
        rows = load_questions("arc_challenge_test.jsonl", 4)
        bodies = [
            {"question": r["question"], "options": r["options"], "mode": "sampling", "samples": 16}
            for r in rows
        ]
        client = httpx.Client(base_url=ufcal.base_url, timeout=60)
        assert client.post("/score", json=bodies[0]).status_code == 200
        children = psutil.Process(ufcal.process.pid).children(recursive=True)
        cores = [c for c in children if "EngineCore" in " ".join(c.cmdline()) + c.name()]
        assert cores, [(c.pid, c.name()) for c in children]

        def timed(body: dict[str, Any]) -> tuple[int | str, float]:
            started = time.monotonic()
            try:
                status: int | str = client.post("/score", json=body).status_code
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            return status, time.monotonic() - started

        with ThreadPoolExecutor(len(bodies)) as pool:
            futures = [pool.submit(timed, b) for b in bodies]
            time.sleep(0.5)
            for core in cores:
                core.kill()
            killed_at = time.monotonic()
            outcomes = [f.result() for f in futures]
        exit_code = ufcal.process.wait(60)
        exited_after = time.monotonic() - killed_at
        client.close()
        codes = [c for c, _ in outcomes]
        figures = {
            "in_flight_at_kill": dict(Counter(str(c) for c in codes)),
            "slowest_answer_s": round(max(t for _, t in outcomes), 2),
            "exit_code": exit_code,
            "exited_after_kill_s": round(exited_after, 1),
        }
        # 429: admission refused it before it reached the engine (predicted past its
        # deadline on the rate measured so far); it was never in flight.
        assert set(codes) <= {200, 429, 503}, codes
        assert 503 in codes
        assert exit_code == 3
        assert exited_after < 10
    finally:
        ufcal.stop()
        (tmp_path / "in_process_kill.json").write_text(json.dumps(figures, indent=2))
        print("\nin-process engine kill figures:", json.dumps(figures))
