"""Watch the engine: keep ``ufcal_engine_up`` current, and when the in-process engine has
died, stop the service with a non-zero exit code so that the orchestrator restarts it.

A remote engine (vLLM's server) that goes away is not fatal: its requests get 503, the
gauge drops to 0, and the service recovers by itself when the server comes back."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from service.api.common import AppState

log = logging.getLogger("ufcal")

EXIT_ENGINE_DIED = 3


def engine_dead(state: AppState) -> bool:
    """True once an engine that cannot recover (in-process vLLM) has died."""
    return bool(getattr(state.engine, "dead", False))


async def watch_engine(state: AppState, interval_s: float, on_fatal: Callable[[int], None]) -> None:
    """Probe the engine every ``interval_s``; call ``on_fatal(exit_code)`` once if it died."""
    while True:
        await asyncio.sleep(interval_s)
        engine = state.engine
        if engine is None:
            continue
        if engine_dead(state):
            state.engine_error = "the in-process engine died; the service is restarting"
            state.telemetry.set_engine_up(False)
            log.error("engine died: exiting with code %d for a restart", EXIT_ENGINE_DIED)
            on_fatal(EXIT_ENGINE_DIED)
            return
        try:
            up = await asyncio.wait_for(engine.ready(), timeout=max(interval_s, 2.0))
        except Exception:
            up = False
        state.telemetry.set_engine_up(up)
