"""Real servers, no vLLM: ``ufcal serve`` on the fake engine (``tests/fake_app.py``) in a
subprocess, scraped by a real Prometheus (Debian's ``prometheus``) and restarted, also with
``kill -9``, over the same SQLite file.

Prometheus missing: skipped with a loud reason, or failed when UFCAL_REQUIRE_DEPLOY_TOOLS=1
(as CI sets; ``make tools`` installs it).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.servers import ServerProcess, free_port_in, missing_tool

UFCAL_PORTS = range(8400, 8500)
PROMETHEUS_PORTS = range(9090, 9100)
START_TIMEOUT_S = 60.0


def fake_ufcal(log_dir: Path, name: str, db: Path, **env: str) -> ServerProcess:
    """``ufcal serve`` with the fake engine on a port of 8400-8499."""
    port = free_port_in(UFCAL_PORTS.start, UFCAL_PORTS.stop)
    argv = [sys.executable, "-m", "tests.fake_app", "--port", str(port)]
    settings = {"UFCAL_DB_PATH": str(db), "UFCAL_LOG_LEVEL": "info", **env}
    return ServerProcess(name, argv, settings, port, log_dir)


@contextlib.contextmanager
def running(server: ServerProcess) -> Iterator[ServerProcess]:
    server.start()
    try:
        server.wait_ready("/readyz", START_TIMEOUT_S)
        yield server
    finally:
        server.stop()


def kill9(server: ServerProcess) -> None:
    """SIGKILL the server's process group: no shutdown, no checkpoint, no flush."""
    assert server.process is not None
    os.killpg(server.process.pid, signal.SIGKILL)
    server.process.wait(10)


def score(client: httpx.Client, qid: str, p: float) -> dict[str, Any]:
    body = {"id": qid, "question": f"Which? p={p}", "options": ["yes", "no", "maybe"]}
    r = client.post("/score", json=body)
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def wait_for(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll ``check`` until it returns something truthy."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            last = check()
            if last:
                return last
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}; last: {last!r}")


@pytest.fixture(scope="module")
def prometheus_bin() -> str:
    path = shutil.which("prometheus")
    if path is None:
        msg = (
            "\n!!! prometheus IS NOT INSTALLED: live Prometheus test SKIPPED.\n"
            "!!! CI installs it (make tools); locally run: apt-get install -y prometheus"
        )
        missing_tool(msg)
    assert path is not None
    return path


