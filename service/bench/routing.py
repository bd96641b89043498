"""Affinity against round-robin routing over several vLLM servers, in one run.

The same questions are scored with UF (``--mode``, logprobs by default) through the HTTP
engine twice, once per routing, each time after emptying every server's prefix cache. Each
server's own counters (its /metrics) give the prompt tokens it computed and those its
prefix cache served, and the requests it finished (the balance)::

    python -m service.bench.routing --engine-url http://127.0.0.1:8301,http://127.0.0.1:8302 \\
        --n 50 --out reports/routing.json

The servers need ``VLLM_SERVER_DEV_MODE=1`` (the cache reset); without it the second
routing would find the first's prompts cached.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from service.bench.report_file import write_report
from service.calibration.prompts import PromptTemplate, Question
from service.config import Settings
from service.engines.base import Engine
from service.engines.routing import ROUTINGS, Routing
from service.scoring import ScoreParams, Usage, score

from .runner import WARMUP, load_questions, machine, reset_prefix_cache, run_variant

ServerTotals = dict[str, dict[str, float]]


@runtime_checkable
class ServerCounters(Protocol):
    """An engine over several servers that reports each server's own running totals."""

    async def server_counters(self) -> ServerTotals | None:
        """``{server: {"computed": ..., "cached": ..., "requests": ...}}`` or None."""
        ...


async def _counters(engine: Engine) -> ServerTotals | None:
    if not isinstance(engine, ServerCounters):
        return None
    try:
        return await engine.server_counters()
    except Exception:  # a benchmark aid, never a reason to fail the run
        return None


def _delta(before: ServerTotals | None, after: ServerTotals | None) -> ServerTotals | None:
    if before is None or after is None:
        return None
    return {
        server: {name: after[server][name] - before[server][name] for name in after[server]}
        for server in after
    }


async def measure_routing(
    engine: Engine,
    questions: Sequence[Question],
    template: PromptTemplate,
    *,
    mode: str = "logprobs",
    concurrency: int = 32,
) -> dict[str, Any]:
    """Score ``questions`` over ``engine`` from a cold prefix cache; what it cost, in total
    and per server."""

    async def uf(question: Question) -> tuple[Usage, float]:
        params = ScoreParams(mode=mode)  # type: ignore[arg-type]
        result = await score(question, engine, params, template)
        return result.usage, result.confidence

    cold = await reset_prefix_cache(engine)
    before = await _counters(engine)
    stats = await run_variant("b", questions, uf, concurrency)
    per_server = _delta(before, await _counters(engine))
    row = stats.summary()
    row.update(name=f"UF {mode}", prefix_cache_reset=cold)
    if per_server is not None:
        done = stats.questions - stats.failed
        computed = sum(s["computed"] for s in per_server.values())
        cached = sum(s["cached"] for s in per_server.values())
        row["computed_prompt_tokens_per_q"] = round(computed / done, 1) if done else None
        row["cached_prompt_tokens_per_q"] = round(cached / done, 1) if done else None
        row["cache_hit_rate"] = round(cached / (computed + cached), 3) if computed else None
        row["requests_by_server"] = {s: int(v["requests"]) for s, v in per_server.items()}
    return row


