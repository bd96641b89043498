"""The options of ``ufcal eval`` (a light module: building the command line imports no
numerical code)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, cast

from service.cli_args import ArgumentError, at_least, input_file, output_dir, output_file
from service.evaluation.data import split_limit

if TYPE_CHECKING:
    from service.config import Settings
    from service.scoring import Method

__all__ = [
    "DEFAULT_OUT",
    "FreeformSelection",
    "add_eval_arguments",
    "check_eval_arguments",
    "check_freeform_arguments",
]

DEFAULT_OUT = "eval/results.jsonl"
METHOD_NAMES = ("uf", "fidelity", "sampled", "token", "verbalized", "linguistic")
# Kept in step with service.evaluation.freeform (not imported: this module stays light).
ARITHMETIC = "arithmetic"
FREEFORM_CONFIDENCES = ("uf", "fidelity", "largest_share", "semantic_entropy")
JUDGES = ("engine", "exact", "nli")
DEFAULT_PER_LEVEL = 30


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``ufcal eval``."""
    parser.add_argument(
        "files",
        nargs="+",
        help="MCQA JSONL files (a bare name is looked up in --data-dir); FILE:N or FILE:all "
        "overrides --limit for that file. With --freeform, also `arithmetic` (the generated "
        "ladder; arithmetic:N: N questions per rung)",
    )
    parser.add_argument(
        "--methods",
        default=None,
        help=f"comma-separated, from {', '.join(METHOD_NAMES)} (default: all); with "
        f"--freeform from {', '.join(FREEFORM_CONFIDENCES)} (default: all)",
    )
    parser.add_argument(
        "--freeform",
        action="store_true",
        help="ask the questions without their options (the gold text is the reference) and "
        "score them free-form: UF over the sampled answers' groups, beside the largest "
        "group's share and semantic entropy on the same samples",
    )
    parser.add_argument(
        "--levels",
        default=None,
        help="--freeform: comma-separated rungs of the arithmetic ladder (default: all)",
    )
    parser.add_argument(
        "--per-level",
        type=at_least(1),
        default=DEFAULT_PER_LEVEL,
        help=f"--freeform: arithmetic questions per rung (default {DEFAULT_PER_LEVEL})",
    )
    parser.add_argument(
        "--judge",
        choices=JUDGES,
        default="engine",
        help="--freeform: how sampled answers are grouped beyond normalised exact match: "
        "engine (the model judges pairs), exact (no judge), nli (UFCAL_FREEFORM_NLI_MODEL)",
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


def _names(spec: str | None, allowed: Sequence[str], flag: str, what: str) -> list[str]:
    """A comma-separated list of names from ``allowed`` (None: all), without repeats."""
    if spec is None:
        return list(allowed)
    names: list[str] = []
    for name in (m.strip() for m in spec.split(",")):
        if name not in allowed:
            raise ArgumentError(
                f"argument {flag}: unknown {what} {name!r}; choose from {', '.join(allowed)}"
            )
        if name not in names:
            names.append(name)
    return names


def _methods(spec: str | None) -> list[Method]:
    return [cast("Method", m) for m in _names(spec, METHOD_NAMES, "--methods", "method")]


@dataclass(frozen=True)
class FreeformSelection:
    """What a free-form evaluation asks: MCQA files (with their own limits), whether the
    arithmetic ladder is in and its rungs and questions per rung, the confidences."""

    paths: list[tuple[Path, int | str | None]]
    arithmetic: bool
    levels: list[str]
    per_level: int
    methods: list[str]


def check_freeform_arguments(args: argparse.Namespace, settings: Settings) -> FreeformSelection:
    """The free-form evaluation's selection, after checking what it needs: the files, the
    rungs (names of ``arithmetic.LEVELS``), the confidences and the judge."""
    from service.evaluation.arithmetic import DEFAULT_LEVELS, LEVELS  # pure, no numerics

    data_dir = Path(args.data_dir) if args.data_dir else settings.data_dir
    arithmetic = False
    per_level = args.per_level
    files = []
    for spec in args.files:
        name, own = split_limit(spec)
        if name == ARITHMETIC:
            arithmetic = True
            if own == "all":
                raise ArgumentError("FILES: arithmetic:N takes a number of questions per rung")
            if own is not None:
                if int(own) < 1:
                    raise ArgumentError("FILES: arithmetic:N needs N >= 1")
                per_level = int(own)
        else:
            files.append(spec)
    paths = _resolve(files, data_dir)
    levels = _names(args.levels, tuple(LEVELS), "--levels", "rung") if args.levels else []
    if args.levels and not arithmetic:
        raise ArgumentError("argument --levels: only with `arithmetic` among the FILES")
    methods = _names(args.methods, FREEFORM_CONFIDENCES, "--methods", "free-form confidence")
    if args.judge == "nli" and settings.freeform_nli_model is None:
        raise ArgumentError("argument --judge: nli needs UFCAL_FREEFORM_NLI_MODEL (a local folder)")
    return FreeformSelection(paths, arithmetic, levels or list(DEFAULT_LEVELS), per_level, methods)


def check_eval_arguments(
    args: argparse.Namespace, settings: Settings
) -> tuple[list[tuple[Path, int | str | None]], list[Method]]:
    """The MCQA files (with their own limits) and the methods, after checking every path
    and number the evaluation will need: :class:`ArgumentError` names the first bad one.
    With ``--freeform`` the free-form selection is checked too (and its files returned,
    the arithmetic ladder left out; its methods are not multiple-choice ones: [])."""
    data_dir = Path(args.data_dir) if args.data_dir else settings.data_dir
    methods: list[Method] = []
    if args.freeform:
        paths = check_freeform_arguments(args, settings).paths
    else:
        for flag in ("levels", "judge"):
            if getattr(args, flag) != {"levels": None, "judge": "engine"}[flag]:
                raise ArgumentError(f"argument --{flag}: only with --freeform")
        if any(split_limit(spec)[0] == ARITHMETIC for spec in args.files):
            raise ArgumentError("FILES: arithmetic is a free-form dataset (add --freeform)")
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
