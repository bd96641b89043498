"""Run the benchmark variants over one engine and the same questions, and report them."""

from __future__ import annotations

import asyncio
import platform
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from service.calibration.prompts import (
    PromptTemplate,
    Question,
    all_options,
    parse_answer,
    render,
)
from service.engines.base import (
    Engine,
    GenerationParams,
    PrefixCacheReset,
    PromptTokenCounters,
)
from service.evaluation.data import load_mcqa
from service.scoring import SAMPLE_MAX_TOKENS, ScoreParams, Unscorable, Usage, score

from .naive import naive_uf_sampling

QuestionFn = Callable[[Question], Awaitable[tuple[Usage, float | None]]]


@dataclass
class FreeformUsage(Usage):
    """A free-form question's usage, with how many of its prompts the judge asked."""

    judge_prompts: int = 0


VARIANTS = {
    "a": "plain answer (1 greedy answer, no confidence)",
    "b": "UF logprobs (lockstep batches)",
    "c": "UF sampling K=10 (lockstep batches)",
    "d": "naive paper-style UF sampling K=10 (sequential)",
    "e": "UF logprobs with the cost bound (skip_mass)",
    "f": "free-form UF K=10 (no options: samples, judge, UF over the groups)",
}
# Warms the engine (first-call set-up, the cached system prompt) without caching any
# measured question's prefix.
WARMUP = Question("Which of these is a colour?", ("Blue", "Seven", "Quickly", "Under"))


@dataclass
class VariantStats:
    """What one variant cost over the benchmark's questions."""

    key: str
    name: str
    questions: int
    failed: int
    wall_s: float
    concurrency: int
    prefix_cache_reset: bool = False
    latencies_ms: list[float] = field(default_factory=list, repr=False)
    confidences: dict[int, float] = field(default_factory=dict, repr=False)
    prompts: int = 0
    judge_prompts: int = 0
    engine_calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # From the engine's own counters (vLLM /metrics), when it exports them.
    computed_prompt_tokens: float | None = None
    cached_prompt_tokens: float | None = None

    @property
    def qps(self) -> float:
        return self.questions / self.wall_s if self.wall_s > 0 else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies_ms:
            return float("nan")
        ordered = sorted(self.latencies_ms)
        index = min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))
        return ordered[index]

    def per_question(self, total: int) -> float:
        done = self.questions - self.failed
        return total / done if done else float("nan")

    def summary(self) -> dict[str, Any]:
        return {
            "variant": self.key,
            "name": self.name,
            "questions": self.questions,
            "failed": self.failed,
            "concurrency": self.concurrency,
            "wall_s": round(self.wall_s, 3),
            "questions_per_s": round(self.qps, 3),
            "p50_ms": round(self.percentile(50), 1),
            "p99_ms": round(self.percentile(99), 1),
            "engine_calls_per_q": round(self.per_question(self.engine_calls), 2),
            "prompts_per_q": round(self.per_question(self.prompts), 2),
            "judge_prompts_per_q": round(self.per_question(self.judge_prompts), 2),
            "prompt_tokens_per_q": round(self.per_question(self.prompt_tokens), 1),
            "completion_tokens_per_q": round(self.per_question(self.completion_tokens), 1),
            "computed_prompt_tokens_per_q": self._engine_count(self.computed_prompt_tokens),
            "cached_prompt_tokens_per_q": self._engine_count(self.cached_prompt_tokens),
            "prefix_cache_reset": self.prefix_cache_reset,
        }

    def _engine_count(self, total: float | None) -> float | None:
        return None if total is None else round(self.per_question(int(total)), 1)


async def plain_answer(
    question: Question, engine: Engine, template: PromptTemplate
) -> tuple[Usage, None]:
    """One greedy answer, parsed: what answering costs without any confidence."""
    prompt = render(question, all_options(question), template)
    params = GenerationParams(n=1, temperature=0.0, max_tokens=SAMPLE_MAX_TOKENS)
    generation = (await engine.generate([prompt], [params]))[0]
    parse_answer(generation.texts[0] if generation.texts else "", question.labels)
    usage = Usage(
        engine_calls=1,
        prompts=1,
        prompt_tokens=generation.prompt_tokens,
        completion_tokens=generation.completion_tokens,
    )
    return usage, None