def prometheus_server(binary: str, target: str, workdir: Path) -> ServerProcess:
    """A Prometheus scraping ``target`` (host:port) every second, on a port of 9090-9099."""
    port = free_port_in(PROMETHEUS_PORTS.start, PROMETHEUS_PORTS.stop)
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "ufcal",
                "metrics_path": "/metrics",
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "static_configs": [{"targets": [target]}],
            }
        ],
    }
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    argv = [
        binary,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={workdir / 'tsdb'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    return ServerProcess("prometheus", argv, {}, port, workdir)


def promql(base_url: str, query: str) -> list[dict[str, Any]]:
    """The instant vector of ``query`` from Prometheus's HTTP API."""
    r = httpx.get(f"{base_url}/api/v1/query", params={"query": query}, timeout=5.0)
    r.raise_for_status()
    body = r.json()
    assert body["status"] == "success", body
    assert body["data"]["resultType"] == "vector"
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


RETURNED = 'ufcal_live_{}{{confidence="returned", task="multiple_choice"}}'
RAW = 'ufcal_live_{}{{confidence="raw", task="multiple_choice"}}'


def scalar(base_url: str, query: str) -> float | None:
    """The value of a one-series query, or None while it has no series."""
    result = promql(base_url, query)
    if not result:
        return None
    assert len(result) == 1, result
    return float(result[0]["value"][1])


# ---------------------------------------------------------------- Prometheus


def test_prometheus_scrapes_requests_and_live_calibration(
    prometheus_bin: str, tmp_path: Path
) -> None:
    calls, correct = [0.9, 0.8, 0.7, 0.95, 0.6], [True, False, True, True, False]
    with running(fake_ufcal(tmp_path, "ufcal", tmp_path / "u.db")) as ufcal:
        prom = prometheus_server(prometheus_bin, f"127.0.0.1:{ufcal.port}", tmp_path)
        with running_prometheus(prom) as prom_url, httpx.Client(base_url=ufcal.base_url) as c:
            wait_for(
                lambda: scalar(prom_url, 'up{job="ufcal"}') == 1.0, 30, "the first ufcal scrape"
            )
            for i, p in enumerate(calls):
                score(c, f"p{i}", p)
            bad = c.post("/score", json={"question": "q", "options": ["only one"]})
            assert bad.status_code == 422
            for i, right in enumerate(correct):
                r = c.post("/feedback", json={"id": f"p{i}", "correct": right})
                assert r.status_code == 201
            calibration = c.get("/calibration").json()

            query = 'sum(ufcal_requests_total{job="ufcal", status="200"})'
            wait_for(lambda: scalar(prom_url, query) == len(calls), 30, query)
            series = promql(prom_url, 'ufcal_requests_total{status="200"}')
            assert [s["metric"]["method"] for s in series] == ["uf"]
            assert series[0]["metric"]["mode"] == "logprobs"
            assert series[0]["metric"]["instance"] == f"127.0.0.1:{ufcal.port}"

            wait_for(
                lambda: scalar(prom_url, RETURNED.format("window_size")) == len(correct),
                30,
                "ufcal_live_window_size after feedback",
            )
            for name in ("ece", "accuracy", "brier", "ipr", "ce"):
                got = scalar(prom_url, RETURNED.format(name))
                assert got == pytest.approx(calibration[name], abs=1e-9), name
                raw = scalar(
                    prom_url, f'ufcal_live_{name}{{confidence="raw", task="multiple_choice"}}'
                )
                assert raw == pytest.approx(calibration["raw"][name], abs=1e-9), name
            feedback = {
                s["metric"]["outcome"]: float(s["value"][1])
                for s in promql(prom_url, "ufcal_feedback_total")
            }
            assert feedback == {"correct": 3.0, "wrong": 2.0}
            bins = {
                s["metric"]["bin"]: float(s["value"][1])
                for s in promql(prom_url, RETURNED.format("bin_count"))
            }
            assert sum(bins.values()) == len(correct)
            assert len(bins) == calibration["n_bins"]


@contextlib.contextmanager
def running_prometheus(prom: ServerProcess) -> Iterator[str]:
    prom.start()
    try:
        prom.wait_ready("/-/ready", START_TIMEOUT_S)
        yield prom.base_url
    finally:
        prom.stop()


# ---------------------------------------------------------------- restarts


def test_feedback_survives_restart(tmp_path: Path) -> None:
    db = tmp_path / "u.db"
    server = fake_ufcal(tmp_path, "ufcal-restart", db)
    with running(server), httpx.Client(base_url=server.base_url) as c:
        for i, (p, right) in enumerate([(0.9, True), (0.7, False), (0.99, True), (0.6, True)]):
            score(c, f"s{i}", p)
            assert c.post("/feedback", json={"id": f"s{i}", "correct": right}).status_code == 201
        score(c, "open", 0.8)
        before = c.get("/calibration").json()
    assert "Application shutdown complete" in server.tail(), "a graceful stop (SIGTERM)"

    with running(server), httpx.Client(base_url=server.base_url) as c:
        after = c.get("/calibration").json()
        metrics = c.get("/metrics").text
        again = c.post("/feedback", json={"id": "s0", "correct": False})
        late = c.post("/feedback", json={"id": "open", "gold_index": 0})
    assert after == before and after["n"] == 4
    assert again.status_code == 409
    assert late.status_code == 201 and late.json()["window_size"] == 5
    assert 'ufcal_live_window_size{confidence="returned",task="multiple_choice"} 4.0' in metrics


def test_acknowledged_feedback_survives_kill_9(tmp_path: Path) -> None:
    """Feedback answered 2xx is on disk: SIGKILL right after the reply loses none of it."""
    db = tmp_path / "u.db"
    server = fake_ufcal(tmp_path, "ufcal-kill", db)
    acknowledged = []
    with running(server), httpx.Client(base_url=server.base_url) as c:
        for i in range(30):
            score(c, f"k{i}", 0.5 + i / 100)
        for i in range(30):
            r = c.post("/feedback", json={"id": f"k{i}", "correct": i % 2 == 0})
            assert r.status_code == 201
            acknowledged.append(f"k{i}")
        kill9(server)  # straight after the last 201, no graceful shutdown
        assert Path(f"{db}-wal").exists(), "the WAL was not checkpointed away"

    with running(server), httpx.Client(base_url=server.base_url) as c:
        cal = c.get("/calibration").json()
        replies = [c.post("/feedback", json={"id": i, "correct": True}) for i in acknowledged]
    assert cal["n"] == len(acknowledged)
    assert cal["accuracy"] == pytest.approx(0.5)
    assert {r.status_code for r in replies} == {409}
