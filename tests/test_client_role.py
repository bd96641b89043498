"""The remote-engine role of the slim ``client`` image: ``ufcal serve`` with
UFCAL_ENGINE_URL imports and serves without vLLM, torch or the model converter's libraries
(hidden by ``tests.no_engine_libs``)."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest

from tests.servers import ServerProcess, free_port, running

QUESTION = {"question": "2 + 2 = ?", "options": ["3", "4", "5", "22"]}


def client_role_server(log_dir: Path, name: str, engine_url: str) -> ServerProcess:
    port = free_port()
    argv = [sys.executable, "-m", "tests.no_engine_libs", "service.cli", "serve"]
    env = {
        "UFCAL_ENGINE_URL": engine_url,
        "UFCAL_DB_PATH": str(log_dir / f"{name}.db"),
        "UFCAL_ENGINE_RETRY_S": "0",
        "UFCAL_REQUEST_TIMEOUT_S": "600",  # a loaded CPU box, as for the other vLLM tests
    }
    return ServerProcess(name, [*argv, "--port", str(port)], env, port, log_dir)


def test_client_role_serves_without_engine_libraries(tmp_path: Path) -> None:
    """Engine unreachable: the app still starts, answers its probes and metrics, and
    refuses /score with a clear 503, all without importing vLLM or torch."""
    dead_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    server = client_role_server(tmp_path, "client-role", dead_url)
    with running(server, "/healthz", 60.0), httpx.Client(base_url=server.base_url) as client:
        assert client.get("/healthz").status_code == 200
        assert client.get("/readyz").status_code == 503
        metrics = client.get("/metrics").text
        assert "ufcal_engine_remote_servers 1.0" in metrics
        reply = client.post("/score", json=QUESTION)
        assert reply.status_code == 503, reply.text
        assert reply.json()["detail"]
    log = server.log_path.read_text()
    assert "(client image)" not in log, log[-3000:]


@pytest.mark.integration
def test_client_role_scores_with_real_vllm(vllm: ServerProcess, tmp_path: Path) -> None:
    """The real vLLM server behind UFCAL_ENGINE_URL: a calibrated answer, no engine
    libraries in the ufcal process."""
    server = client_role_server(tmp_path, "client-role-vllm", vllm.base_url)
    with (
        running(server, "/readyz", 120.0),
        httpx.Client(base_url=server.base_url, timeout=120) as client,
    ):
        reply = client.post("/score", json=QUESTION)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["answer"] and 0.0 <= body["confidence"] <= 1.0
    assert body["model"]
    assert "(client image)" not in server.log_path.read_text()
