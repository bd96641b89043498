"""Backpressure, deadlines and engine faults, without vLLM: the admission queue, 504 with
the engine work cancelled, 429 at once beyond the queue, the HTTP engine's retries and
health tracking, cancellation closing the engine connection, and the watchdog exiting
non-zero when an in-process engine dies."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from typing import Any

import httpx
import pytest

from service.api.admission import Admission, DeadlineExceeded, Overloaded
from service.calibration.prompts import Prompt
from service.engines.base import EngineUnavailable, GenerationParams
from service.engines.openai_http import OpenAIHTTPEngine
from tests.fakes import FakeEngine
from tests.servers import fake_server, running
from tests.test_api import GOOD, _settings, serve, white_box

PROMPT = Prompt(chat=False, system_prompt=None, user="Q", answer_prefix="Answer:")

# ---------------------------------------------------------------- the admission queue


async def test_admission_queues_then_refuses_at_once() -> None:
    admission = Admission(capacity=2, max_queue=1)
    release = asyncio.Event()
    order: list[int] = []

    async def hold(i: int) -> None:
        async with admission.slot():
            order.append(i)
            await release.wait()

    tasks = [asyncio.create_task(hold(i)) for i in range(3)]
    await asyncio.sleep(0.01)
    assert (admission.in_use, admission.queued) == (2, 1)
    started = time.perf_counter()
    with pytest.raises(Overloaded) as refused:
        async with admission.slot():
            pass
    assert time.perf_counter() - started < 0.01
    assert refused.value.retry_after_s >= 1
    assert admission.rejected == 1
    release.set()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2]
    assert (admission.in_use, admission.queued) == (0, 0)


async def test_cancelled_waiter_gives_its_place_back() -> None:
    admission = Admission(capacity=1, max_queue=1)
    release = asyncio.Event()

    async def hold() -> None:
        async with admission.slot():
            await release.wait()

    holder = asyncio.create_task(hold())
    waiter = asyncio.create_task(hold())
    await asyncio.sleep(0.01)
    assert admission.queued == 1
    waiter.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await waiter
    assert admission.queued == 0
    third = asyncio.create_task(hold())  # the freed place is usable
    await asyncio.sleep(0.01)
    assert admission.queued == 1
    release.set()
    await asyncio.gather(holder, third)
    assert (admission.in_use, admission.queued) == (0, 0)


async def test_batch_cost_is_capped_at_capacity() -> None:
    admission = Admission(capacity=4, max_queue=0)
    async with admission.slot(cost=100):
        assert admission.in_use == 4
        with pytest.raises(Overloaded):
            async with admission.slot(cost=1):
                pass
    assert admission.in_use == 0


async def test_run_deadline_cancels_the_work() -> None:
    admission = Admission(capacity=1, max_queue=0)
    cancelled = asyncio.Event()

    async def work() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    with pytest.raises(DeadlineExceeded):
        await admission.run(work, cost=1, timeout_s=0.05)
    assert cancelled.is_set()
    assert admission.in_use == 0


# ---------------------------------------------------------------- over HTTP (in-process)


async def test_deadline_is_504_and_cancels_engine_calls() -> None:
    engine = white_box(delay=5.0)
    async with serve(engine, _settings(request_timeout_s=0.3)) as client:
        started = time.perf_counter()
        r = await client.post("/score", json=GOOD)
        elapsed = time.perf_counter() - started
        metrics = (await client.get("/metrics")).text
    assert r.status_code == 504
    assert "UFCAL_REQUEST_TIMEOUT_S=0.3" in r.json()["detail"]
    assert elapsed < 1.5
    # The engine call was cancelled, not left running to completion (an asyncio.shield
    # around engine work in service/scoring.py would keep it running past the deadline).
    assert engine.in_flight == 0, "the deadline did not cancel the engine call"
    assert len(engine.calls) == 1
    assert 'ufcal_requests_total{method="uf",mode="auto",status="504"} 1.0' in metrics


async def test_beyond_the_queue_is_429_at_once_with_retry_after() -> None:
    engine = white_box(delay=0.2)
    async with serve(engine, _settings(max_concurrency=1, max_queue=1)) as client:
        # one request first, so that the engine's rate is measured (it does not change
        # what is queued here: the work ahead fits the deadline many times over)
        assert (await client.post("/score", json=GOOD)).status_code == 200

        async def timed() -> tuple[int, float, str | None]:
            started = time.perf_counter()
            r = await client.post("/score", json=GOOD)
            return r.status_code, time.perf_counter() - started, r.headers.get("retry-after")

        results = await asyncio.gather(*(timed() for _ in range(5)))
    codes = sorted(code for code, _, _ in results)
    assert codes == [200, 200, 429, 429, 429]
    for code, elapsed, retry_after in results:
        if code == 429:
            assert elapsed < 0.1
            assert retry_after is not None
            assert int(retry_after) >= 1
    assert engine.max_in_flight == 1


async def test_watchdog_marks_a_dead_engine_and_asks_to_exit() -> None:
    engine = white_box()
    asked: list[int] = []
    async with serve(engine, _settings(health_interval_s=0.05)) as client:
        client_app = client._transport.app  # type: ignore[attr-defined]
        client_app.state.request_shutdown = lambda: asked.append(client_app.state.ufcal.exit_code)
        assert (await client.post("/score", json=GOOD)).status_code == 200
        engine.dead = True  # type: ignore[attr-defined]
        await asyncio.sleep(0.3)
        score = await client.post("/score", json=GOOD)
        ready = await client.get("/readyz")
        metrics = (await client.get("/metrics")).text
    assert asked == [3]
    assert score.status_code == 503
    assert score.headers["retry-after"]
    assert ready.status_code == 503
    assert "ufcal_engine_up 0.0" in metrics


async def test_remote_engine_away_at_start_is_retried() -> None:
    class LateEngine(FakeEngine):
        retry_start = True
        attempts = 0

        async def start(self) -> None:
            self.attempts += 1
            if self.attempts < 3:
                raise EngineUnavailable("connection refused")
            await super().start()

    engine = LateEngine(letters=lambda p, labels: {labels[0]: 0.0})
    async with serve(engine, wait_ready=False) as client:
        assert (await client.get("/readyz")).status_code == 503
        for _ in range(60):
            if (await client.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.1)
        assert (await client.get("/readyz")).status_code == 200
    assert engine.attempts == 3


# ---------------------------------------------------------------- the HTTP engine


def _completion(_: httpx.Request) -> httpx.Response:
    return httpx.Response(
        200,
        json={"choices": [{"index": 0, "text": " A"}], "usage": {"prompt_tokens": 3}},
    )


def _engine(handler: Any, urls: list[str] | None = None, retry_s: float = 2.0) -> OpenAIHTTPEngine:
    engine = OpenAIHTTPEngine(urls or ["http://e1"], model="m", retry_s=retry_s, backoff_s=0.01)
    engine._client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    return engine


async def test_http_engine_retries_connection_errors_then_recovers() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if calls <= 3:
            raise httpx.ConnectError("connection refused", request=request)
        return _completion(request)

    engine = _engine(handler)
    out = await engine.generate([PROMPT], [GenerationParams()])
    assert out[0].texts == [" A"]
    assert engine.retries == 3
    assert engine.down == []  # marked up again by the success


@pytest.mark.parametrize(
    "failure",
    [
        lambda r: (_ for _ in ()).throw(httpx.ConnectError("refused", request=r)),
        lambda r: (_ for _ in ()).throw(httpx.RemoteProtocolError("disconnected", request=r)),
        lambda r: httpx.Response(503),
    ],
    ids=["connect", "dropped", "503"],
)
async def test_http_engine_gives_up_within_the_retry_budget(failure: Any) -> None:
    engine = _engine(failure, retry_s=0.3)
    started = time.perf_counter()
    with pytest.raises(EngineUnavailable):
        await engine.generate([PROMPT], [GenerationParams()])
    assert time.perf_counter() - started < 0.6
    assert engine.retries >= 2
    assert engine.down == ["http://e1"]


async def test_http_engine_skips_a_server_marked_down() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request.url.host)
        if request.url.host == "e1":
            raise httpx.ConnectError("refused", request=request)
        return _completion(request)

    engine = _engine(handler, urls=["http://e1", "http://e2"])
    for _ in range(4):
        await engine.generate([PROMPT], [GenerationParams()])
    assert seen.count("e1") == 1  # tried once, then skipped while down
    assert engine.down == ["http://e1"]


async def test_http_engine_does_not_retry_a_refusal() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(400, json={"error": {"message": "bad"}})

    with pytest.raises(Exception, match="refused the request"):
        await _engine(handler).generate([PROMPT], [GenerationParams()])
    assert calls == 1


async def test_cancelling_an_http_engine_call_closes_its_connection() -> None:
    """The request deadline cancels the httpx request: the engine sees the connection
    close (which is what makes vLLM's server abort the request)."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    closed = threading.Event()

    def accept() -> None:
        conn, _ = listener.accept()
        conn.settimeout(10)
        with conn, contextlib.suppress(OSError):
            while conn.recv(65536):  # read the request, never answer it
                pass
            closed.set()  # recv returned b"": the client closed the connection

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    engine = OpenAIHTTPEngine([f"http://127.0.0.1:{port}"], model="m")
    task = asyncio.create_task(engine.generate([PROMPT], [GenerationParams()]))
    await asyncio.sleep(0.3)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.to_thread(closed.wait, 5)
    assert closed.is_set()
    await engine.close()
    listener.close()


# ---------------------------------------------------------------- a real process


def test_dead_in_process_engine_answers_503_then_exits_non_zero(tmp_path: Any) -> None:
    """The fake engine 'dies' 3 s after start: requests in flight get 503, and the process
    drains and exits 3 so that the orchestrator restarts it."""
    env = {"UFCAL_HEALTH_INTERVAL_S": "0.2", "UFCAL_SHUTDOWN_GRACE_S": "5"}
    server = fake_server(tmp_path, "dying", env, delay=0.3, die_after=3.0)
    with running(server, "/readyz", 30):
        assert server.process is not None
        with httpx.Client(base_url=server.base_url, timeout=10) as client:
            codes: list[int] = []
            while server.process.poll() is None and len(codes) < 50:
                try:
                    codes.append(client.post("/score", json=GOOD).status_code)
                except httpx.TransportError:
                    break
        exit_code = server.process.wait(15)
    assert exit_code == 3
    assert 200 in codes
    assert 503 in codes
    assert set(codes) <= {200, 503}


async def test_http_engine_fails_fast_while_every_server_is_down() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        if request.url.path == "/health" or calls > 100:
            return httpx.Response(503)
        raise httpx.ConnectError("refused", request=request)

    engine = _engine(handler, retry_s=5.0)
    assert not await engine.ready()  # the probe marks the only server down
    calls = 0
    started = time.perf_counter()
    with pytest.raises(EngineUnavailable):
        await engine.generate([PROMPT], [GenerationParams()])
    assert time.perf_counter() - started < 0.5
    assert calls == 1
