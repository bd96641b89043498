"""Calibration metrics for a JSONL file of scored answers (backs ``ufcal metrics``).

Each non-blank line is a JSON object with at least ``confidence`` (a number in [0, 1]) and
``correct`` (``true``/``false``); other fields are ignored. A line with an ``error`` field and
no ``confidence`` (what ``ufcal score`` and ``ufcal eval`` write for a question that could not
be scored) is skipped and counted, not read as a confidence.
"""

from __future__ import annotations

import json
import math
import os
import sys

from service.calibration.metrics import calibration_report

__all__ = ["load_scored_jsonl", "metrics_command"]


def _parse_line(lineno: int, text: str) -> tuple[float, bool] | None:
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"line {lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"line {lineno}: expected a JSON object")
    if "error" in record and "confidence" not in record:
        return None  # an unscorable question
    for field in ("confidence", "correct"):
        if field not in record:
            raise ValueError(f'line {lineno}: missing field "{field}"')
    confidence = record["confidence"]
    if (
        isinstance(confidence, bool)
        or not isinstance(confidence, int | float)
        or not math.isfinite(confidence)
        or not 0.0 <= confidence <= 1.0
    ):
        raise ValueError(f'line {lineno}: "confidence" must be a number in [0, 1]')
    correct = record["correct"]
    if not isinstance(correct, bool):
        raise ValueError(f'line {lineno}: "correct" must be true or false')
    return float(confidence), correct


def load_scored_jsonl(
    path: str | os.PathLike[str], skipped: list[int] | None = None
) -> tuple[list[float], list[bool]]:
    """Read ``confidence`` and ``correct`` from every non-blank line of a JSONL file.

    Lines with ``error`` and no ``confidence`` are skipped; their line numbers are appended
    to ``skipped`` when given. Raises ValueError naming the (1-based) line number and field
    for any bad line, and when the file holds no scored records at all.
    """
    confidences: list[float] = []
    correct: list[bool] = []
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            parsed = _parse_line(lineno, line)
            if parsed is None:
                if skipped is not None:
                    skipped.append(lineno)
                continue
            confidences.append(parsed[0])
            correct.append(parsed[1])
    if not confidences:
        raise ValueError("no scored answers (the file is empty)")
    return confidences, correct


def metrics_command(path: str, n_bins: int) -> int:
    """Print the summary metrics of ``path`` as one JSON object; 0 on success, 2 on error."""
    skipped: list[int] = []
    try:
        confidences, correct = load_scored_jsonl(path, skipped)
    except OSError as exc:
        print(f"error: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {path}: {exc}", file=sys.stderr)
        return 2
    try:
        report = calibration_report(confidences, correct, n_bins=n_bins)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if skipped:
        print(
            f"note: {len(skipped)} unscorable line(s) skipped (error, no confidence)",
            file=sys.stderr,
        )
    print(json.dumps(report.summary()))
    return 0
