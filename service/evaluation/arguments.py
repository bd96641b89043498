"""The options of ``ufcal eval`` (a light module: building the command line imports no
numerical code)."""

from __future__ import annotations

import argparse

from service.cli_args import at_least

__all__ = ["DEFAULT_OUT", "add_eval_arguments"]

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
        "--no-run", action="store_true", help="only summarise what the results file holds"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
