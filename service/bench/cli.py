"""``ufcal bench``: run the variants and the overhead, print the table, write the JSON."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any

from service.bench.report_file import write_report
from service.config import Settings

from .runner import (
    cost_bound_effect,
    format_table,
    freeform_cost,
    load_questions,
    machine,
    prefill_bound,
    ratios,
    run_engine_variants,
    stats_rows,
)


async def _engine_part(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    from service.engines import build_engine

    data = Path(args.data)
    judge = None
    if "f" in args.variants:
        # Free-form against 4-option multiple-choice UF: every variant asks 4-option questions.
        questions = load_questions(data, args.n, options=4)
        if getattr(args, "judge", "engine") != "engine":
            from service.evaluation.freeform_command import build_judge

            judge = build_judge(args.judge, settings)
    else:
        questions = load_questions(data, args.n)
    engine = await build_engine(settings)
    await engine.start()
    sweep: list[dict[str, Any]] = []
    try:
        results = await run_engine_variants(
            engine,
            questions,
            settings.prompt_template(),
            variants=list(args.variants),
            concurrency=args.concurrency,
            samples=args.samples,
            skip_mass=args.skip_mass,
            progress=lambda line: print(line, file=sys.stderr, flush=True),
            judge=judge,
        )
        if getattr(args, "sweep", ""):
            from .sweep import run_sweep

            sweep = await run_sweep(
                engine,
                data.parent,
                settings.prompt_template(),
                option_counts=[int(m) for m in args.sweep.split(",") if m.strip()],
                n=args.sweep_n,
                max_prompts=settings.max_prompts_per_question,
                progress=lambda line: print(line, file=sys.stderr, flush=True),
            )
    finally:
        await engine.close()
    return {
        "sweep": sweep,
        "max_prompts": settings.max_prompts_per_question,
        "engine": ",".join(settings.engine_urls) or "in-process vLLM",
        "model": engine.model,
        "dataset": data.name,
        "n": len(questions),
        "variants": stats_rows(results),
        "ratios": ratios(results),
        "freeform_cost": freeform_cost(results),
        "judge": getattr(args, "judge", "engine"),
        "prefill_bound": prefill_bound(results),
        "skip_mass": args.skip_mass,
        "cost_bound": cost_bound_effect(results),
    }


def bench_command(args: argparse.Namespace, settings: Settings) -> int:
    """Run the benchmark; print the table (stdout); write the JSON report. The arguments
    are checked by the caller (``service.cli``)."""
    started = time.perf_counter()
    report: dict[str, Any] = {
        "engine": "-",
        "model": "-",
        "dataset": "-",
        "n": 0,
        "variants": [],
        "ratios": {},
        "machine": machine(),
        "command": "ufcal " + " ".join(sys.argv[1:]),
    }
    if not args.no_engine:
        report.update(asyncio.run(_engine_part(args, settings)))
    if not args.no_overhead:
        from .overhead import measure_overhead

        print("service overhead ...", file=sys.stderr, flush=True)
        report["overhead"] = measure_overhead(requests=args.overhead_requests)
        if args.overhead_db_url:  # the same load with the store on another database
            print("service overhead on --overhead-db-url ...", file=sys.stderr, flush=True)
            report["overhead"] += measure_overhead(
                requests=args.overhead_requests, db_url=args.overhead_db_url
            )
    report["wall_s"] = round(time.perf_counter() - started, 1)
    out = write_report(report, args.out)
    print(format_table(report))
    if report.get("sweep"):
        from .sweep import format_sweep

        print("\n" + format_sweep(report["sweep"], int(report.get("max_prompts", 0))))
    print(f"\nreport: {out}", file=sys.stderr)
    return 0
