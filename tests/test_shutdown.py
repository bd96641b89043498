"""Graceful shutdown of a real ``ufcal serve`` process (over the slow fake engine): SIGTERM
stops accepting, lets in-flight requests finish within UFCAL_SHUTDOWN_GRACE_S, exits 0."""

from __future__ import annotations

import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.servers import fake_server, running
from tests.test_api import GOOD


def _score(base_url: str) -> int | str:
    try:
        return httpx.post(base_url + "/score", json=GOOD, timeout=30).status_code
    except httpx.HTTPError as exc:
        return type(exc).__name__


def test_sigterm_drains_in_flight_requests_then_exits_0(tmp_path: Path) -> None:
    server = fake_server(tmp_path, "drain", {"UFCAL_SHUTDOWN_GRACE_S": "20"}, delay=0.4)
    with running(server, "/readyz", 30), ThreadPoolExecutor(4) as pool:
        assert server.process is not None
        in_flight = [pool.submit(_score, server.base_url) for _ in range(3)]
        time.sleep(0.6)  # the three are being scored (6 engine calls x 0.4 s each)
        sent = time.monotonic()
        os.kill(server.process.pid, signal.SIGTERM)
        time.sleep(0.3)
        late = _score(server.base_url)  # the listener is closed: refused
        exit_code = server.process.wait(30)
        drained_s = time.monotonic() - sent
        results = [f.result() for f in in_flight]
    print(
        f"\nshutdown: in-flight {results}, new request {late}, exit {exit_code} "
        f"after {drained_s:.1f} s"
    )
    assert results == [200, 200, 200]
    assert late == "ConnectError"
    assert exit_code == 0
    assert drained_s < 10


def test_grace_period_bounds_the_drain(tmp_path: Path) -> None:
    """A request that cannot finish within the grace period does not hold the exit."""
    server = fake_server(tmp_path, "grace", {"UFCAL_SHUTDOWN_GRACE_S": "1"}, delay=5.0)
    with running(server, "/readyz", 30), ThreadPoolExecutor(1) as pool:
        assert server.process is not None
        stuck = pool.submit(_score, server.base_url)
        time.sleep(0.5)
        sent = time.monotonic()
        os.kill(server.process.pid, signal.SIGTERM)
        exit_code = server.process.wait(30)
        took = time.monotonic() - sent
        outcome = stuck.result()
    print(f"\ngrace: exit {exit_code} after {took:.1f} s; the stuck request got {outcome}")
    assert took < 5
    assert exit_code == 0
    assert outcome != 200
