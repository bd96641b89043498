"""The options of ``ufcal eval`` (a light module: building the command line imports no
numerical code)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, cast

from service.cli_args import ArgumentError, at_least, input_file, output_dir, output_file
from service.evaluation.data import split_limit

if TYPE_CHECKING:
    from service.config import Settings
    from service.scoring import Method

__all__ = ["DEFAULT_OUT", "add_eval_arguments", "check_eval_arguments"]

DEFAULT_OUT = "eval/results.jsonl"
METHOD_NAMES = ("uf", "fidelity", "sampled", "token", "verbalized", "linguistic")


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``ufcal eval``."""
    parser.add_argument(
        "files",
        nargs="+",
        help="MCQA JSONL files (a bare name is looked up in --data-dir); FILE:N or FILE:all "
        "overrides --limit for that file",
    )
    parser.add_argument(
        "--methods",
        default=",".join(METHOD_NAMES),
        help=f"comma-separated, from {', '.join(METHOD_NAMES)} (default: all)",
    )
    parser.add_argument("--mode", choices=["auto", "logprobs", "sampling"], default=None)
    parser.add_argument(
        "--limit", type=at_least(1), default=None, help="first N questions per file"
    )
    parser.add_argument(
        "--per-subject",
        type=at_least(1),
        default=None,
        help="first N questions per subject (MMLU)",
    )
    parser.add_argument("--seed", type=int, default=0, help="option permutation seed")
    parser.add_argument(
        "--samples", type=at_least(1), default=None, help="K (default UFCAL_SAMPLES)"
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help="append-only results JSONL")
    parser.add_argument("--figures", default=None, help="write reliability PNGs here")
    parser.add_argument("--report", default=None, help="write a Markdown report here")
    parser.add_argument(
        "--notes", default=None, help="Markdown file included in the report as its notes"
    )
    parser.add_argument("--concurrency", type=at_least(1), default=16, help="questions in flight")
    parser.add_argument("--data-dir", default=None, help="default: UFCAL_DATA_DIR")
    parser.add_argument("--bins", type=at_least(1), default=10, help="bins of ECE, IPR, CE")
    parser.add_argument(
        "--no-run",
        action="store_true",
        help="only summarise what the results file holds (no engine is started; every mode "
        "in the file is reported unless --mode names one)",
    )
    parser.add_argument(
        "--no-recalibration",
        action="store_true",
        help="skip the cross-fitted and transfer recalibration tables",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _resolve(files: Sequence[str], data_dir: Path) -> list[tuple[Path, int | str | None]]:
    paths: list[tuple[Path, int | str | None]] = []
    for spec in files:
        name, own = split_limit(spec)
        path = Path(name)
        if not path.exists() and not path.is_absolute() and (data_dir / name).exists():
            path = data_dir / name
        if not path.exists():
            raise ArgumentError(f"FILES: no such MCQA file: {name} (looked in . and {data_dir})")
        paths.append((input_file(path, "FILES"), own))
    return paths


def _methods(spec: str) -> list[Method]:
    methods: list[Method] = []
    for name in (m.strip() for m in spec.split(",")):
        if name not in METHOD_NAMES:
            raise ArgumentError(
                f"argument --methods: unknown method {name!r}; "
                f"choose from {', '.join(METHOD_NAMES)}"
            )
        if name not in methods:
            methods.append(cast("Method", name))
    return methods


def check_eval_arguments(
    args: argparse.Namespace, settings: Settings
) -> tuple[list[tuple[Path, int | str | None]], list[Method]]:
    """The MCQA files (with their own limits) and the methods, after checking every path
    and number the evaluation will need: :class:`ArgumentError` names the first bad one."""
    data_dir = Path(args.data_dir) if args.data_dir else settings.data_dir
    paths = _resolve(args.files, data_dir)
    methods = _methods(args.methods)
    if args.samples is not None and args.samples > settings.max_samples:
        raise ArgumentError(f"argument --samples: must be <= {settings.max_samples}")
    output_file(args.out, "--out")
    if args.figures:
        output_dir(args.figures, "--figures")
    if args.report:
        output_file(args.report, "--report")
    if args.notes:
        input_file(args.notes, "--notes")
    return paths, methods