async def reset_prefix_cache(engine: Engine) -> bool:
    """Empty the engine's prefix cache where the adapter can (True when it did)."""
    if not isinstance(engine, PrefixCacheReset):
        return False
    try:
        return bool(await engine.reset_prefix_cache())
    except Exception:  # a benchmark aid, never a reason to fail the run
        return False


async def prompt_token_counters(engine: Engine) -> dict[str, float] | None:
    """The engine's running totals of computed and cached prompt tokens, where it has them."""
    if not isinstance(engine, PromptTokenCounters):
        return None
    try:
        return await engine.prompt_token_counters()
    except Exception:  # a benchmark aid, never a reason to fail the run
        return None


async def run_variant(
    key: str, questions: Sequence[Question], fn: QuestionFn, concurrency: int
) -> VariantStats:
    """Run ``fn`` over every question with at most ``concurrency`` in flight."""
    stats = VariantStats(key, VARIANTS[key], len(questions), 0, 0.0, concurrency)
    gate = asyncio.Semaphore(concurrency)

    async def one(index: int, question: Question) -> None:
        async with gate:
            started = time.perf_counter()
            try:
                usage, confidence = await fn(question)
            except Unscorable:
                stats.failed += 1
                return
            stats.latencies_ms.append((time.perf_counter() - started) * 1000.0)
            if confidence is not None:
                stats.confidences[index] = confidence
            stats.prompts += usage.prompts
            stats.judge_prompts += getattr(usage, "judge_prompts", 0)
            stats.engine_calls += usage.engine_calls
            stats.prompt_tokens += usage.prompt_tokens
            stats.completion_tokens += usage.completion_tokens

    started = time.perf_counter()
    await asyncio.gather(*(one(i, q) for i, q in enumerate(questions)))
    stats.wall_s = time.perf_counter() - started
    return stats


async def run_engine_variants(
    engine: Engine,
    questions: Sequence[Question],
    template: PromptTemplate,
    *,
    variants: Sequence[str] = ("a", "b", "c", "d"),
    concurrency: int = 32,
    samples: int = 10,
    skip_mass: float = 0.1,
    progress: Callable[[str], None] = lambda _: None,
    judge: Any = None,
) -> dict[str, VariantStats]:
    """(a) plain, (b) UF logprobs, (c) UF sampling, (d) naive, (e) UF logprobs with the
    cost bound, (f) free-form UF (the question's text alone, UF over the sampled answers'
    groups in logprobs mode, ``judge``: the equivalence judge, None = the engine's);
    same engine, same questions."""

    async def uf_mode(mode: str, question: Question, skip: float = 0.0) -> tuple[Usage, float]:
        params = ScoreParams(mode=mode, samples=samples, skip_mass=skip)  # type: ignore[arg-type]
        result = await score(question, engine, params, template)
        return result.usage, result.confidence

    async def naive(question: Question) -> tuple[Usage, float]:
        result = await naive_uf_sampling(question, engine, template, samples=samples)
        return result.usage, result.confidence

    async def freeform(question: Question) -> tuple[Usage, float]:
        from service.scoring_freeform import FreeformContext, score_freeform

        params = ScoreParams(mode="logprobs", samples=samples)
        context = FreeformContext(template=template, judge=judge)
        result = await score_freeform(question.text, engine, params, context=context)
        usage = FreeformUsage(**vars(result.usage), judge_prompts=result.judge_prompts)
        return usage, result.confidence

    runners: dict[str, tuple[QuestionFn, int]] = {
        "a": (lambda q: plain_answer(q, engine, template), concurrency),
        "b": (lambda q: uf_mode("logprobs", q), concurrency),
        "c": (lambda q: uf_mode("sampling", q), concurrency),
        "d": (naive, 1),  # one question at a time: the naive reference
        "e": (lambda q: uf_mode("logprobs", q, skip_mass), concurrency),
        "f": (freeform, concurrency),
    }
    await run_variant("b", [WARMUP], runners["b"][0], 1)
    results: dict[str, VariantStats] = {}
    for key in variants:
        fn, limit = runners[key]
        # Every variant asks the same questions: without a reset, each would find the
        # previous variants' prompts in vLLM's prefix cache and look cheaper than it is.
        cold = await reset_prefix_cache(engine)
        progress(f"variant {key}: {VARIANTS[key]} (prefix cache reset: {cold}) ...")
        before = await prompt_token_counters(engine)
        results[key] = await run_variant(key, questions, fn, limit)
        results[key].prefix_cache_reset = cold
        after = await prompt_token_counters(engine)
        if before is not None and after is not None:
            results[key].computed_prompt_tokens = after["computed"] - before["computed"]
            results[key].cached_prompt_tokens = after["cached"] - before["cached"]
        progress(f"variant {key}: {results[key].qps:.2f} questions/s")
    return results


