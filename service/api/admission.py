"""Backpressure: a bounded number of requests scored at once, a bounded queue in front of
them, and a deadline over both.

Beyond the queue a request is refused at once (``Overloaded``, HTTP 429 with Retry-After),
so memory stays bounded however hard the service is pushed. A request that runs past its
deadline is cancelled, engine work included (``DeadlineExceeded``, HTTP 504)::

    async with state.admission.slot(cost=len(items)):   # a batch takes len(items) slots
        ...

    reply = await state.admission.run(lambda: work(), cost=1, timeout_s=60)
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


class Overloaded(Exception):
    """Every slot is busy and the queue is full (HTTP 429)."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(
            f"overloaded: every slot (UFCAL_MAX_CONCURRENCY) and the queue "
            f"(UFCAL_MAX_QUEUE) are full; retry after {retry_after_s} s"
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


class Admission:
    """``capacity`` slots, ``max_queue`` waiting slots, first come first served.

    Costs are in slots: a batch of n items asks for n (capped at ``capacity`` so that it
    can ever run). Everything runs on one event loop, so no lock is needed."""

    def __init__(self, capacity: int, max_queue: int, retry_after_s: int = 1) -> None:
        if capacity < 1 or max_queue < 0:
            raise ValueError("capacity must be >= 1 and max_queue >= 0")
        self.capacity = capacity
        self.max_queue = max_queue
        self.retry_after_s = retry_after_s
        self.in_use = 0
        self.queued = 0
        self.rejected = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    def cost_of(self, cost: int) -> int:
        """The slots a request of ``cost`` takes."""
        return max(1, min(int(cost), self.capacity))

    def retry_after(self) -> int:
        """Seconds a refused client should wait: about one queue turnover, at least 1."""
        return max(self.retry_after_s, math.ceil(self.queued / self.capacity))

    @contextlib.asynccontextmanager
    async def slot(self, cost: int = 1) -> AsyncIterator[None]:
        """Hold ``cost`` slots for the block; wait in the queue if it has room, else raise
        ``Overloaded`` at once."""
        need = self.cost_of(cost)
        if not self._waiters and self.in_use + need <= self.capacity:
            self.in_use += need
        else:
            if self.queued + need > self.max_queue:
                self.rejected += 1
                raise Overloaded(self.retry_after())
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            entry = (need, future)
            self._waiters.append(entry)
            self.queued += need
            try:
                await future
            except asyncio.CancelledError:
                if future.done() and not future.cancelled():
                    self._release(need)  # granted just as we were cancelled
                else:
                    if entry in self._waiters:  # else _grant dropped it already
                        self._waiters.remove(entry)
                        self.queued -= need
                    self._grant()
                raise
        try:
            yield
        finally:
            self._release(need)

    async def run(self, work: Callable[[], Awaitable[T]], *, cost: int, timeout_s: float) -> T:
        """``work()`` in ``cost`` slots, queueing included in the deadline ``timeout_s``.
        On the deadline the work is cancelled (and with it the engine calls it made)."""

        # asyncio.timeout, unlike wait_for, runs the work in this task (no task per request)
        deadline = asyncio.timeout(timeout_s)
        try:
            async with deadline, self.slot(cost):
                return await work()
        except TimeoutError as exc:
            if deadline.expired():
                raise DeadlineExceeded(timeout_s) from exc
            raise

    def _release(self, need: int) -> None:
        self.in_use -= need
        self._grant()

    def _grant(self) -> None:
        while self._waiters:
            need, future = self._waiters[0]
            if future.cancelled():  # its task is unwinding; drop it here
                self._waiters.popleft()
                self.queued -= need
                continue
            if self.in_use + need > self.capacity:
                return
            self._waiters.popleft()
            self.queued -= need
            self.in_use += need
            future.set_result(None)
