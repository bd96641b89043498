"""Which of several engine servers serves a prompt: prefix-affine or round-robin routing.

Every prompt of one question shares its system prompt and question prefix, and a vLLM
server's prefix cache serves that prefix only to the prompts that reach that server. Affinity
routing sends every prompt with the same key (``Prompt.prefix_key``: one per question) to the
same server: rendezvous (highest-random-weight) hashing ranks the servers by a hash of
(server, key) and the healthy server of highest rank wins.

- The hash is SHA-256, never Python's ``hash()`` (salted per process), so every replica of
  the service and every restart ranks the servers alike for a key.
- When a server is down, only its keys move, each to its own next server in rank; the other
  servers keep theirs, and the keys come back when the server does.
- The optional load guard takes the second server in rank when the first has far more
  requests in flight from this process (a hot question, a slow server): ``in_flight(first)
  >= guard x (in_flight(second) + 1)``.

The choice (``rank``, ``pick``) is a pure function; ``EngineRouter`` holds the state it
reads (which servers are down, what is in flight, the round-robin position)."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Literal

Routing = Literal["affinity", "round_robin"]
ROUTINGS: tuple[Routing, ...] = ("affinity", "round_robin")


def weight(engine: str, key: str) -> int:
    """The rendezvous weight of ``engine`` for ``key``: the same in every process."""
    digest = hashlib.sha256(f"{engine}\x00{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def rank(engines: Sequence[str], key: str) -> list[str]:
    """The engines in order of preference for ``key``, highest weight first."""
    return sorted(engines, key=lambda engine: (weight(engine, key), engine), reverse=True)


def pick(
    engines: Sequence[str],
    key: str,
    *,
    down: frozenset[str] | set[str] = frozenset(),
    in_flight: Mapping[str, int] | None = None,
    load_guard: float = 0.0,
) -> str:
    """The engine for ``key``: the first in rank that is not down (the first in rank when
    all are down), or the next healthy one when ``load_guard`` > 0 and the first has at
    least ``load_guard x (its in-flight + 1)`` requests in flight."""
    if not engines:
        raise ValueError("no engines to route to")
    ranked = rank(engines, key)
    healthy = [engine for engine in ranked if engine not in down] or ranked
    first = healthy[0]
    if load_guard > 0 and in_flight is not None and len(healthy) > 1:
        second = healthy[1]
        if in_flight.get(first, 0) >= load_guard * (in_flight.get(second, 0) + 1):
            return second
    return first


class EngineRouter:
    """The servers, their health and their load as this process sees them; ``choose``
    names the server for the next request."""

    def __init__(
        self, engines: Sequence[str], routing: Routing = "affinity", load_guard: float = 0.0
    ) -> None:
        if not engines:
            raise ValueError("at least one engine is needed")
        if routing not in ROUTINGS:
            raise ValueError(f"unknown routing {routing!r}; use one of {', '.join(ROUTINGS)}")
        if load_guard < 0:
            raise ValueError("the load guard must be >= 0 (0 = off)")
        self.engines = list(engines)
        self.routing = routing
        self.load_guard = load_guard
        self.in_flight = dict.fromkeys(self.engines, 0)
        self._down: set[str] = set()
        self._next = itertools.cycle(self.engines)

    @property
    def down(self) -> list[str]:
        """The servers marked down now, in configuration order."""
        return [engine for engine in self.engines if engine in self._down]

    @property
    def all_down(self) -> bool:
        return len(self._down) == len(self.engines)

    def mark(self, engine: str, up: bool) -> bool:
        """Mark ``engine`` up or down; True when that changed its state."""
        if up:
            if engine in self._down:
                self._down.discard(engine)
                return True
            return False
        if engine in self._down:
            return False
        self._down.add(engine)
        return True

    def choose(self, key: str | None) -> str:
        """The server for a request with ``key``: by affinity when routing is affinity and
        there is a key, else the next server round-robin (skipping those down unless all
        are)."""
        if self.routing == "affinity" and key:
            return pick(
                self.engines,
                key,
                down=self._down,
                in_flight=self.in_flight,
                load_guard=self.load_guard,
            )
        for _ in range(len(self.engines)):
            engine = next(self._next)
            if engine not in self._down:
                return engine
        return next(self._next)

    @contextmanager
    def sending(self, engine: str) -> Iterator[None]:
        """Count a request in flight on ``engine`` while the block runs (the load guard)."""
        self.in_flight[engine] += 1
        try:
            yield
        finally:
            self.in_flight[engine] -= 1
