"""The append-only per-question results file of ``ufcal eval``.

One JSON object per line and per (dataset, question id, method, mode): the key. Each line is
written and flushed as soon as its question is scored, so an interrupted run loses at most
the questions in flight; a torn last line (the process died mid-write) is cut off when the
file is opened again, and the rerun scores only the keys not yet in the file."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = ["Key", "ResultsFile", "read_rows", "row_key"]

Key = tuple[str, str, str, str]


def row_key(row: dict[str, Any]) -> Key:
    """(dataset, id, method, mode) of a result row."""
    return (str(row["dataset"]), str(row["id"]), str(row["method"]), str(row["mode"]))


def _good_lines(path: Path) -> tuple[list[dict[str, Any]], int]:
    """The parsed complete rows and the byte length of the file up to the last good one."""
    rows: list[dict[str, Any]] = []
    good_end = 0
    with path.open("rb") as handle:
        data = handle.read()
    offset = 0
    for raw in data.splitlines(keepends=True):
        end = offset + len(raw)
        offset = end
        if not raw.endswith(b"\n"):
            break  # torn last line
        text = raw.strip()
        if not text:
            good_end = end
            continue
        try:
            row = json.loads(text)
            row_key(row)
        except (ValueError, KeyError, TypeError):
            if end == len(data):
                break  # a damaged last line: drop it
            raise ValueError(f"{path}: a damaged line in the middle of the file") from None
        rows.append(row)
        good_end = end
    return rows, good_end


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Every complete row of a results file (a torn last line is ignored)."""
    path = Path(path)
    if not path.exists():
        return []
    return _good_lines(path)[0]


class ResultsFile:
    """Open a results file for appending; ``done`` holds the keys already in it."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows: list[dict[str, Any]] = []
        if self.path.exists():
            self.rows, good_end = _good_lines(self.path)
            if good_end < self.path.stat().st_size:
                with self.path.open("r+b") as handle:
                    handle.truncate(good_end)
        self.done: set[Key] = {row_key(r) for r in self.rows}
        self._handle: IO[str] | None = None

    def __enter__(self) -> ResultsFile:
        self._handle = self.path.open("a", encoding="utf-8")
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def append(self, row: dict[str, Any]) -> None:
        """Write one row and flush it to the OS; a key already present is not written twice."""
        key = row_key(row)
        if key in self.done:
            return
        if self._handle is None:
            raise ValueError("results file is not open")
        self._handle.write(json.dumps(row, ensure_ascii=False) + "\n")
        self._handle.flush()
        os.fsync(self._handle.fileno())
        self.done.add(key)
        self.rows.append(row)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)