def cost_bound_effect(results: dict[str, VariantStats]) -> dict[str, float] | None:
    """How far the cost bound (e) moved each confidence from the exact one (b)."""
    if "b" not in results or "e" not in results:
        return None
    exact, bounded = results["b"].confidences, results["e"].confidences
    diffs = [abs(exact[i] - bounded[i]) for i in exact.keys() & bounded.keys()]
    if not diffs:
        return None
    return {
        "questions": len(diffs),
        "mean_abs_change": round(sum(diffs) / len(diffs), 5),
        "max_abs_change": round(max(diffs), 5),
        "unchanged": sum(1 for d in diffs if d == 0),
    }


def prefill_bound(results: dict[str, VariantStats]) -> dict[str, float]:
    """Computed prompt tokens per question of a over those of b, c, e: the throughput ratio
    b/a (c/a, e/a) that an engine bound by prefill compute would allow."""
    out: dict[str, float] = {}
    base = results.get("a")
    if base is None or base.computed_prompt_tokens is None:
        return out
    plain = base.per_question(int(base.computed_prompt_tokens))
    for key in ("b", "c", "e"):
        stats = results.get(key)
        if stats is None or stats.computed_prompt_tokens is None:
            continue
        tokens = stats.per_question(int(stats.computed_prompt_tokens))
        if tokens > 0:
            out[f"{key}/a"] = round(plain / tokens, 3)
    return out


def freeform_cost(results: dict[str, VariantStats]) -> dict[str, Any] | None:
    """Engine seconds per question of free-form UF (f) beside 4-option multiple-choice UF in
    both modes (b, c), measured in the same run, and f's time over each. Engine seconds
    per question: the variant's wall time over its questions, every variant with the same
    questions in flight (1 / throughput)."""
    if "f" not in results:
        return None
    f = results["f"]
    out: dict[str, Any] = {
        "judge_prompts_per_q": round(f.per_question(f.judge_prompts), 2),
        "prompts_per_q": round(f.per_question(f.prompts), 2),
        "engine_s_per_q": {},
        "time_ratio": {},
    }
    for key in ("f", "b", "c"):
        stats = results.get(key)
        if stats is not None and stats.qps > 0:
            out["engine_s_per_q"][key] = round(1.0 / stats.qps, 4)
            if key != "f" and f.qps > 0:
                out["time_ratio"][f"f/{key}"] = round(stats.qps / f.qps, 2)
    return out


def ratios(results: dict[str, VariantStats]) -> dict[str, float]:
    """Throughput ratios b/a, c/a, b/d, c/d (and e/a, e/b with the cost bound)."""
    out: dict[str, float] = {}
    for num, den in (("b", "a"), ("c", "a"), ("b", "d"), ("c", "d"), ("e", "a"), ("e", "b")):
        if num in results and den in results and results[den].qps > 0:
            out[f"{num}/{den}"] = round(results[num].qps / results[den].qps, 3)
    return out


