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
  questions cannot starve them (while other work competes, their predicted wait is taken
  at half the rate);
* time: with the engine's rate measured (``RateMeter``, busy seconds per unit: a prompt
  weighed by its ``size``, ``budget.prompt_size``), a request is admitted only if the work
  ahead of it plus its own is predicted to finish before its deadline (``prompts_within``
  tells how many prompts would, to fit a default budget). Smaller work is served first; a
  queued request that later, smaller arrivals push past its deadline is refused then (429,
  before it cost the engine anything) instead of timing out at the engine.

On an idle engine (nothing running or queued) a request runs whenever its own work fits
its deadline, and the deadline decides; a request whose own work alone is predicted past
its deadline is refused with ``DeadlineUnreachable`` (HTTP 422 at ``max_prompts``), never
429, since no wait would help.

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

from prometheus_client import CollectorRegistry, Gauge, Histogram

T = TypeVar("T")
#: Buckets of predicted / actual finish time: fine around 1, the 0.5x-2x band marked.
PREDICTION_BUCKETS = (0.25, 0.33, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 4.0)


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


class DeadlineUnreachable(Exception):
    """The request's own work would miss its deadline even on an idle engine, at the
    measured rate (HTTP 422): waiting cannot help, a smaller plan or a longer deadline can.
    ``planned`` is its planned prompts, ``predicted_s`` its predicted seconds alone."""

    def __init__(self, planned: int, predicted_s: float, timeout_s: float) -> None:
        super().__init__(
            f"this request is planned at {planned} prompts, which the engine is predicted to "
            f"take about {predicted_s:.1f} s for even when idle (its measured rate), past the "
            f"request's deadline of {timeout_s:g} s (UFCAL_REQUEST_TIMEOUT_S): lower "
            "max_prompts (or send fewer options or samples), or raise UFCAL_REQUEST_TIMEOUT_S"
        )
        self.planned = planned
        self.predicted_s = predicted_s
        self.timeout_s = timeout_s


class DeadlineExceeded(Exception):
    """The request ran past ``UFCAL_REQUEST_TIMEOUT_S`` and was cancelled (HTTP 504)."""

    def __init__(self, timeout_s: float) -> None:
        super().__init__(
            f"the request took longer than UFCAL_REQUEST_TIMEOUT_S={timeout_s:g} s and was "
            "cancelled"
        )
        self.timeout_s = timeout_s


