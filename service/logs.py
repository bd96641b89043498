"""JSON log lines for every Python logger of a ufcal process and of the vLLM processes it
starts.

One line is one JSON object: ``timestamp`` (ISO-8601 UTC), ``level``, ``logger``,
``message``, plus ``process`` for a line written by another process than the main one
(vLLM's ``EngineCore``, ``Worker``...) and the fields a line adds (``extra={"fields": ...}``).

vLLM configures its own loggers from a ``dictConfig`` JSON file named by
``VLLM_LOGGING_CONFIG_PATH``, in the API process and again in every engine-core and worker
process (which inherit the environment and get the path in their ``LoggingConfig``).
:func:`configure_logging` writes such a file, pointing at the same formatter, and sets the
variables before vLLM is imported, so no vLLM logger is patched. Lines written by native code
(torch's C++ warnings) bypass Python and stay plain text: see the README's Logs section.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import math
import os
import sys
import tempfile
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any, Literal, TextIO

__all__ = [
    "JsonFormatter",
    "ScoredAccessFilter",
    "configure_logging",
    "json_stream_handler",
    "utc_iso",
    "vllm_logging_config",
]

Stream = Literal["stdout", "stderr"]

#: vLLM's environment hooks (see vllm/envs.py and vllm/logger.py).
VLLM_CONFIG_ENV = "VLLM_LOGGING_CONFIG_PATH"
VLLM_STREAM_ENV = "VLLM_LOGGING_STREAM"

_MAIN_PROCESS = "MainProcess"

#: multiprocessing's resource tracker is a bare interpreter (``python -c ...``) that no
#: logging configuration reaches. At exit it warns, as plain text, about the shared memory
#: and semaphores vLLM's engine processes leave when their shutdown is forced, and then
#: removes them itself. Its command line carries this process's ``-W`` options (as do
#: vLLM's spawned processes), so this filter is the one hook it offers. (``-W`` splits on
#: ":", so the message prefix cannot include the colon that follows it.)
TRACKER_EXIT_WARNING_FILTER = "ignore:resource_tracker:UserWarning:multiprocessing.resource_tracker"


def utc_iso(epoch_s: float) -> str:
    """``epoch_s`` as ISO-8601 UTC with milliseconds, e.g. ``2026-11-28T06:40:50.599Z``."""
    frac, whole = math.modf(epoch_s)  # rounded to microseconds as datetime does
    micros = round(frac * 1e6)
    second, micros = divmod(int(whole) * 1_000_000 + micros, 1_000_000)
    return f"{_utc_second(second)}.{micros // 1000:03d}Z"


@functools.lru_cache(maxsize=4)  # log lines come in bursts within the same second
def _utc_second(second: int) -> str:
    return datetime.fromtimestamp(second, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp (ISO-8601 UTC), level, logger, message, the
    process when it is not the main one, plus the key/values of a ``fields`` dict passed as
    ``extra={"fields": {...}}``. A multi-line message stays one line (JSON escapes it)."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "timestamp": utc_iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        # vLLM's record factory names its processes (EngineCore, Worker, APIServer).
        process = getattr(record, "vllm_process_name", None) or record.processName
        if process and process != _MAIN_PROCESS:
            out["process"] = process
            out["pid"] = record.process
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            out.update(fields)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def json_stream_handler(stream: TextIO | None = None) -> logging.StreamHandler[TextIO]:
    """A stream handler writing :class:`JsonFormatter` lines; it also routes Python warnings
    into logging (``py.warnings``), which a ``dictConfig`` has no key for: vLLM's processes
    build it from the file :func:`configure_logging` writes, so their warnings are JSON too."""
    handler: logging.StreamHandler[TextIO] = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.captureWarnings(True)
    _torch_logs_through_root()
    return handler


def _torch_logs_through_root() -> None:
    """torch gives its registered loggers (``torch``, ``torch._dynamo``...) handlers of its
    own with a plain-text format and stops their propagation, at import. When torch is
    loaded (as it is whenever vLLM applies this configuration), drop those handlers so the
    lines reach the root's JSON handler. torch has no public switch for this."""
    internal = sys.modules.get("torch._logging._internal")
    is_torch_handler = getattr(internal, "_is_torch_handler", None)
    get_loggers = getattr(internal, "get_loggers", None)
    if not callable(is_torch_handler) or not callable(get_loggers):
        return
    for logger in get_loggers():
        for handler in [h for h in logger.handlers if is_torch_handler(h)]:
            logger.removeHandler(handler)
        logger.propagate = True


