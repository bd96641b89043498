"""Stdout carries only a command's data (JSONL, the JSON report, the table).

:func:`stdout_for_data` points file descriptor 1 at stderr for the time of the command, so
whatever else would reach stdout (a library's ``print``, native code, vLLM's engine
processes, which inherit the descriptors) lands on stderr, and gives Python's ``sys.stdout``
a stream of its own on the original stdout: the command's ``print`` calls still write data
there, and only they do."""

from __future__ import annotations

import contextlib
import io
import os
import sys
from collections.abc import Iterator
from typing import TextIO

__all__ = ["stdout_for_data"]


def _fileno(stream: TextIO) -> int | None:
    try:
        return stream.fileno()
    except (AttributeError, OSError, io.UnsupportedOperation):
        return None  # a test's capture object: no descriptor to move


@contextlib.contextmanager
def stdout_for_data() -> Iterator[TextIO]:
    """Run the body with fd 1 on stderr and ``sys.stdout`` on the real stdout; yield it."""
    out_fd, err_fd = _fileno(sys.stdout), _fileno(sys.stderr)
    if out_fd is None or err_fd is None or out_fd == err_fd:
        yield sys.stdout
        return
    sys.stdout.flush()
    saved = os.dup(out_fd)  # not inheritable: child processes never write data
    data = open(  # noqa: SIM115 - closed below, after the descriptor is restored
        saved, "w", encoding=sys.stdout.encoding, errors="strict", buffering=1, closefd=False
    )
    original = sys.stdout
    os.dup2(err_fd, out_fd)
    sys.stdout = data
    try:
        yield data
    finally:
        with contextlib.suppress(OSError, ValueError):
            data.flush()
        sys.stdout = original
        os.dup2(saved, out_fd)
        data.close()
        os.close(saved)