class RateMeter:
    """The engine's measured throughput, as a prediction can trust it: seconds per unit of
    work, taken in busy time (time with at least one request running, so an idle gap counts
    nothing), and the share of the planned work that requests actually sent (``fill``;
    plans are upper bounds). A request's unit is its prompts times its ``size``, the
    relative cost of one of its prompts (``budget.prompt_size``: a prompt of 26 long options
    costs the engine several times one of four short ones); size 1 counts prompts.

    Finished requests are gathered into buckets of at least ``min_busy_s`` busy seconds and
    ``min_prompts`` prompts; a bucket's figure is its busy seconds over its units, so
    requests that overlap count once. The rate is the weighted median of the last
    ``buckets`` buckets' figures (weights: their prompts, times ``decay`` per bucket of
    age), so a single slow batch moves it by at most its own prompts' votes, however long
    it stalled, and the newest buckets count most. The first ``warmup`` requests to finish
    (the cold start: first batches, empty prefix cache) and the busy time before them are
    not counted. None until one bucket after the warm-up is full."""

    def __init__(
        self,
        *,
        min_busy_s: float = 0.5,
        min_prompts: int = 8,
        buckets: int = 15,
        decay: float = 0.85,
        warmup: int = 1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.min_busy_s = min_busy_s
        self.min_prompts = min_prompts
        self.decay = decay
        self._warmup_left = warmup
        self._clock = clock
        self._running = 0
        self._busy_since: float | None = None
        self._busy = 0.0  # busy seconds before _busy_since
        # the open bucket: prompts, units and planned units since, the busy total at its start
        self._open_prompts = 0
        self._open_units = 0.0
        self._open_planned = 0.0
        self._open_busy = 0.0
        # closed buckets, oldest first: (busy seconds, prompts, units, planned units)
        self._buckets: deque[tuple[float, int, float, float]] = deque(maxlen=buckets)
        self._per_unit: float | None = None
        self._per_prompt: float | None = None
        self._fill = 1.0

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

    def finished(self, prompts: int, planned: int, size: float = 1.0) -> None:
        """A request finished after sending ``prompts`` of its ``planned`` prompts, each of
        ``size`` units."""
        busy = self._busy_now(self._clock())
        if self._warmup_left > 0:  # the cold start: drop it and what ran beside it
            self._warmup_left -= 1
            self._open_busy = busy
            return
        size = max(0.0, size)
        self._open_prompts += max(0, prompts)
        self._open_units += max(0, prompts) * size
        self._open_planned += max(0, planned) * size
        spent = busy - self._open_busy
        if self._open_prompts < self.min_prompts or spent < self.min_busy_s:
            return
        if self._open_units > 0:
            self._buckets.append((spent, self._open_prompts, self._open_units, self._open_planned))
        self._open_prompts = 0
        self._open_units = self._open_planned = 0.0
        self._open_busy = busy
        if not self._buckets:
            return
        age = len(self._buckets) - 1
        self._per_unit = _weighted_median(
            [(s / u, u * self.decay ** (age - i)) for i, (s, _, u, _) in enumerate(self._buckets)]
        )
        self._per_prompt = _weighted_median(
            [(s / p, p * self.decay ** (age - i)) for i, (s, p, _, _) in enumerate(self._buckets)]
        )
        sent = sum(u for _, _, u, _ in self._buckets)
        planned_total = sum(q for _, _, _, q in self._buckets)
        self._fill = min(1.0, sent / planned_total) if planned_total > 0 and sent > 0 else 1.0

    def seconds_per_unit(self) -> float | None:
        """Busy seconds per unit of work sent, or None while too little was measured."""
        return self._per_unit

    def seconds_per_prompt(self) -> float | None:
        """Busy seconds per prompt sent, whatever its size (None while too little was
        measured): what the engine did, for the gauge; predictions use units."""
        return self._per_prompt

    def rate(self) -> float | None:
        """Prompts per busy second, or None while too little was measured."""
        per_prompt = self._per_prompt
        return None if per_prompt is None or per_prompt <= 0 else 1.0 / per_prompt

    def fill(self) -> float:
        """Units sent per planned unit (1.0 until measured)."""
        return self._fill


def _weighted_median(values: list[tuple[float, float]]) -> float:
    """The value at half the total weight of ``(value, weight)`` pairs."""
    ordered = sorted(values)
    half = sum(w for _, w in ordered) / 2
    seen = 0.0
    for value, weight in ordered:
        seen += weight
        if seen >= half:
            return value
    return ordered[-1][0]


@dataclass(eq=False)
class _Waiter:
    slots: int
    work: int
    units: float
    deadline: float
    order: int
    future: asyncio.Future[None] = field(repr=False)

    @property
    def key(self) -> tuple[float, int]:
        """Queue order: smallest work (in units, the predicted time) first, then arrival."""
        return (self.units, self.order)


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
        self.units_in_use = 0.0  # planned prompts times their size: what time is predicted by
        self.rejected = 0
        self.rejected_for_time = 0
        self._accuracy: Histogram | None = None  # set by export
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

    def seconds_per_unit(self) -> float | None:
        """Predicted engine seconds per planned unit (a planned prompt of size 1), None
        until the rate is measured."""
        if self.meter is None:
            return None
        per_unit = self.meter.seconds_per_unit()
        if per_unit is None or per_unit <= 0:
            return None
        return self.meter.fill() * per_unit

    def is_large(self, work: int) -> bool:
        """More work than one standard question: held to the large requests' share."""
        return self.slot_work is not None and work > self.slot_work

    def _seconds_for(self, ahead: float, own: float, work: int, per_unit: float) -> float:
        """Seconds until a request of ``own`` planned units (``work`` planned prompts) is
        done with ``ahead`` planned units served before or beside it. Large requests hold
        at most half the engine while other work competes, so the work up to one's end is
        taken to drain at half the rate then; alone it has the whole engine."""
        slowed = 2.0 if ahead > 0 and self.is_large(work) else 1.0
        return (ahead + own) * slowed * per_unit

    def _forecast(self, work: int, size: float) -> tuple[int, float, float | None]:
        """For a new request of ``work`` prompts of ``size``: where it joins the queue
        (after every waiter with no more units; the waiters are kept in ``key`` order), the
        planned units served up to its end (running, queued ahead of it, its own), and when
        they would be done from now at the measured rate (None until measured)."""
        units = work * size
        position = bisect.bisect_right(self._waiters, (units, math.inf), key=lambda w: w.key)
        ahead = self.units_in_use + sum(w.units for w in self._waiters[:position])
        per_unit = self.seconds_per_unit()
        if per_unit is None:
            return position, ahead + units, None
        return position, ahead + units, self._seconds_for(ahead, units, work, per_unit)

    def predicted_s(self, work: int, size: float = 1.0) -> float | None:
        """When a new request of ``work`` prompts of ``size`` would finish from now: the
        work running, the queued work served before it (no larger than its own) and its
        own, at the measured rate."""
        return self._forecast(work, size)[2]

    def prompts_within(
        self, seconds: float, size: float = 1.0, share: float | None = None
    ) -> int | None:
        """The most prompts of ``size`` that one request may plan to be predicted done,
        alone on the engine, within ``share`` (default ``deadline_share``) of ``seconds``
        (None until the rate is measured): a default work budget is fitted with it."""
        per_unit = self.seconds_per_unit()
        if per_unit is None or size <= 0:
            return None
        fraction = self.deadline_share if share is None else share
        return math.floor(fraction * seconds / (size * per_unit))

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
            f"overloaded: with the work queued and running ahead of it, this request would "
            f"finish in about {predicted:.1f} s at the engine's measured rate, past its "
            f"deadline (UFCAL_REQUEST_TIMEOUT_S); retry after {retry} s",
        )

    def _take(self, slots: int, work: int, units: float) -> None:
        self.in_use += slots
        self.work_in_use += work
        self.units_in_use += units
        if self.is_large(work):
            self.large_in_use += work
        if self.meter is not None:
            self.meter.running(1)

    @contextlib.asynccontextmanager
    async def slot(
        self, cost: int = 1, work: int = 1, deadline: float | None = None, size: float = 1.0
    ) -> AsyncIterator[None]:
        """Hold ``cost`` slots and ``work`` planned prompts (of ``size`` units each) for the
        block. Wait in the queue if it has room and the work ahead fits before ``deadline``
        (a ``clock()`` time), else raise ``Overloaded`` at once."""
        slots, weight = self.cost_of(cost), self.work_of(work)
        units = weight * size
        now = self._clock()
        position, through, predicted = self._forecast(weight, size)
        if deadline is not None and predicted is not None:
            per_unit = self.seconds_per_unit() or 0.0
            alone = self._seconds_for(0, units, weight, per_unit)
            if alone > deadline - now:  # no wait would help: say what would
                self.rejected += 1
                self.rejected_for_time += 1
                raise DeadlineUnreachable(weight, alone, deadline - now)
            idle = self.in_use == 0 and not self._waiters
            # On an idle engine a request whose own work fits runs, and the deadline decides:
            # 429 is kept for what the queue ahead causes.
            if not idle and not self._in_time(predicted, now, deadline):
                raise self._refuse_for_time(predicted, self.deadline_share * (deadline - now))
        # smallest work first: only waiters with more work than this one can be passed
        if position == 0 and self._fits(slots, weight):
            self._take(slots, weight, units)
        else:
            if self.queued + slots > self.max_queue:
                self.rejected += 1
                raise Overloaded(self.retry_after())
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiter = _Waiter(slots, weight, units, deadline or math.inf, next(self._order), future)
            self._waiters.insert(position, waiter)  # its order is the newest: key order holds
            self.queued += slots
            self.work_queued += weight
            self._evict_late(now, position + 1, through)
            try:
                await future
            except asyncio.CancelledError:
                granted = future.done() and not future.cancelled() and not future.exception()
                if granted:
                    self._release(slots, weight, units)  # granted just as we were cancelled
                else:
                    self._drop(waiter)
                    self._grant()
                raise
        try:
            yield
        finally:
            self._release(slots, weight, units)

    async def run(
        self,
        work: Callable[[], Awaitable[T]],
        *,
        cost: int,
        timeout_s: float,
        planned: int = 1,
        size: float = 1.0,
        measure: Callable[[T], int | None] | None = None,
    ) -> T:
        """``work()`` in ``cost`` slots weighed at ``planned`` prompts of ``size`` units
        each (the relative cost of one; ``budget.prompt_size``), queueing included in the
        deadline ``timeout_s``. On the deadline the work is cancelled (and with it the
        engine calls it made). ``measure`` tells the prompts the result actually sent (for
        the rate meter; None or no ``measure``: none counted)."""

        # asyncio.timeout, unlike wait_for, runs the work in this task (no task per request)
        deadline = asyncio.timeout(timeout_s)
        sent = 0
        arrived = self._clock()
        predicted = self.predicted_s(self.work_of(planned), size)
        try:
            async with deadline, self.slot(cost, planned, arrived + timeout_s, size):
                result = await work()
                if measure is not None:
                    sent = measure(result) or 0
                taken = self._clock() - arrived
                if predicted is not None and taken > 0 and self._accuracy is not None:
                    self._accuracy.observe(predicted / taken)
                return result
        except TimeoutError as exc:
            if deadline.expired():
                raise DeadlineExceeded(timeout_s) from exc
            raise
        finally:
            if self.meter is not None and sent:
                self.meter.finished(sent, self.work_of(planned), size)

    def export(self, registry: CollectorRegistry) -> None:
        """Prometheus gauges read from this limiter at scrape time."""
        meter = self.meter
        self._accuracy = Histogram(
            "ufcal_admission_predicted_over_actual",
            "Predicted over actual seconds from arrival to reply, per answered request "
            "admitted with a measured rate: 1 is exact; admission refuses by this prediction.",
            buckets=PREDICTION_BUCKETS,
            registry=registry,
        )
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

    def _evict_late(self, now: float, start: int, ahead: float) -> None:
        """Refuse the queued requests from ``start`` on (those a new arrival was put ahead
        of; ``ahead`` is the work, in units, served before ``start``) that the work now
        ahead of them would push past their deadlines."""
        per_unit = self.seconds_per_unit()
        if per_unit is None:
            return
        for waiter in self._waiters[start:]:
            predicted = self._seconds_for(ahead, waiter.units, waiter.work, per_unit)
            ahead += waiter.units
            if not self._in_time(predicted, now, waiter.deadline) and not waiter.future.done():
                self._drop(waiter)
                ahead -= waiter.units
                available = self.deadline_share * (waiter.deadline - now)
                waiter.future.set_exception(self._refuse_for_time(predicted, available))

    def _release(self, slots: int, work: int, units: float) -> None:
        self.in_use -= slots
        self.work_in_use -= work
        self.units_in_use -= units
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
            self._take(waiter.slots, waiter.work, waiter.units)
            waiter.future.set_result(None)