def machine() -> dict[str, Any]:
    """Where the numbers were measured."""
    import os

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }


def format_table(report: dict[str, Any]) -> str:
    """The human-readable table of a benchmark report."""
    lines = [
        f"engine: {report['engine']}  model: {report['model']}  questions: {report['n']} "
        f"({report['dataset']})",
        "",
        "| variant | q/s | p50 ms | p99 ms | calls/q | prompts/q | prompt tok/q "
        "| computed tok/q | completion tok/q | failed | cold cache |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in report["variants"]:
        computed = row.get("computed_prompt_tokens_per_q")
        lines.append(
            f"| {row['variant']}: {row['name']} | {row['questions_per_s']:.2f} "
            f"| {row['p50_ms']:.0f} | {row['p99_ms']:.0f} | {row['engine_calls_per_q']:.2f} "
            f"| {row['prompts_per_q']:.2f} | {row['prompt_tokens_per_q']:.0f} "
            f"| {'-' if computed is None else f'{computed:.0f}'} "
            f"| {row['completion_tokens_per_q']:.0f} | {row['failed']} "
            f"| {'yes' if row.get('prefix_cache_reset') else 'no'} |"
        )
    if report.get("cost_bound"):
        effect = report["cost_bound"]
        lines += [
            "",
            f"cost bound (e, skip_mass={report.get('skip_mass')}): confidence changed by "
            f"{effect['mean_abs_change']:.4f} on average, {effect['max_abs_change']:.4f} at "
            f"most, unchanged on {effect['unchanged']} of {effect['questions']} questions",
        ]
    if report.get("ratios"):
        lines += [
            "",
            "throughput ratios: "
            + ", ".join(f"{k} = {v:.2f}" for k, v in report["ratios"].items()),
        ]
    cost = report.get("freeform_cost")
    if cost:
        seconds = ", ".join(f"{k} {v:.2f} s" for k, v in cost["engine_s_per_q"].items())
        times = ", ".join(f"{k} = {v:.2f}" for k, v in cost["time_ratio"].items())
        lines += [
            "",
            f"free-form (f) against 4-option multiple-choice UF (b logprobs, c sampling), "
            f"engine seconds per question: {seconds}; time ratios {times or '-'}; f asked "
            f"{cost['prompts_per_q']:.1f} prompts/q, {cost['judge_prompts_per_q']:.1f} of them "
            "the judge's",
        ]
    if report.get("prefill_bound"):
        lines += [
            "",
            "computed prompt tokens per question of a over those of each variant (the "
            "throughput ratio a prefill-bound engine allows): "
            + ", ".join(f"{k} = {v:.2f}" for k, v in report["prefill_bound"].items()),
        ]
    overhead = report.get("overhead")
    if overhead:
        lines += [
            "",
            "service overhead (/score over real uvicorn, instant in-process engine):",
            "| store | concurrency | requests | req/s | p50 ms | p99 ms | errors |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for row in overhead:
            lines.append(
                f"| {row.get('store', 'sqlite')} | {row['concurrency']} | {row['requests']} "
                f"| {row['requests_per_s']:.0f} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} "
                f"| {row['errors']} |"
            )
    return "\n".join(lines)


def stats_rows(results: dict[str, VariantStats]) -> list[dict[str, Any]]:
    return [results[k].summary() for k in sorted(results)]


def load_questions(
    path: Path, n: int, subjects: Collection[str] | None = None, options: int | None = None
) -> list[Question]:
    """The first ``n`` questions of an MCQA JSONL file (the shared data format), only those
    of ``subjects`` and of exactly ``options`` options when given."""
    items = [
        item
        for item in load_mcqa(path)
        if (subjects is None or item.subject in subjects)
        and (options is None or len(item.options) == options)
    ]
    return [Question(item.question, item.options) for item in items[:n]]
