"""``ufcal serve`` as a child process for the benchmarks that measure the whole service
(burst, prediction): default settings, a scratch store, stopped and cleaned up after."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

from service.bench.overhead import free_port


async def wait_ready(base: str, timeout_s: float, process: subprocess.Popen[bytes]) -> None:
    """Poll /readyz until it answers 200; fail if the process exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(base_url=base, timeout=5) as client:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"ufcal serve exited with {process.returncode}")
            try:
                if (await client.get("/readyz")).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(1.0)
    raise RuntimeError(f"ufcal serve not ready after {timeout_s} s")


@contextlib.contextmanager
def serve_process(name: str, start_timeout_s: float) -> Iterator[str]:
    """A fresh ``ufcal serve`` (default settings, its store in a scratch folder, logs at
    warning), ready; yields its base URL and stops it (and its vLLM children) after."""
    port = free_port()
    scratch = tempfile.mkdtemp(prefix=f"ufcal-{name}-")
    env = {
        **os.environ,
        "UFCAL_LOG_LEVEL": "warning",
        "UFCAL_DB_PATH": str(Path(scratch) / "ufcal.db"),
    }
    server = subprocess.Popen(  # noqa: S603 # fixed argv: this interpreter, our module
        [sys.executable, "-m", "service.cli", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        asyncio.run(wait_ready(base, start_timeout_s, server))
        yield base
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(60)
        shutil.rmtree(scratch, ignore_errors=True)
