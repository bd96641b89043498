"""``ufcal eval``: wire the data, the engine, the runner and the report together."""

from __future__ import annotations

import argparse
import asyncio
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from service.cli_args import (
    ArgumentError,
    check_engine_settings,
    load_settings,
)
from service.config import Settings
from service.evaluation.arguments import add_eval_arguments, check_eval_arguments
from service.evaluation.data import Item, load_selection
from service.evaluation.report import (
    GroupSummary,
    Recalibrated,
    Transfer,
    budget_table,
    figure_name,
    markdown_table,
    recalibrated,
    recalibrated_table,
    summarize,
    transfer_tables,
    transfers,
    write_figures,
)
from service.evaluation.results import ResultsFile, row_key
from service.evaluation.runner import EvalStats, eval_params, run_eval
from service.scoring import Method, ScoreParams, method_mode

__all__ = ["add_eval_arguments", "eval_command"]


def wall_time_s(rows: Sequence[dict[str, Any]]) -> float:
    """Summed wall time of the runs that wrote ``rows`` (from each run's start to its last
    row), so that a resumed evaluation counts every part it took."""
    spans: dict[str, tuple[float, float]] = {}
    for row in rows:
        run = str(row.get("run", ""))
        start = float(row.get("run_started", row.get("finished", 0.0)))
        end = float(row.get("finished", start))
        lo, hi = spans.get(run, (start, end))
        spans[run] = (min(lo, start), max(hi, end))
    return sum(hi - lo for lo, hi in spans.values())


def _parse_lines(
    summaries: Sequence[GroupSummary], rows: Sequence[dict[str, Any]], k: int
) -> list[str]:
    """Replies asked and unparsed per (dataset, method, mode)."""
    lines = [
        "| dataset | method | mode | replies | unparsed | parse rate |",
        "|---|---|---|---:|---:|---:|",
    ]
    for s in summaries:
        group = [
            r
            for r in rows
            if (r["dataset"], r["method"], r["mode"]) == (s.dataset, s.method, s.mode)
        ]
        if s.method in ("verbalized", "linguistic"):
            asked = len(group)  # one stated confidence per question
            bad = sum(1 for r in group if "error" in r)
        elif s.mode == "sampling":
            # K samples in step 1, then one reply per chain step.
            asked = sum(int((r.get("usage") or {}).get("prompts", 1)) - 1 + k for r in group)
            bad = sum(int((r.get("usage") or {}).get("unparsed", 0)) for r in group)
        else:
            continue
        rate = 1 - bad / asked if asked else 0.0
        lines.append(f"| {s.dataset} | {s.method} | {s.mode} | {asked} | {bad} | {rate:.3f} |")
    return lines


def render_report(
    command: str,
    summaries: Sequence[GroupSummary],
    rows: Sequence[dict[str, Any]],
    items: Sequence[Item],
    settings: Settings,
    params: ScoreParams,
    figures: Path | None,
    report_path: Path,
    notes: str = "",
    recal: Sequence[Recalibrated] = (),
    transfer: Sequence[Transfer] = (),
) -> str:
    """The Markdown report: command, set-up, wall time, table, parse rates, diagrams."""
    # Questions with rows in the file (a run stopped early, or --no-run over part of the
    # selection, reports what was scored, not what was asked for).
    scored = {(str(r["dataset"]), str(r["id"])) for r in rows}
    per_dataset: dict[str, int] = {}
    for item in items:
        if (item.dataset, item.id) in scored:
            per_dataset[item.dataset] = per_dataset.get(item.dataset, 0) + 1
    models = sorted({str(r["model"]) for r in rows if "model" in r})
    wall = wall_time_s(rows)
    out = [
        "# Calibration results",
        "",
        "Produced by (from the repository root; the data in `../shared/data/mcqa/`):",
        "",
        "```sh",
        command,
        "```",
        "",
        f"- model: {', '.join(models) or '-'}; engine: "
        f"{'vLLM server ' + settings.engine_url if settings.engine_urls else 'in-process vLLM'}",
        f"- questions: {', '.join(f'{d} {n}' for d, n in per_dataset.items())}; options "
        "permuted with a fixed seed",
        f"- K = {params.samples} samples at T = {params.temperature} (sampled), tau = "
        f"{params.tau}, eps = {params.eps}, requested mode {params.mode}",
        f"- wall time: {wall / 60:.1f} min ({wall:.0f} s) summed over the runs that wrote "
        f"these {len(rows)} rows, on this machine",
        "",
        *([notes.strip(), ""] if notes.strip() else []),
        "## Metrics",
        "",
        "ECE, IPR, CE over 10 equal-width bins (see `docs/uf-calibration.md`). `n` counts "
        "the questions with a confidence; `unscorable` those where the model named no option "
        "or stated no confidence (left out of the metrics, never given a made-up one). "
        "`prompts/q` is the engine prompts each method needs for a question alone.",
        "",
        markdown_table(summaries),
        "## Parse rates",
        "",
        "Replies that had to be parsed and how many did not parse.",
        "",
        *_parse_lines(summaries, rows, params.samples),
        "",
        "## Work budget",
        "",
        "Questions whose chains the work budget (UFCAL_MAX_PROMPTS_PER_QUESTION) bound: "
        "chain starts dropped (the least likely first) or chains cut. A 4-option question "
        "needs at most 13 prompts, so a budget of 13 or more never binds it.",
        "",
        budget_table(summaries, params.max_prompts),
    ]
    if recal:
        out += [
            "## Recalibrated (5-fold cross-fitting within each dataset)",
            "",
            "Each row's recalibrated confidence comes from a calibrator (Platt, beta or "
            "isotonic, chosen by cross-validated log-loss, as `ufcal calibrate` and the "
            "online refits do) fitted on the other four fifths of the same dataset and "
            "method, never on the row itself. A calibrator is monotone, so AUROC moves only "
            "by the ties it makes; `≈ base rate` marks a recalibrated confidence that hardly "
            "varies: the raw score carries no usable signal and the calibrator returns the "
            "dataset's accuracy.",
            "",
            recalibrated_table(recal),
        ]
    if transfer:
        out += [
            "## Transfer (fit on one dataset, apply to another)",
            "",
            "A calibrator fitted on all of one dataset's rows, applied to each other "
            "dataset's rows of the same method and mode: on how many of the ordered pairs it "
            "lowered ECE and Brier, then every pair for UF.",
            "",
            transfer_tables(transfer),
        ]
    if figures is not None:
        out += [
            "## Reliability diagrams",
            "",
            "Accuracy per confidence bin (bars, bin count on top) against the diagonal.",
            "",
        ]
        try:
            rel = figures.resolve().relative_to(report_path.resolve().parent)
        except ValueError:
            rel = figures.resolve()
        for s in summaries:
            out.append(f"![{s.dataset} {s.method}]({rel.as_posix()}/{figure_name(s)})")
        out.append("")
    return "\n".join(out)