async def compare_routings(
    make_engine: Callable[[Routing], Engine],
    questions: Sequence[Question],
    template: PromptTemplate,
    *,
    routings: Sequence[Routing] = ("round_robin", "affinity"),
    mode: str = "logprobs",
    concurrency: int = 32,
    progress: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """Each routing over the same questions, one after another; and affinity's computed
    prompt tokens per question and questions/s over round-robin's."""
    # First-call set-up on every server (round-robin reaches them all), not measured.
    warm = make_engine("round_robin")
    await warm.start()
    try:
        await score(WARMUP, warm, ScoreParams(mode=mode), template)  # type: ignore[arg-type]
    finally:
        await warm.close()
    rows: dict[str, dict[str, Any]] = {}
    for routing in routings:
        engine = make_engine(routing)
        await engine.start()
        try:
            await score(WARMUP, engine, ScoreParams(mode=mode), template)  # type: ignore[arg-type]
            progress(f"routing {routing} ...")
            rows[routing] = await measure_routing(
                engine, questions, template, mode=mode, concurrency=concurrency
            )
            progress(f"routing {routing}: {rows[routing]['questions_per_s']:.2f} questions/s")
        finally:
            await engine.close()
    ratios: dict[str, float] = {}
    if "affinity" in rows and "round_robin" in rows:
        aff, rr = rows["affinity"], rows["round_robin"]
        if aff.get("computed_prompt_tokens_per_q") and rr.get("computed_prompt_tokens_per_q"):
            ratios["computed_prompt_tokens_per_q"] = round(
                aff["computed_prompt_tokens_per_q"] / rr["computed_prompt_tokens_per_q"], 3
            )
        if rr["questions_per_s"] > 0:
            ratios["questions_per_s"] = round(aff["questions_per_s"] / rr["questions_per_s"], 3)
    return {"routings": rows, "affinity_over_round_robin": ratios}


def format_report(report: dict[str, Any]) -> str:
    """The human-readable table of a routing comparison."""
    lines = [
        f"engines: {report['engines']}  questions: {report['n']} ({report['dataset']}), "
        f"UF {report['mode']}, {report['concurrency']} in flight",
        "",
        "| routing | q/s | p50 ms | p99 ms | prompts/q | computed tok/q | cached tok/q "
        "| cache hits | requests by server | cold cache |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for routing, row in report["routings"].items():
        by_server = row.get("requests_by_server")
        lines.append(
            f"| {routing} | {row['questions_per_s']:.2f} | {row['p50_ms']:.0f} "
            f"| {row['p99_ms']:.0f} | {row['prompts_per_q']:.2f} "
            f"| {_num(row.get('computed_prompt_tokens_per_q'))} "
            f"| {_num(row.get('cached_prompt_tokens_per_q'))} "
            f"| {_num(row.get('cache_hit_rate'), '.1%')} "
            f"| {' / '.join(str(v) for v in by_server.values()) if by_server else '-'} "
            f"| {'yes' if row.get('prefix_cache_reset') else 'no'} |"
        )
    ratios = report.get("affinity_over_round_robin") or {}
    if ratios:
        lines += [
            "",
            "affinity over round-robin: " + ", ".join(f"{k} = {v:.3f}" for k, v in ratios.items()),
        ]
    return "\n".join(lines)


def _num(value: float | None, fmt: str = ".0f") -> str:
    return "-" if value is None else format(value, fmt)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine-url", required=True, help="comma-separated vLLM base URLs")
    parser.add_argument(
        "--data", default="../shared/data/mcqa/arc_challenge_test.jsonl", help="MCQA JSONL"
    )
    parser.add_argument("--n", type=int, default=50, help="questions (default 50)")
    parser.add_argument(
        "--subjects",
        default=None,
        help="comma-separated: only questions of these subjects (e.g. MMLU's passage-based "
        "high_school_european_history)",
    )
    parser.add_argument("--concurrency", type=int, default=32, help="questions in flight")
    parser.add_argument("--mode", choices=("logprobs", "sampling"), default="logprobs")
    parser.add_argument(
        "--routings", default="round_robin,affinity", help="comma-separated, in run order"
    )
    parser.add_argument(
        "--timeout-s", type=float, default=600.0, help="one engine call (a loaded CPU is slow)"
    )
    parser.add_argument("--out", default="reports/routing.json", help="JSON report path")
    args = parser.parse_args(argv)
    settings = Settings(engine_url=args.engine_url)
    routings: list[Routing] = []
    for name in args.routings.split(","):
        if name not in ROUTINGS:
            parser.error(f"--routings: unknown routing {name!r}; use {', '.join(ROUTINGS)}")
        routings.append(name)
    data = Path(args.data)
    subjects = None if args.subjects is None else set(args.subjects.split(","))
    questions = load_questions(data, args.n, subjects)
    if not questions:
        parser.error(f"--data/--subjects: no questions in {data} for {args.subjects!r}")

    def make_engine(routing: Routing) -> Engine:
        from service.engines.openai_http import OpenAIHTTPEngine

        return OpenAIHTTPEngine(
            settings.engine_urls,
            model=settings.served_model,
            timeout_s=args.timeout_s,
            routing=routing,
            api=settings.engine_api,
        )

    started = time.perf_counter()
    report: dict[str, Any] = {
        "engines": ",".join(settings.engine_urls),
        "dataset": data.name,
        "subjects": args.subjects,
        "n": len(questions),
        "mode": args.mode,
        "concurrency": args.concurrency,
        "machine": machine(),
        "command": "python -m service.bench.routing " + " ".join(sys.argv[1:]),
    }
    report.update(
        asyncio.run(
            compare_routings(
                make_engine,
                questions,
                settings.prompt_template(),
                routings=routings,
                mode=args.mode,
                concurrency=args.concurrency,
                progress=lambda line: print(line, file=sys.stderr, flush=True),
            )
        )
    )
    report["wall_s"] = round(time.perf_counter() - started, 1)
    out = write_report(report, args.out)
    print(format_report(report))
    print(f"\nreport: {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
