"""Admission by work and by time: a request is weighed by the prompts it is planned to send,
run when the engine has room for that work, queued smallest work first, and refused at once
(``Overloaded``, HTTP 429 with a Retry-After from the prediction) when it could not finish
before its deadline at the engine's measured rate. A request that runs past its deadline
anyway is cancelled, engine work included (``DeadlineExceeded``, HTTP 504)::

    reply = await state.admission.run(lambda: work(), cost=1, work=13, timeout_s=20)

Bounds, all upper bounds:

* ``capacity`` requests (or batch items) run at once and ``max_queue`` wait
  (UFCAL_MAX_CONCURRENCY, UFCAL_MAX_QUEUE); beyond the queue a request is refused at once;
* ``work_capacity`` planned prompts run at once, so a 26-option question (64 prompts under
  the default budget) holds as much of the engine as five 4-option ones (13 each);
* large requests (more work than ``slot_work``, one standard question) together hold at
  most half of ``work_capacity``, so standard questions always find room: a flood of big
  questions cannot starve them (their predicted wait is taken at half the rate);
* time: with the engine's rate measured (``RateMeter``, prompts per busy second), a request
  is admitted only if the work ahead of it plus its own is predicted to finish before its
  deadline. Smaller work is served first; a queued request that later, smaller arrivals
  push past its deadline is refused then (429, before it cost the engine anything) instead
  of timing out at the engine.

A request is admitted when predicted to finish within ``deadline_share`` (80 %) of the time
it has left: the rate moves with the load, and the prediction is of the whole work, while
the deadline is hard. Until the rate is measured (the first requests after start) only the
fixed bounds apply, so a burst that arrives before anything finished can still queue past
what the engine does before the deadline (504s)."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TypeVar

from prometheus_client import CollectorRegistry, Gauge

T = TypeVar("T")


class Overloaded(Exception):
    """The request cannot be taken now (HTTP 429): every slot and the queue are full, or
    the work ahead would not finish before its deadline."""

    def __init__(self, retry_after_s: int, reason: str | None = None) -> None:
        super().__init__(
            reason
            or (
                f"overloaded: every slot (UFCAL_MAX_CONCURRENCY) and the queue "
                f"(UFCAL_MAX_QUEUE) are full; retry after {retry_after_s} s"
            )
        )
        self.retry_after_s = retry_after_s


class DeadlineExceeded(Exception):
    """The request ran past ``UFCAL_REQUEST_TIMEOUT_S`` and was cancelled (HTTP 504)."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(
            f"the request took longer than UFCAL_REQUEST_TIMEOUT_S={timeout_s:g} s and was "
            "cancelled"
        )
        self.timeout_s = timeout_s


