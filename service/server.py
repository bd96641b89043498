"""Server start-up: serve an app with uvicorn the way ``ufcal serve`` does.

Its own module so that both the CLI and the benchmark's instant-engine server use it
without importing each other."""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
from typing import Any

from service.config import Settings

__all__ = ["run_server", "serve"]


def serve(settings: Settings, host: str, port: int) -> int:
    """Configure the JSON logs, build the app on the configured engine and serve it."""
    from service.api.app import create_app
    from service.logs import configure_logging

    configure_logging(settings.log_level)
    return run_server(create_app(settings), settings, host, port)


def run_server(app: Any, settings: Settings, host: str, port: int) -> int:
    """Serve ``app`` until SIGTERM/SIGINT: stop accepting, let in-flight requests finish
    within ``UFCAL_SHUTDOWN_GRACE_S``, then exit 0; or exit non-zero when the app asks for
    it (the in-process engine died, so the orchestrator should restart the service)."""
    import uvicorn

    from service.api.connections import server_options

    server = uvicorn.Server(
        uvicorn.Config(
            app,
            host=host,
            port=port,
            **server_options(settings),  # bounds on slow and idle clients
            log_level=settings.log_level,
            log_config=None,  # keep the JSON log lines configured by service.logs
            timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s),
        )
    )

    def request_shutdown() -> None:  # the same path as SIGTERM: drain, then stop
        server.should_exit = True

    app.state.request_shutdown = request_shutdown
    # uvicorn re-raises the signal it caught once it has drained; with these handlers that
    # ends here (exit 0) instead of killing the process by the default SIGTERM action.
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    server.run()
    code = int(getattr(app.state.ufcal, "exit_code", 0) or 0)
    if code:  # the engine died: its leftover threads would hold the exit for seconds
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code