def _file_modes(method: Method, requested: str) -> set[str]:
    """The modes of a method's rows that ``--no-run`` reports (no engine to resolve auto)."""
    if method == "sampled":
        return {"sampling"}
    if method == "token":
        return {"logprobs"}
    return {"logprobs", "sampling"} if requested == "auto" else {requested}


async def _run(
    args: argparse.Namespace,
    items: list[Item],
    methods: list[Method],
    settings: Settings,
    params: ScoreParams,
) -> tuple[EvalStats, dict[Method, set[str]]]:
    if args.no_run:
        return EvalStats(questions=len(items)), {m: _file_modes(m, params.mode) for m in methods}
    from service.engines import build_engine

    engine = await build_engine(settings)
    await engine.start()
    try:
        modes: dict[Method, set[str]] = {m: {method_mode(m, params.mode, engine)} for m in methods}
        with ResultsFile(args.out) as results:
            stats = await run_eval(
                items,
                methods,
                engine,
                settings.prompt_template(),
                params,
                results,
                concurrency=args.concurrency,
                progress=not args.no_progress,
            )
        return stats, modes
    finally:
        await engine.close()


def eval_command(args: argparse.Namespace, argv: Sequence[str] | None = None) -> int:
    """Run (or resume) the evaluation, then print the table (stdout) and write figures and
    report. Arguments, files and settings are checked before the engine starts."""
    if args.freeform:
        from service.evaluation.freeform_command import freeform_eval_command

        return freeform_eval_command(args, argv)
    settings = load_settings()
    paths, methods = check_eval_arguments(args, settings)
    notes = Path(args.notes).read_text(encoding="utf-8") if args.notes else ""
    try:
        items = load_selection(paths, args.limit, args.per_subject, args.seed)
    except ValueError as exc:
        raise ArgumentError(f"FILES: {exc}") from None
    if not args.no_run:  # --no-run only reads the results file
        check_engine_settings(settings)
    params = eval_params(args.mode, args.samples, settings)
    started = time.time()
    stats, modes = asyncio.run(_run(args, items, methods, settings, params))
    wanted = {(i.dataset, i.id, m, mode) for i in items for m in methods for mode in modes[m]}
    rows = [r for r in ResultsFile(args.out).rows if row_key(r) in wanted]
    summaries = summarize(rows, methods, list(dict.fromkeys(i.dataset for i in items)), args.bins)
    print(markdown_table(summaries), end="")
    recal: list[Recalibrated] = []
    transfer: list[Transfer] = []
    if not args.no_recalibration:
        recal = recalibrated(summaries, rows, args.bins)
        transfer = transfers(
            rows, methods, list(dict.fromkeys(s.dataset for s in summaries)), args.bins
        )
        print("\nRecalibrated (5-fold cross-fitting within each dataset):\n")
        print(recalibrated_table(recal), end="")
        print("\nTransfer (fit on one dataset, apply to another):\n")
        print(transfer_tables(transfer), end="")
    print(
        f"{stats.questions} questions: {stats.skipped} already done, {stats.written} rows "
        f"written ({stats.unscorable} unscorable), {stats.failed} failed on the engine; "
        f"{time.time() - started:.0f} s",
        file=sys.stderr,
    )
    for error in stats.errors[:5]:
        print(f"  {error}", file=sys.stderr)
    for s in summaries:
        if s.method in ("uf", "fidelity") and s.rows:
            print(
                f"work budget ({params.max_prompts or 'none'}) bound {s.budget_hits} of "
                f"{s.rows} {s.dataset} {s.method} questions",
                file=sys.stderr,
            )
    figures = Path(args.figures) if args.figures else None
    if figures is not None:
        write_figures(summaries, figures)
    if args.report:
        report_path = Path(args.report)
        command = "ufcal eval " + shlex.join(list(argv) if argv is not None else sys.argv[2:])
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(
            render_report(
                command,
                summaries,
                rows,
                items,
                settings,
                params,
                figures,
                report_path,
                notes,
                recal,
                transfer,
            ),
            encoding="utf-8",
        )
    return 1 if stats.failed else 0