class RateMeter:
    """The engine's measured throughput: prompts finished per second of busy time (time with
    at least one request running), over the last ``window_s`` seconds, and the share of the
    planned prompts that requests actually sent (``fill``; plans are upper bounds).

    Requests report their prompts when they finish, so the figure moves with the load; it
    is None until ``min_prompts`` prompts over ``min_busy_s`` busy seconds were seen."""

    def __init__(
        self,
        window_s: float = 60.0,
        min_busy_s: float = 0.5,
        min_prompts: int = 8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.window_s = window_s
        self.min_busy_s = min_busy_s
        self.min_prompts = min_prompts
        self._clock = clock
        self._running = 0
        self._busy_since: float | None = None
        self._busy = 0.0  # busy seconds before _busy_since
        self._prompts = 0
        self._planned = 0
        # (time, prompts, planned, busy) running totals at each finish
        self._samples: deque[tuple[float, int, int, float]] = deque([(clock(), 0, 0, 0.0)])

    def _busy_now(self, now: float) -> float:
        return self._busy + (now - self._busy_since if self._busy_since is not None else 0.0)

    def running(self, delta: int) -> None:
        """``delta`` more (or fewer) requests run on the engine now."""
        now = self._clock()
        before = self._running
        self._running += delta
        if before == 0 and self._running > 0:
            self._busy_since = now
        elif before > 0 and self._running == 0 and self._busy_since is not None:
            self._busy += now - self._busy_since
            self._busy_since = None

    def finished(self, prompts: int, planned: int) -> None:
        """A request finished after sending ``prompts`` of its ``planned`` prompts."""
        now = self._clock()
        self._prompts += max(0, prompts)
        self._planned += max(0, planned)
        self._samples.append((now, self._prompts, self._planned, self._busy_now(now)))
        while len(self._samples) > 2 and self._samples[1][0] < now - self.window_s:
            self._samples.popleft()

    def _span(self) -> tuple[int, int, float]:
        now = self._clock()
        _, prompts, planned, busy = self._samples[0]
        return self._prompts - prompts, self._planned - planned, self._busy_now(now) - busy

    def rate(self) -> float | None:
        """Prompts per busy second, or None while too little was measured."""
        prompts, _, busy = self._span()
        if prompts < self.min_prompts or busy < self.min_busy_s:
            return None
        return prompts / busy

    def fill(self) -> float:
        """Prompts sent per planned prompt (1.0 until measured)."""
        prompts, planned, _ = self._span()
        return min(1.0, prompts / planned) if planned > 0 and prompts > 0 else 1.0


@dataclass(eq=False)
class _Waiter:
    slots: int
    work: int
    deadline: float
    order: int
    future: asyncio.Future[None] = field(repr=False)

    @property
    def key(self) -> tuple[int, int]:
        """Queue order: smallest work first, then arrival."""
        return (self.work, self.order)


class Admission:
    """The limiter (see the module docstring). Everything runs on one event loop, so no
    lock is needed."""

    def __init__(
        self,
        capacity: int,
        max_queue: int,
        retry_after_s: int = 1,
        *,
        work_capacity: int | None = None,
        slot_work: int | None = None,
        meter: RateMeter | None = None,
        deadline_share: float = 0.8,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if capacity < 1 or max_queue < 0:
            raise ValueError("capacity must be >= 1 and max_queue >= 0")
        self.capacity = capacity
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.work_capacity = work_capacity
        self.slot_work = slot_work
        self.large_capacity = None if work_capacity is None else max(1, work_capacity // 2)
        self.meter = meter
        self.deadline_share = deadline_share
        self.large_in_use = 0
        self._clock = clock
        self.in_use = 0
        self.queued = 0
        self.work_in_use = 0
        self.work_queued = 0
        self.rejected = 0
        self.rejected_for_time = 0
        self._waiters: list[_Waiter] = []  # smallest work first, then arrival
        self._order = itertools.count()

    def cost_of(self, cost: int) -> int:
        """The slots a request of ``cost`` takes."""
        return max(1, min(int(cost), self.capacity))

    def work_of(self, work: int) -> int:
        """The planned prompts a request is weighed at (capped so that it can ever run)."""
        weight = max(1, int(work))
        return weight if self.work_capacity is None else min(weight, self.work_capacity)

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about one queue turnover, at least 1."""
        return max(self.retry_after_s, math.ceil(self.queued / self.capacity))

    def seconds_per_prompt(self) -> float | None:
        """Predicted engine seconds per planned prompt, None until the rate is measured."""
        if self.meter is None:
            return None
        rate = self.meter.rate()
        if rate is None or rate <= 0:
            return None
        return self.meter.fill() / rate

    def is_large(self, work: int) -> bool:
        """More work than one standard question: held to the large requests' share."""
        return self.slot_work is not None and work > self.slot_work

    def _seconds_for(self, total: int, per_prompt: float, large: bool) -> float:
        """Seconds for ``total`` planned prompts to drain; large requests get at most half
        the engine, so the work ahead of one drains at half the rate."""
        return total * per_prompt * (2.0 if large else 1.0)

    def _forecast(self, work: int) -> tuple[int, int, float | None]:
        """For a new request of ``work``: where it joins the queue (after every waiter with
        no more work; the waiters are kept in ``key`` order), the planned prompts served up
        to its end (running, queued ahead of it, its own), and when they would be done from
        now at the measured rate (None until measured)."""
        position = bisect.bisect_right(self._waiters, (work, math.inf), key=lambda w: w.key)
        through = self.work_in_use + sum(w.work for w in self._waiters[:position]) + work
        per_prompt = self.seconds_per_prompt()
        if per_prompt is None:
            return position, through, None
        return position, through, self._seconds_for(through, per_prompt, self.is_large(work))

    def predicted_s(self, work: int) -> float | None:
        """When a new request of ``work`` would finish from now: the work running, the queued
        work served before it (no larger than its own) and its own, at the measured rate."""
        return self._forecast(work)[2]

    def _in_time(self, predicted: float, now: float, deadline: float) -> bool:
        return predicted <= self.deadline_share * (deadline - now)

    def _fits(self, slots: int, work: int) -> bool:
        if self.in_use + slots > self.capacity:
            return False
        if self.work_capacity is None or self.work_in_use == 0:
            return True
        if self.work_in_use + work > self.work_capacity:
            return False
        if self.is_large(work) and self.large_in_use and self.large_capacity is not None:
            return self.large_in_use + work <= self.large_capacity
        return True

    def _refuse_for_time(self, predicted: float, available: float) -> Overloaded:
        self.rejected += 1
        self.rejected_for_time += 1
        retry = max(self.retry_after_s, math.ceil(predicted - available))
        return Overloaded(
            retry,
            f"overloaded: the work ahead would finish in about {predicted:.1f} s at the "
            f"engine's measured rate, past this request's deadline "
            f"(UFCAL_REQUEST_TIMEOUT_S); retry after {retry} s",
        )

    def _take(self, slots: int, work: int) -> None:
        self.in_use += slots
        self.work_in_use += work
        if self.is_large(work):
            self.large_in_use += work
        if self.meter is not None:
            self.meter.running(1)

    @contextlib.asynccontextmanager
    async def slot(
        self, cost: int = 1, work: int = 1, deadline: float | None = None
    ) -> AsyncIterator[None]:
        """Hold ``cost`` slots and ``work`` planned prompts for the block. Wait in the queue
        if it has room and the work ahead fits before ``deadline`` (a ``clock()`` time),
        else raise ``Overloaded`` at once."""
        slots, weight = self.cost_of(cost), self.work_of(work)
        now = self._clock()
        position, through, predicted = self._forecast(weight)
        if (
            deadline is not None
            and predicted is not None
            and not self._in_time(predicted, now, deadline)
        ):
            raise self._refuse_for_time(predicted, self.deadline_share * (deadline - now))
        # smallest work first: only waiters with more work than this one can be passed
        if position == 0 and self._fits(slots, weight):
            self._take(slots, weight)
        else:
            if self.queued + slots > self.max_queue:
                self.rejected += 1
                raise Overloaded(self.retry_after())
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiter = _Waiter(slots, weight, deadline or math.inf, next(self._order), future)
            self._waiters.insert(position, waiter)  # its order is the newest: key order holds
            self.queued += slots
            self.work_queued += weight
            self._evict_late(now, position + 1, through)
            try:
                await future
            except asyncio.CancelledError:
                granted = future.done() and not future.cancelled() and not future.exception()
                if granted:
                    self._release(slots, weight)  # granted just as we were cancelled
                else:
                    self._drop(waiter)
                    self._grant()
                raise
        try:
            yield
        finally:
            self._release(slots, weight)

    async def run(
        self,
        work: Callable[[], Awaitable[T]],
        *,
        cost: int,
        timeout_s: float,
        planned: int = 1,
        measure: Callable[[T], int | None] | None = None,
    ) -> T:
        """``work()`` in ``cost`` slots weighed at ``planned`` prompts, queueing included in
        the deadline ``timeout_s``. On the deadline the work is cancelled (and with it the
        engine calls it made). ``measure`` tells the prompts the result actually sent (for
        the rate meter; None or no ``measure``: none counted)."""

        # asyncio.timeout, unlike wait_for, runs the work in this task (no task per request)
        deadline = asyncio.timeout(timeout_s)
        sent = 0
        try:
            async with deadline, self.slot(cost, planned, self._clock() + timeout_s):
                result = await work()
                if measure is not None:
                    sent = measure(result) or 0
                return result
        except TimeoutError as exc:
            if deadline.expired():
                raise DeadlineExceeded(timeout_s) from exc
            raise
        finally:
            if self.meter is not None and sent:
                self.meter.finished(sent, self.work_of(planned))

    def export(self, registry: CollectorRegistry) -> None:
        """Prometheus gauges read from this limiter at scrape time."""
        meter = self.meter
        Gauge(
            "ufcal_engine_prompts_per_second",
            "The engine's measured throughput: prompts finished per busy second (moving "
            "figure; 0 until measured). Admission predicts finish times from it.",
            registry=registry,
        ).set_function(lambda: (meter.rate() or 0.0) if meter is not None else 0.0)
        Gauge(
            "ufcal_admission_work_running",
            "Planned prompts of the requests running now.",
            registry=registry,
        ).set_function(lambda: float(self.work_in_use))
        Gauge(
            "ufcal_admission_work_queued",
            "Planned prompts of the requests waiting for the engine.",
            registry=registry,
        ).set_function(lambda: float(self.work_queued))
        Gauge(
            "ufcal_admission_rejected_for_time",
            "Requests refused (429) because they were predicted to miss their deadline, "
            "since start.",
            registry=registry,
        ).set_function(lambda: float(self.rejected_for_time))

    def _drop(self, waiter: _Waiter) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
            self.queued -= waiter.slots
            self.work_queued -= waiter.work

    def _evict_late(self, now: float, start: int, ahead: int) -> None:
        """Refuse the queued requests from ``start`` on (those a new arrival was put ahead
        of; ``ahead`` is the work served before ``start``) that the work now ahead of them
        would push past their deadlines."""
        per_prompt = self.seconds_per_prompt()
        if per_prompt is None:
            return
        for waiter in self._waiters[start:]:
            ahead += waiter.work
            predicted = self._seconds_for(ahead, per_prompt, self.is_large(waiter.work))
            if not self._in_time(predicted, now, waiter.deadline) and not waiter.future.done():
                self._drop(waiter)
                ahead -= waiter.work
                available = self.deadline_share * (waiter.deadline - now)
                waiter.future.set_exception(self._refuse_for_time(predicted, available))

    def _release(self, slots: int, work: int) -> None:
        self.in_use -= slots
        self.work_in_use -= work
        if self.is_large(work):
            self.large_in_use -= work
        if self.meter is not None:
            self.meter.running(-1)
        self._grant()

    def _grant(self) -> None:
        while self._waiters:
            waiter = self._waiters[0]
            if waiter.future.done():  # cancelled: its task is unwinding; drop it here
                self._drop(waiter)
                continue
            if not self._fits(waiter.slots, waiter.work):
                return
            self._drop(waiter)
            self._take(waiter.slots, waiter.work)
            waiter.future.set_result(None)