class ScoredAccessFilter(logging.Filter):
    """Drop uvicorn's access line of a successful ``POST /score``: its "scored" line already
    says the same and more (id, answer, confidence, latency, status), and formatting and
    writing a second line per request was a tenth of the service's CPU under load. Every
    other request, and every /score that failed, keeps its access line."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        # uvicorn: '%s - "%s %s HTTP/%s" %d' % (client, method, path, http_version, status)
        if isinstance(args, tuple) and len(args) == 5:
            return not (args[1] == "POST" and args[2] == "/score" and args[4] == 200)
        return True


def vllm_logging_config(level: str, stream: Stream) -> dict[str, Any]:
    """The ``dictConfig`` vLLM applies in each of its processes: every logger (vLLM's, and
    torch's or transformers' in the engine processes) propagates to the root, whose one
    handler writes JSON lines to ``stream``. Loggers that exist already keep working."""
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "handlers": {
            "ufcal_json": {
                "()": f"{__name__}.json_stream_handler",
                "stream": f"ext://sys.{stream}",
            }
        },
        # vLLM's default config gives "vllm" a handler of its own and stops propagation.
        "loggers": {"vllm": {"handlers": [], "propagate": True, "level": level}},
        "root": {"handlers": ["ufcal_json"], "level": level},
    }


_written_config: str | None = None


def _point_vllm_here(level: str, stream: Stream) -> None:
    """Write the config file and set vLLM's variables, unless the operator set their own
    ``VLLM_LOGGING_CONFIG_PATH`` (then theirs wins)."""
    global _written_config
    own = os.environ.get(VLLM_CONFIG_ENV)
    if own and own != _written_config:
        return
    handle, path = tempfile.mkstemp(prefix="ufcal-vllm-logging-", suffix=".json")
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        json.dump(vllm_logging_config(level, stream), out)
    if _written_config:
        with contextlib.suppress(OSError):
            os.unlink(_written_config)
    else:  # once per process; engine processes read the file while this one runs
        atexit.register(_remove_written_config)
    _written_config = path
    os.environ[VLLM_CONFIG_ENV] = path
    os.environ[VLLM_STREAM_ENV] = f"ext://sys.{stream}"


def _remove_written_config() -> None:
    if _written_config:
        with contextlib.suppress(OSError):
            os.unlink(_written_config)


def log_json_lines(level: str | int, stream: Stream) -> None:
    """The root logger's one handler writes JSON lines to ``stream`` from ``level`` on: the
    part of the set-up that every ufcal process shares (the service and its refit worker)."""
    # No line carries the caller's file, line or thread: skip looking them up for every
    # record (the logging HOWTO's "Optimization"). With the per-second timestamp cache of
    # utc_iso, that gave about 15% more /score per second in the overhead benchmark.
    logging._srcfile = None
    logging.logThreads = False
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(json_stream_handler(getattr(sys, stream)))
    root.setLevel(level)


def configure_logging(level: str = "INFO", stream: Stream = "stdout") -> None:
    """Log JSON lines to ``stream`` from the root logger, for this process and the vLLM
    processes it will start: uvicorn's loggers propagate to the root, Python warnings are
    logged (``py.warnings``), and vLLM is pointed at the same set-up through its
    ``VLLM_LOGGING_CONFIG_PATH`` / ``VLLM_LOGGING_STREAM`` (call this before vLLM is
    imported). ``ufcal serve`` logs to stdout; the data commands log to stderr, keeping
    stdout for their output.

    Start uvicorn with ``log_config=None`` afterwards so it keeps this setup.
    """
    level = level.upper()
    log_json_lines(level, stream)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, ScoredAccessFilter) for f in access.filters):
        access.addFilter(ScoredAccessFilter())
    _point_vllm_here(level, stream)
    if TRACKER_EXIT_WARNING_FILTER not in sys.warnoptions:
        # Only the interpreters started from now on read it (this one parsed its own).
        sys.warnoptions.append(TRACKER_EXIT_WARNING_FILTER)
