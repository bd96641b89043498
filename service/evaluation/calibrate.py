"""``ufcal calibrate RESULTS.jsonl``: fit one calibrator per (model, method, mode, task) of a
results file and write them as a calibrator file (``UFCAL_CALIBRATORS`` loads it).

Each row needs only ``model``, ``method``, ``mode``, ``confidence`` and ``correct``, so any
JSONL in that shape works, not only what ``ufcal eval`` writes; ``task`` (multiple_choice or
free_form) is optional and defaults to multiple_choice. Rows with ``error`` and no
``confidence`` (unscorable questions) are skipped. No engine is started."""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from service.calibration.recalibrate import FitPolicy, FitResult, fit
from service.evaluation.report import metric_cell as _f
from service.recalibration import METHODS, MODES, record_from_fit, write_calibrator_file
from service.store import DEFAULT_TASK, TASKS, CalibratorKey

__all__ = ["calibrate_command", "read_labelled"]


@dataclass
class Labelled:
    """The labelled scores of one key, in file order."""

    scores: list[float]
    correct: list[bool]


class InputError(ValueError):
    """The results file cannot be used; the message names the line and field."""


def _row(lineno: int, text: str) -> tuple[CalibratorKey, float, bool] | None:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InputError(f"line {lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(row, dict):
        raise InputError(f"line {lineno}: expected a JSON object")
    if "confidence" not in row and "error" in row:
        return None  # an unscorable question
    if "correct" not in row:
        return None  # scored but not labelled
    for name in ("model", "method", "mode", "confidence"):
        if name not in row:
            raise InputError(f'line {lineno}: missing field "{name}"')
    for name in ("model", "method", "mode"):
        if not isinstance(row[name], str) or not row[name]:
            raise InputError(f'line {lineno}: "{name}" must be a non-empty string')
    if row["method"] not in METHODS:
        raise InputError(f'line {lineno}: unknown method "{row["method"]}"')
    if row["mode"] not in MODES:
        raise InputError(f'line {lineno}: "mode" must be logprobs or sampling')
    conf = row["confidence"]
    if (
        isinstance(conf, bool)
        or not isinstance(conf, int | float)
        or not math.isfinite(conf)
        or not 0.0 <= conf <= 1.0
    ):
        raise InputError(f'line {lineno}: "confidence" must be a number in [0, 1]')
    if not isinstance(row["correct"], bool):
        raise InputError(f'line {lineno}: "correct" must be true or false')
    task = row.get("task", DEFAULT_TASK)
    if task not in TASKS:
        raise InputError(f'line {lineno}: "task" must be multiple_choice or free_form')
    return (row["model"], row["method"], row["mode"], task), float(conf), row["correct"]


def read_labelled(
    path: Path, method: str | None = None, seen: list[int] | None = None
) -> dict[CalibratorKey, Labelled]:
    """The labelled scores of every key in a results file (``method``: only that one);
    ``seen`` gets the number of non-blank rows read."""
    out: dict[CalibratorKey, Labelled] = {}
    rows = 0
    with path.open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, 1):
            if not line.strip():
                continue
            rows += 1
            parsed = _row(lineno, line)
            if parsed is None or (method is not None and parsed[0][1] != method):
                continue
            key, conf, correct = parsed
            entry = out.setdefault(key, Labelled([], []))
            entry.scores.append(conf)
            entry.correct.append(correct)
    if seen is not None:
        seen.append(rows)
    return out


def _table(results: dict[CalibratorKey, tuple[Labelled, FitResult | None]]) -> str:
    lines = [
        "| model | method | mode | task | labels | right | kind | ECE raw | ECE cal | Brier raw "
        "| Brier cal | log-loss raw | log-loss cal | AUROC raw | AUROC cal |",
        "|---|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (model, method, mode, task), (data, result) in results.items():
        head = (
            f"| {model} | {method} | {mode} | {task} | {len(data.scores)} | {sum(data.correct)} |"
        )
        if result is None:
            lines.append(head + " too few labels: no calibrator | - | - | - | - | - | - | - | - |")
            continue
        b, a = result.before, result.after
        lines.append(
            f"{head} {result.calibrator.kind} | {_f(b['ece'])} | {_f(a['ece'])} | "
            f"{_f(b['brier'])} | {_f(a['brier'])} | {_f(b['log_loss'])} | {_f(a['log_loss'])} | "
            f"{_f(b['auroc'])} | {_f(a['auroc'])} |"
        )
    return "\n".join(lines) + "\n"


def calibrate_command(args: argparse.Namespace) -> int:
    """Check the input, fit, print the before/after table (stdout), write the file.
    Exit 0 when at least one calibrator was written, 1 when no key had enough labels,
    2 on bad arguments or input."""
    path = Path(args.results)
    if args.min_labels < 2 or args.min_class < 2:
        print("error: --min-labels and --min-class must be >= 2", file=sys.stderr)
        return 2
    seen: list[int] = []
    try:
        labelled = read_labelled(path, args.method, seen)
    except OSError as exc:
        print(f"error: cannot read {path}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except InputError as exc:
        print(f"error: {path}: {exc}", file=sys.stderr)
        return 2
    if not labelled:
        which = f" for method {args.method}" if args.method else ""
        print(
            f"error: {path}: no labels{which}: none of its {seen[0] if seen else 0} rows has "
            "both a confidence and 'correct'",
            file=sys.stderr,
        )
        return 2
    policy = FitPolicy(min_labels=args.min_labels, min_class=args.min_class)
    results = {
        key: (data, fit(data.scores, data.correct, policy)) for key, data in labelled.items()
    }
    print(_table(results), end="")
    records = [
        record_from_fit(
            key,
            result,
            version=1,
            window={"n": result.labels, "source": str(path)},
            metrics={"before": result.before, "after": result.after},
            status="active",
        )
        for key, (_, result) in results.items()
        if result is not None
    ]
    if not records:
        print(
            f"error: no (model, method, mode, task) has {args.min_labels} labels with "
            f"{args.min_class} of each class: nothing written",
            file=sys.stderr,
        )
        return 1
    write_calibrator_file(Path(args.out), records)
    print(f"wrote {len(records)} calibrator(s) to {args.out}", file=sys.stderr)
    return 0
