"""``ufcal eval --freeform``: free-form questions, scored once each, four confidences."""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.cli_args import ArgumentError, check_engine_settings, load_settings
from service.config import Settings
from service.evaluation.arguments import FreeformSelection, check_freeform_arguments
from service.evaluation.freeform import (
    FreeformItem,
    arithmetic_items,
    load_freeform_mcqa,
    run_freeform_eval,
)
from service.evaluation.freeform_report import render_freeform_report
from service.evaluation.report import markdown_table, recalibrated, recalibrated_table, summarize
from service.evaluation.results import ResultsFile
from service.evaluation.runner import EvalStats, eval_params
from service.scoring import ScoreParams

__all__ = ["build_judge", "freeform_eval_command", "freeform_items"]


def freeform_items(
    selection: FreeformSelection, limit: int | None, per_subject: int | None, seed: int
) -> list[FreeformItem]:
    """The MCQA files' questions without options, then the ladder's (seeded by ``seed``)."""
    items: list[FreeformItem] = []
    for path, own in selection.paths:
        file_limit = limit if own is None else (None if own == "all" else int(own))
        items += load_freeform_mcqa(path, file_limit, per_subject)
    if selection.arithmetic:
        items += arithmetic_items(selection.levels, selection.per_level, seed)
    return items


def build_judge(name: str, settings: Settings) -> Any:
    """The equivalence judge ``--judge`` names (None: the engine judge, the default)."""
    from service.scoring_freeform import ExactOnlyJudge, NliJudge

    if name == "exact":
        return ExactOnlyJudge()
    if name == "nli":
        return NliJudge.from_settings(settings)
    return None


async def _run(
    args: argparse.Namespace,
    items: list[FreeformItem],
    methods: list[str],
    settings: Settings,
    params: ScoreParams,
) -> tuple[EvalStats, str]:
    from service.engines import build_engine
    from service.scoring import resolve_mode
    from service.scoring_freeform import FreeformContext

    if args.no_run:
        return EvalStats(questions=len(items)), params.mode
    context = FreeformContext(
        template=settings.prompt_template(), judge=build_judge(args.judge, settings)
    )
    engine = await build_engine(settings)
    await engine.start()
    try:
        mode = resolve_mode(params.mode, engine)
        with ResultsFile(args.out) as results:
            stats = await run_freeform_eval(
                items,
                methods,
                engine,
                context,
                params,
                results,
                concurrency=args.concurrency,
                progress=not args.no_progress,
            )
        return stats, mode
    finally:
        await engine.close()


def freeform_eval_command(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """Run (or resume) a free-form evaluation; print the tables; write the report."""
    settings = load_settings()
    selection = check_freeform_arguments(args, settings)
    notes = Path(args.notes).read_text(encoding="utf-8") if args.notes else ""
    try:
        items = freeform_items(selection, args.limit, args.per_subject, args.seed)
    except ValueError as exc:
        raise ArgumentError(f"FILES: {exc}") from None
    if not args.no_run:
        check_engine_settings(settings)
    params = eval_params(args.mode, args.samples, settings)
    started = time.time()
    stats, mode = asyncio.run(_run(args, items, selection.methods, settings, params))
    wanted_modes = {"logprobs", "sampling"} if mode == "auto" else {mode}
    wanted = {(i.dataset, i.id) for i in items}
    rows = [
        r
        for r in ResultsFile(args.out).rows
        if (str(r["dataset"]), str(r["id"])) in wanted
        and r["method"] in selection.methods
        and r["mode"] in wanted_modes
    ]
    datasets = list(dict.fromkeys(i.dataset for i in items))
    summaries = summarize(rows, selection.methods, datasets, args.bins)
    print(markdown_table(summaries), end="")
    recal = [] if args.no_recalibration else recalibrated(summaries, rows, args.bins)
    if recal:
        print("\nRecalibrated (5-fold cross-fitting within each dataset):\n")
        print(recalibrated_table(recal), end="")
    print(
        f"{stats.questions} questions: {stats.skipped} already done, {stats.written} rows "
        f"written ({stats.unscorable} questions unscorable), {stats.failed} failed on the "
        f"engine; {time.time() - started:.0f} s",
        file=sys.stderr,
    )
    for error in stats.errors[:5]:
        print(f"  {error}", file=sys.stderr)
    if args.figures:
        from service.evaluation.report import write_figures

        write_figures(summaries, args.figures)
    if args.report:
        command = "ufcal eval " + shlex.join(list(argv) if argv is not None else sys.argv[2:])
        models = sorted({str(r["model"]) for r in rows if "model" in r})
        engine = "vLLM server " + settings.engine_url if settings.engine_urls else "in-process vLLM"
        setup = [
            f"model: {', '.join(models) or '-'}; engine: {engine}",
            f"K = {params.samples} samples of the brief-answer prompt at T = 1.0, UF mode "
            f"{mode}, tau = {params.tau}, eps = {params.eps}, judge: {args.judge}",
            "questions scored: "
            + ", ".join(
                f"{d} {len({str(r['id']) for r in rows if r['dataset'] == d})} of "
                f"{sum(1 for i in items if i.dataset == d)} selected"
                for d in datasets
            ),
        ]
        report_path = Path(args.report)
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(
            render_freeform_report(command, summaries, rows, setup, recal, notes),
            encoding="utf-8",
        )
    return 1 if stats.failed else 0
