"""``ufcal bench --sweep 2,4,8,13,26``: what UF costs as the option count M grows, on the
real engine, beside what the cost model (docs/performance.md) predicts.

Each M scores the same number of questions in logprobs mode under the work budget
(UFCAL_MAX_PROMPTS_PER_QUESTION), all in flight together as in variant b, from an empty
prefix cache. Real questions where the data has them (TruthfulQA mc1 has up to 13 options),
else real questions padded with other questions' options (``questions.py``).

The predictions: the worst case under the budget (``planned_prompts``, what admission weighs
a question by) and its round trips; and the throughput a prefill-bound engine allows, from
the M = smallest row's measured rate of prompt tokens (computed ones where the engine
reports them) divided by this row's tokens per question."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from service.calibration import budget
from service.calibration.prompts import PromptTemplate, Question
from service.engines.base import Engine
from service.scoring import ScoreParams, Unscorable, score

from .questions import questions_with_options
from .runner import prompt_token_counters, reset_prefix_cache

DEFAULT_SWEEP = (2, 4, 8, 13, 26)


def predicted_round_trips(n_options: int, max_prompts: int) -> int:
    """The most engine round trips of a UF question: the read, then one per chain step (a
    chain takes at most M - 1), and no more rounds than the budget has prompts for."""
    rounds = 1 + budget.chain_steps_bound(n_options)
    return rounds if max_prompts <= 0 else min(rounds, max_prompts)


async def run_sweep(
    engine: Engine,
    data_dir: Path,
    template: PromptTemplate,
    *,
    option_counts: Sequence[int] = DEFAULT_SWEEP,
    n: int = 16,
    max_prompts: int = budget.DEFAULT_MAX_PROMPTS,
    progress: Callable[[str], None] = lambda _: None,
) -> list[dict[str, Any]]:
    """One row per option count: measured cost, latency and throughput."""
    rows: list[dict[str, Any]] = []
    params = ScoreParams(mode="logprobs", max_prompts=max_prompts)
    for m in option_counts:
        rows.append(await _sweep_row(engine, data_dir, template, params, m, n))
        progress(f"sweep M={m}: {rows[-1]['questions_per_s']} questions/s")
    _predict_throughput(rows)
    return rows


async def _sweep_row(
    engine: Engine,
    data_dir: Path,
    template: PromptTemplate,
    params: ScoreParams,
    m: int,
    n: int,
) -> dict[str, Any]:
    sized = questions_with_options(data_dir, m, n)
    questions = [Question(q.question, q.options) for q in sized]
    cold = await reset_prefix_cache(engine)
    before = await prompt_token_counters(engine)
    latencies: list[float] = []
    totals = {"prompts": 0, "calls": 0, "tokens": 0, "hits": 0, "failed": 0}

    async def one(question: Question) -> None:
        started = time.perf_counter()
        try:
            result = await score(question, engine, params, template)
        except Unscorable:
            totals["failed"] += 1
            return
        latencies.append(time.perf_counter() - started)
        totals["prompts"] += result.usage.prompts
        totals["calls"] += result.usage.engine_calls
        totals["tokens"] += result.usage.prompt_tokens
        totals["hits"] += int(result.usage.budget_hit)

    started = time.perf_counter()
    await asyncio.gather(*(one(q) for q in questions))
    wall = time.perf_counter() - started
    after = await prompt_token_counters(engine)
    done = max(1, len(latencies))
    latencies.sort()
    computed = None if before is None or after is None else after["computed"] - before["computed"]
    return {
        "options": m,
        "questions": len(questions),
        "real_questions": sum(1 for q in sized if q.padded == 0),
        "failed": totals["failed"],
        "prompts_per_q": round(totals["prompts"] / done, 2),
        "round_trips_per_q": round(totals["calls"] / done, 2),
        "prompt_tokens_per_q": round(totals["tokens"] / done, 1),
        "computed_tokens_per_q": None if computed is None else round(computed / done, 1),
        "budget_hits": totals["hits"],
        "p50_ms": round(1000 * latencies[len(latencies) // 2], 1) if latencies else None,
        "p99_ms": round(1000 * latencies[-1], 1) if latencies else None,
        "questions_per_s": round(len(latencies) / wall, 3) if wall > 0 else 0.0,
        "wall_s": round(wall, 2),
        "prefix_cache_reset": cold,
        "predicted_max_prompts": budget.planned_prompts("uf", m, params.max_prompts),
        "predicted_max_round_trips": predicted_round_trips(m, params.max_prompts),
    }


def _predict_throughput(rows: list[dict[str, Any]]) -> None:
    """q/s predicted for a prefill-bound engine from the first row's token rate."""
    if not rows:
        return
    key = "computed_tokens_per_q" if rows[0].get("computed_tokens_per_q") else "prompt_tokens_per_q"
    base = rows[0]
    rate = base["questions_per_s"] * base[key]  # tokens per second
    for row in rows:
        tokens = row.get(key) or 0
        row["predicted_questions_per_s"] = round(rate / tokens, 3) if tokens else None
        row["prediction_tokens"] = key


def format_sweep(rows: Sequence[dict[str, Any]], max_prompts: int) -> str:
    """The sweep as a Markdown table, predictions beside the measurements."""
    lines = [
        f"option-count sweep (UF logprobs, budget {max_prompts or 'none'} prompts/question):",
        "| M | questions (real) | prompts/q | predicted max | round trips/q | predicted max "
        "| prompt tok/q | computed tok/q | budget bound | p50 ms | p99 ms | q/s "
        "| predicted q/s |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        computed = r.get("computed_tokens_per_q")
        lines.append(
            f"| {r['options']} | {r['questions']} ({r['real_questions']}) "
            f"| {r['prompts_per_q']:.1f} | {r['predicted_max_prompts']} "
            f"| {r['round_trips_per_q']:.1f} | {r['predicted_max_round_trips']} "
            f"| {r['prompt_tokens_per_q']:.0f} | {'-' if computed is None else f'{computed:.0f}'} "
            f"| {r['budget_hits']} | {r['p50_ms']} | {r['p99_ms']} "
            f"| {r['questions_per_s']:.2f} | {r.get('predicted_questions_per_s') or '-'} |"
        )
    return "\n".join(lines)
