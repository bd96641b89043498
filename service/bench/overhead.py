"""The service's own overhead: /score through a real uvicorn with an engine that answers
instantly, so what is measured is HTTP, validation, scoring logic, metrics and logging."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import httpx
from fastapi import FastAPI

from service.calibration.prompts import Prompt
from service.config import Settings
from service.engines.base import Generation, GenerationParams, LetterRead, TokenCounts

#: How long the instant-engine server may take to start (imports alone take 20 s and more
#: on a busy machine).
START_TIMEOUT_S = 120.0
QUESTION = {
    "question": "Which gas do plants take from the air for photosynthesis?",
    "options": ["Oxygen", "Carbon dioxide", "Nitrogen", "Helium"],
}


class InstantEngine:
    """Answers at once: P = (0.2, 0.6, 0.15, 0.05) and every chain stays with its start,
    so one /score is 1 read plus one batch of 4 chain prompts, like a real question."""

    _FIRST: ClassVar[dict[str, float]] = {"A": -1.609, "B": -0.511, "C": -1.897, "D": -2.996}

    @property
    def model(self) -> str:
        return "instant"

    @property
    def supports_letter_logprobs(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    async def ready(self) -> bool:
        return True

    async def read_letters(
        self, prompts: Sequence[Prompt], labels: Sequence[Sequence[str]]
    ) -> list[LetterRead]:
        reads = []
        for prompt, wanted in zip(prompts, labels, strict=True):
            if "All other options are wrong." in prompt.user:
                start = prompt.user.split("All other options are wrong.")[0][-3]
                logprobs = {label: (0.0 if label == start else -5.0) for label in wanted}
            else:
                logprobs = {label: self._FIRST.get(label, -9.0) for label in wanted}
            reads.append(LetterRead(logprobs, prompt_tokens=60))
        return reads

    async def generate(
        self, prompts: Sequence[Prompt], params: Sequence[GenerationParams]
    ) -> list[Generation]:
        return [Generation([" B"] * p.n, 60, p.n) for p in params]

    async def count_tokens(self, prompts: Sequence[Prompt]) -> TokenCounts:
        return TokenCounts([60] * len(prompts), 4096)

    async def close(self) -> None:
        return None


def instant_app() -> FastAPI:
    """The real app over the instant engine."""
    from service.api.app import create_app

    return create_app(Settings(), engine=InstantEngine())


def serve_instant(port: int) -> int:
    """Serve ``instant_app`` the way ``ufcal serve`` serves the real one: the same uvicorn
    set-up and the same JSON log lines (configured level, access log included)."""
    from service.logs import configure_logging
    from service.server import run_server

    settings = Settings()
    configure_logging(settings.log_level)
    return run_server(instant_app(), settings, "127.0.0.1", port)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def split_cores() -> tuple[set[int], set[int]] | None:
    """(server cores, client cores) on a machine with at least two usable cores: the
    server gets one core and the load generator the others, so that the client's CPU is
    not taken from the service being measured (as when the client runs elsewhere)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    cores = sorted(os.sched_getaffinity(0))
    if len(cores) < 2:
        return None
    return {cores[0]}, set(cores[1:])


@contextlib.contextmanager
def instant_server(cores: set[int] | None = None, env: dict[str, str] | None = None) -> Any:
    """Run ``serve_instant`` in a subprocess (on ``cores`` if given, with ``env`` over the
    environment); yield its base URL."""
    port = free_port()
    # A throwaway database: the store's writes are part of the overhead, its rows are not
    # worth keeping.
    db_dir = tempfile.mkdtemp(prefix="ufcal-bench-")
    env = {**os.environ, "UFCAL_DB_PATH": os.path.join(db_dir, "bench.db"), **(env or {})}
    # The log lines are formatted and written as in production, then dropped.
    process = subprocess.Popen(  # noqa: S603 # fixed argv: this interpreter, our module
        [sys.executable, "-m", "service.bench.overhead", str(port)],
        env=env,
        # set before exec, so that every thread of the server inherits it
        preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                    break
            time.sleep(0.2)
        else:
            raise RuntimeError("the instant-engine server did not start")
        yield url
    finally:
        process.terminate()
        process.wait(10)
        shutil.rmtree(db_dir, ignore_errors=True)


async def load(url: str, concurrency: int, requests: int) -> dict[str, Any]:
    """Send ``requests`` POST /score with ``concurrency`` in flight; latency and rate.

    The client is aiohttp: measured here, httpx's connection pool spent more CPU than the
    server at 64 connections (181 req/s with httpx against 1010 with aiohttp, same server)."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    remaining = iter(range(requests))
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(url, connector=connector) as session:

        async def worker() -> None:
            nonlocal errors
            for _ in remaining:
                started = time.perf_counter()
                async with session.post("/score", json=QUESTION) as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
                latencies.append((time.perf_counter() - started) * 1000.0)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q / 100 * len(latencies)))]

    return {
        "concurrency": concurrency,
        "requests": requests,
        "wall_s": round(wall, 3),
        "requests_per_s": round(requests / wall, 1),
        "p50_ms": round(pct(50), 2),
        "p99_ms": round(pct(99), 2),
        "errors": errors,
    }


def measure_overhead(
    concurrencies: Sequence[int] = (1, 8, 64), requests: int = 2000, db_url: str | None = None
) -> list[dict[str, Any]]:
    """The overhead table: one row per concurrency (server and client on separate cores
    where the machine has two or more), with the store on SQLite or on ``db_url``."""
    split = split_cores()
    env = {"UFCAL_DB_URL": db_url} if db_url else None
    with instant_server(split[0] if split else None, env) as url:
        mine = os.sched_getaffinity(0) if split else None
        if split:
            os.sched_setaffinity(0, split[1])
        try:
            asyncio.run(load(url, 8, 200))  # warm-up
            rows = [asyncio.run(load(url, c, requests)) for c in concurrencies]
        finally:
            if mine is not None:
                os.sched_setaffinity(0, mine)
    store = "sqlite" if not db_url else db_url.split(":", 1)[0].split("+", 1)[0]
    for row in rows:
        row["store"] = store
        row["server_cores"] = sorted(split[0]) if split else "shared"
        row["client_cores"] = sorted(split[1]) if split else "shared"
    return rows


if __name__ == "__main__":
    sys.exit(serve_instant(int(sys.argv[1])))
