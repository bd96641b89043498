"""Admission by work and by time (issue 13), without vLLM: the limiter's rules on a fake
clock, then the app over a fake engine with a fixed cost per prompt, 4-option requests at a
steady rate with and without a flood of 26-option requests."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import string
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from service.api.admission import Admission, DeadlineUnreachable, Overloaded, RateMeter
from tests.fakes import FakeCall, FakeEngine
from tests.test_api import _settings, serve
from tests.test_budget import _wandering_generate, _wandering_letters


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _meter_at(clock: Clock, prompts_per_s: float) -> RateMeter:
    """A meter that has measured ``prompts_per_s`` over 10 busy seconds (no warm-up)."""
    meter = RateMeter(clock=clock, warmup=0)
    meter.running(1)
    clock.now += 10.0
    meter.finished(int(prompts_per_s * 10), int(prompts_per_s * 10))
    meter.running(-1)
    return meter


def _admission(
    clock: Clock, rate: float | None = 100.0, *, metered: bool = True, **kwargs: int
) -> Admission:
    """A limiter whose meter measured ``rate`` (None: nothing yet); no meter at all when not
    ``metered`` (the fixed bounds alone)."""
    meter = _meter_at(clock, rate) if rate is not None else RateMeter(clock=clock, warmup=0)
    options = {"capacity": 16, "max_queue": 64, "work_capacity": 208, "slot_work": 13}
    options.update(kwargs)
    return Admission(meter=meter if metered else None, clock=clock, **options)


@contextlib.asynccontextmanager
async def _holding(admission: Admission, work: int, count: int = 1) -> AsyncIterator[None]:
    async with contextlib.AsyncExitStack() as stack:
        for _ in range(count):
            await stack.enter_async_context(admission.slot(1, work))
        yield


def test_rate_meter_counts_busy_time_only() -> None:
    clock = Clock()
    meter = RateMeter(clock=clock, warmup=0)
    assert meter.rate() is None and meter.fill() == 1.0
    meter.running(1)
    clock.now += 2.0
    meter.finished(20, 40)
    meter.running(-1)
    clock.now += 50.0  # idle: not counted
    assert meter.rate() == pytest.approx(10.0)
    assert meter.fill() == pytest.approx(0.5)


def _run_one(meter: RateMeter, clock: Clock, seconds: float, prompts: int) -> None:
    meter.running(1)
    clock.now += seconds
    meter.finished(prompts, prompts)
    meter.running(-1)


def test_the_cold_start_is_not_counted() -> None:
    clock = Clock()
    meter = RateMeter(clock=clock)  # warm-up: the first request to finish
    _run_one(meter, clock, 16.0, 11)  # cold: 1.45 s a prompt
    assert meter.rate() is None  # nothing measured yet: only the fixed bounds apply
    _run_one(meter, clock, 0.44, 11)
    _run_one(meter, clock, 0.44, 11)
    assert meter.seconds_per_prompt() == pytest.approx(0.04)


def test_one_slow_batch_and_an_idle_gap_do_not_move_the_rate() -> None:
    clock = Clock()
    meter = RateMeter(clock=clock, warmup=0)
    for _ in range(6):
        _run_one(meter, clock, 0.5, 20)  # 0.025 s a prompt
    clock.now += 600.0  # idle for ten minutes
    _run_one(meter, clock, 10.0, 20)  # one stalled batch: 20x slower
    assert meter.seconds_per_prompt() == pytest.approx(0.025)
    for _ in range(12):  # a lasting change is followed
        _run_one(meter, clock, 1.0, 20)
    assert meter.seconds_per_prompt() == pytest.approx(0.05)


async def test_an_idle_engine_runs_a_large_request_at_its_full_rate() -> None:
    clock = Clock()
    admission = _admission(clock, rate=25.0)  # 0.04 s a prompt, as a warm 2-core CPU
    # alone, a 64-prompt question has the whole engine: 2.56 s, not twice that
    assert admission.predicted_s(64) == pytest.approx(2.56)
    async with admission.slot(1, 64, deadline=clock.now + 3.0):  # past 80 % of 3 s: idle runs
        assert admission.work_in_use == 64
        # with work beside it, a large one holds half the engine: (64 + 64) x 2 x 0.04
        assert admission.predicted_s(64) == pytest.approx(10.24)
    assert admission.rejected_for_time == 0


async def test_what_no_wait_would_fit_is_refused_as_unreachable_not_overloaded() -> None:
    clock = Clock()
    admission = _admission(clock, rate=2.0)  # 0.5 s a prompt
    with pytest.raises(DeadlineUnreachable) as refused:
        async with admission.slot(1, 64, deadline=clock.now + 20.0):  # 32 s alone
            pass
    message = str(refused.value)
    assert "64 prompts" in message and "32.0 s" in message and "20 s" in message
    assert "max_prompts" in message and "UFCAL_REQUEST_TIMEOUT_S" in message
    async with admission.slot(1, 13, deadline=clock.now + 20.0):  # 6.5 s: fits
        pass


def test_prompts_weigh_by_their_size() -> None:
    clock = Clock()
    meter = RateMeter(clock=clock, warmup=0)
    meter.running(1)
    clock.now += 10.0
    meter.finished(100, 100, size=2.0)  # 100 prompts of twice the standard cost in 10 s
    meter.running(-1)
    assert meter.seconds_per_prompt() == pytest.approx(0.1)
    assert meter.seconds_per_unit() == pytest.approx(0.05)
    admission = Admission(16, 64, meter=meter, clock=clock)
    # a prompt of 26 long options costs what several of 4 short ones do
    assert admission.predicted_s(10, size=4.0) == pytest.approx(4 * admission.predicted_s(10))
    assert admission.predicted_s(10, size=0.5) == pytest.approx(0.25)


def test_the_prompts_that_fit_a_deadline() -> None:
    admission = _admission(Clock(), rate=2.0)  # 0.5 s a standard prompt
    assert admission.prompts_within(20.0) == 32  # 80 % of 20 s
    assert admission.prompts_within(20.0, size=2.0) == 16
    assert _admission(Clock(), rate=None).prompts_within(20.0) is None  # not measured yet


async def test_the_queue_serves_the_smallest_time_first() -> None:
    admission = _admission(Clock(), metered=False, capacity=1)
    order: list[float] = []

    async def one(work: int, size: float) -> None:
        async with admission.slot(1, work, size=size):
            order.append(work * size)

    async with admission.slot(1, 13):
        tasks = [asyncio.create_task(one(w, z)) for w, z in ((13, 4.0), (30, 1.0), (13, 1.0))]
        await asyncio.sleep(0)
    await asyncio.gather(*tasks)
    assert order == [13.0, 30.0, 52.0]


async def test_refused_at_once_when_the_work_ahead_misses_the_deadline() -> None:
    clock = Clock()
    admission = _admission(clock)  # 100 prompts/s
    async with _holding(admission, 13, count=10):  # 130 prompts running
        assert admission.predicted_s(13) == pytest.approx(1.43)
        # admitted only within 80 % of the time left
        with pytest.raises(Overloaded, match="measured rate") as refused:
            async with admission.slot(1, 13, deadline=clock.now + 1.7):
                pass
        assert refused.value.retry_after_s == 1  # ceil(1.43 - 0.8 x 1.7)
        with pytest.raises(Overloaded) as late:
            async with admission.slot(1, 13, deadline=clock.now + 0.2):
                pass
        assert late.value.retry_after_s == math.ceil(1.43 - 0.16)
        async with admission.slot(1, 13, deadline=clock.now + 1.8):
            assert admission.work_in_use == 143
    assert admission.rejected_for_time == 2


async def test_before_the_rate_is_measured_only_the_fixed_bounds_apply() -> None:
    clock = Clock()
    admission = _admission(clock, rate=None, capacity=1, max_queue=1)
    async with admission.slot(1, 13, deadline=clock.now + 0.001):  # no rate: no time check
        waiting = asyncio.create_task(_enter_and_leave(admission, 13, clock.now + 0.001))
        await asyncio.sleep(0)
        assert admission.queued == 1
        with pytest.raises(Overloaded, match="UFCAL_MAX_QUEUE"):
            async with admission.slot(1, 13):
                pass
    assert await waiting == 13


async def _enter_and_leave(admission: Admission, work: int, deadline: float | None) -> int:
    async with admission.slot(1, work, deadline):
        await asyncio.sleep(0)
        return work


async def test_smallest_work_first() -> None:
    admission = _admission(Clock(), metered=False, capacity=1)
    order: list[int] = []

    async def one(work: int) -> None:
        async with admission.slot(1, work):
            order.append(work)

    async with admission.slot(1, 13):
        tasks = [asyncio.create_task(one(w)) for w in (64, 30, 13, 64)]
        await asyncio.sleep(0)
        assert admission.queued == 4
    await asyncio.gather(*tasks)
    assert order == [13, 30, 64, 64]


async def test_large_requests_hold_at_most_half_the_work() -> None:
    admission = _admission(Clock(), metered=False)  # 208 planned prompts, large share 104
    async with admission.slot(1, 64):
        second = asyncio.create_task(_enter_and_leave(admission, 64, None))
        await asyncio.sleep(0)
        assert admission.work_queued == 64  # 64 + 64 > 104: the second big one waits
        async with _holding(admission, 13, count=11):  # standard questions still run
            assert admission.work_in_use == 64 + 143
    assert await second == 64


async def test_a_queued_request_pushed_past_its_deadline_is_refused_then() -> None:
    clock = Clock()
    admission = _admission(clock, capacity=2)  # 100 prompts/s
    async with _holding(admission, 13, count=2):  # both slots busy, 26 prompts running
        # a big one: (26 + 64) x 2 (large share) / 100 = 1.8 s <= 0.8 x 2.5 s: queued
        big = asyncio.create_task(_enter_and_leave(admission, 64, clock.now + 2.5))
        await asyncio.sleep(0)
        assert admission.work_queued == 64
        # five small ones go first: (26 + 65 + 64) x 2 / 100 = 3.1 s, past its deadline
        smalls = [
            asyncio.create_task(_enter_and_leave(admission, 13, clock.now + 20.0)) for _ in range(5)
        ]
        await asyncio.sleep(0)
        with pytest.raises(Overloaded, match="measured rate"):
            await big
        assert admission.work_queued == 65
    assert await asyncio.gather(*smalls) == [13] * 5
    assert (admission.in_use, admission.queued, admission.work_in_use) == (0, 0, 0)


# ---------------------------------------------------------------- the flood, end to end

COST_S = 0.1  # engine seconds per prompt (sleeps, not CPU: a loaded CI core stays fair)
ENGINE_BATCH = 32  # prompts the fake engine works on at once: 320 prompts/s at most
SMALL_EVERY_S = 0.2
BIG_EVERY_S = 1 / 15
PHASE_S = 8.0


class FixedCostEngine(FakeEngine):
    """Every prompt takes ``COST_S`` in one of ``ENGINE_BATCH`` engine lanes (continuous
    batching at a fixed cost per prompt); prompts beyond the batch wait their turn."""

    def __init__(self) -> None:
        super().__init__(letters=_wandering_letters, generate=_wandering_generate)
        self._lanes: asyncio.Semaphore | None = None

    async def _enter(self, call: FakeCall) -> None:
        await super()._enter(call)
        self.calls.clear()  # a long run: keep no history
        if self._lanes is None:
            self._lanes = asyncio.Semaphore(ENGINE_BATCH)
        lanes = self._lanes

        async def one() -> None:
            async with lanes:
                await asyncio.sleep(COST_S)

        await asyncio.gather(*(one() for _ in call.prompts))


def _question(m: int) -> dict[str, object]:
    return {
        "question": "Which one?",
        "options": [f"option {c}" for c in string.ascii_lowercase[:m]],
    }


def _p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, math.ceil(0.99 * len(ordered)) - 1)]


async def _phase(client: httpx.AsyncClient, flood: bool) -> dict[str, object]:
    small: list[float] = []
    codes: dict[str, Counter[int]] = {"small": Counter(), "big": Counter()}

    async def ask(kind: str, m: int) -> None:
        started = time.perf_counter()
        reply = await client.post("/score", json=_question(m))
        codes[kind][reply.status_code] += 1
        if kind == "small" and reply.status_code == 200:
            small.append(time.perf_counter() - started)

    async def arrivals(kind: str, m: int, every: float) -> None:
        tasks = []
        start = time.perf_counter()
        i = 0
        while (next_at := start + i * every) < start + PHASE_S:
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
            tasks.append(asyncio.create_task(ask(kind, m)))
            i += 1
        await asyncio.gather(*tasks)

    streams = [arrivals("small", 4, SMALL_EVERY_S)]
    if flood:
        streams.append(arrivals("big", 26, BIG_EVERY_S))
    await asyncio.gather(*streams)
    return {
        "small_p50_s": sorted(small)[len(small) // 2],
        "small_p99_s": _p99(small),
        "small_codes": dict(codes["small"]),
        "big_codes": dict(codes["big"]),
    }


async def test_a_flood_of_26_option_requests_gets_the_429s(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Client and server share this event loop: pytest's capture of ~200 "score refused"
    # lines would take the loop's time and measure the log capture, not admission.
    caplog.set_level(logging.ERROR, logger="ufcal.score")
    settings = _settings(request_timeout_s=5.0, log_level="warning")
    async with serve(FixedCostEngine(), settings) as client:
        # a service in use: the engine's rate is measured before the figures are taken
        await asyncio.gather(*(client.post("/score", json=_question(4)) for _ in range(8)))
        quiet = await _phase(client, flood=False)
        flooded = await _phase(client, flood=True)
        metrics = (await client.get("/metrics")).text
    report = {"unloaded": quiet, "flood": flooded}
    (tmp_path / "flood.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    assert quiet["small_codes"] == {200: 40}
    assert flooded["small_codes"] == {200: 40}  # no 4-option request refused or late
    big = flooded["big_codes"]
    assert isinstance(big, dict) and big.get(429, 0) > big.get(200, 0) > 0
    assert big.get(504, 0) == 0
    # The latency target (p99 under the flood <= 2x unloaded) is a speed figure: printed
    # above and in tmp_path/flood.json, not asserted (the brief: speed by numbers, not by
    # timed tests; a loaded CI box stretches the event loop, not the admission).
    rate = next(
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("ufcal_engine_prompts_per_second ")
    )
    assert 0 < rate <= ENGINE_BATCH / COST_S * 1.05


async def test_an_idle_service_fits_the_default_budget_to_the_deadline(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="ufcal.score")
    # ~0.1 s an engine round: a 26-option question's 64 planned prompts are predicted at
    # about 5 s, past 80 % of the 2 s deadline, though nothing else runs.
    settings = _settings(request_timeout_s=2.0, log_level="warning")
    async with serve(FixedCostEngine(), settings) as client:
        for _ in range(12):  # a service in use: its rate is measured
            assert (await client.post("/score", json=_question(4))).status_code == 200
        fitted = await client.post("/score", json=_question(26))
        assert fitted.status_code == 200, fitted.text
        usage = fitted.json()["usage"]
        assert usage["budget_fitted"] is True and usage["budget_hit"] is True
        assert 2 <= usage["max_prompts"] < 64 and usage["prompts"] <= usage["max_prompts"]
        # a small question fits as it is: its budget stays the configured one
        small = (await client.post("/score", json=_question(4))).json()["usage"]
        assert (small["budget_fitted"], small["max_prompts"]) == (False, 64)
        # a budget the client chose stands, and what cannot fit is said so: 422, not 429
        chosen = await client.post("/score", json={**_question(26), "max_prompts": 64})
        assert chosen.status_code == 422, chosen.text
        (issue,) = chosen.json()["detail"]
        assert issue["type"] == "deadline_unreachable" and issue["loc"] == ["body", "max_prompts"]
        # a batch shares its one deadline: its default budgets are fitted together
        batch = await client.post("/score/batch", json={"items": [_question(26)] * 2})
        assert batch.status_code == 200, batch.text
        results = [item["result"] for item in batch.json()["results"]]
        assert all(r is not None and r["usage"]["budget_fitted"] for r in results)
        assert sum(r["usage"]["max_prompts"] for r in results) <= usage["max_prompts"] + 2
