"""The benchmark: the naive reference computes the same method; a short real run works."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from service.bench.naive import naive_uf_sampling
from service.bench.overhead import InstantEngine
from service.bench.runner import (
    cost_bound_effect,
    format_table,
    prefill_bound,
    ratios,
    run_engine_variants,
)
from service.calibration.prompts import Prompt, PromptTemplate, Question
from service.engines.base import Generation, GenerationParams, LetterRead
from service.scoring import ScoreParams, score
from tests.fakes import FakeEngine, chain_script_generate, parse_prompt
from tests.servers import ROOT, SHARED_DATA, ServerProcess

SAMPLES = [" D", "D.", "(D)", "A", "Answer: A", "The answer is C", " D", " D", "A", "x"]
REPLIES: dict[str, list[str | None]] = {"D": [" A", " C"], "A": [" D", " C"], "C": [" A", " D"]}
Q5 = Question("Which one?", ("alpha", "beta", "gamma", "delta", "epsilon"))


async def test_naive_reference_matches_the_lockstep_scorer() -> None:
    """Same replies in, same numbers out: the naive way differs only in how it calls."""
    template = PromptTemplate()
    script = chain_script_generate(SAMPLES, REPLIES, 5)
    replies = iter(SAMPLES)

    def one_at_a_time(prompt: Prompt, params: GenerationParams) -> Sequence[str]:
        """The naive way asks for one sample per call: the same ten replies, in order."""
        if parse_prompt(prompt).substituted is None:
            return [next(replies)]
        return script(prompt, params)

    naive_engine = FakeEngine(generate=one_at_a_time)
    fast_engine = FakeEngine(generate=script)
    naive = await naive_uf_sampling(Q5, naive_engine, template, samples=10)
    fast = await score(Q5, fast_engine, ScoreParams(mode="sampling", samples=10), template)
    assert naive.distribution == fast.distribution
    assert naive.chains == fast.chains
    assert naive.confidence == pytest.approx(fast.confidence)
    assert naive.usage.unparsed == fast.usage.unparsed
    # The naive way: one prompt per call; the scorer: one call per lockstep step.
    assert naive.usage.engine_calls == naive.usage.prompts
    assert fast.usage.engine_calls < naive.usage.engine_calls
    assert max(len(c.prompts) for c in naive_engine.calls) == 1


async def test_variants_report_on_an_instant_engine() -> None:
    questions = [Q5, Question("2 + 2?", ("3", "4", "5", "6"))] * 3
    results = await run_engine_variants(
        InstantEngine(),
        questions,
        PromptTemplate(),
        variants=("a", "b", "c", "d", "e"),
        concurrency=4,
        samples=10,
        skip_mass=0.1,
    )
    assert set(results) == {"a", "b", "c", "d", "e"}
    for stats in results.values():
        assert stats.questions == 6 and stats.failed == 0
        assert len(stats.latencies_ms) == 6
    assert results["a"].per_question(results["a"].prompts) == 1
    assert set(ratios(results)) == {"b/a", "c/a", "b/d", "c/d", "e/a", "e/b"}
    # The bound skipped the 0.05 start: fewer prompts, a confidence moved by at most the
    # skipped share of the start set's mass.
    assert results["e"].prompts < results["b"].prompts
    effect = cost_bound_effect(results)
    assert effect is not None and effect["questions"] == 6
    assert 0 < effect["max_abs_change"] <= 0.1
    table = format_table(
        {
            "engine": "instant",
            "model": "instant",
            "n": 6,
            "dataset": "-",
            "variants": [r.summary() for r in results.values()],
            "ratios": ratios(results),
        }
    )
    assert "b: UF logprobs" in table and "b/d" in table


@pytest.mark.integration
def test_bench_short_run_on_the_real_engine(vllm: ServerProcess, tmp_path: Path) -> None:
    """`ufcal bench --n 10` end to end on the vLLM server (correctness, not timing)."""
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable, "-m", "service.cli", "bench", "--n", "10",
            "--data", str(SHARED_DATA / "arc_challenge_test.jsonl"),
            "--engine-url", vllm.base_url, "--overhead-requests", "100", "--out", str(out),
        ],
        cwd=ROOT, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(out.read_text())
    rows = {row["variant"]: row for row in report["variants"]}
    assert set(rows) == {"a", "b", "c", "d"}
    for row in rows.values():
        assert row["questions"] == 10
        assert row["failed"] == 0
        assert row["questions_per_s"] > 0
    assert rows["a"]["prompts_per_q"] == 1
    assert rows["b"]["prompts_per_q"] > 1
    assert set(report["ratios"]) == {"b/a", "c/a", "b/d", "c/d"}
    # vLLM's own counters: what was prefilled and what the prefix cache served. (In c, vLLM
    # counts the prompt of each of the n = 10 samples, nine of them served by the cache.)
    for key in "abcd":
        assert rows[key]["computed_prompt_tokens_per_q"] > 0
    for key in "abd":
        computed_and_cached = (
            rows[key]["computed_prompt_tokens_per_q"] + rows[key]["cached_prompt_tokens_per_q"]
        )
        assert computed_and_cached == pytest.approx(rows[key]["prompt_tokens_per_q"], abs=1)
    assert rows["b"]["cached_prompt_tokens_per_q"] > 0  # the chains reuse the question
    assert set(report["prefill_bound"]) == {"b/a", "c/a"}
    assert [row["concurrency"] for row in report["overhead"]] == [1, 8, 64]
    assert all(row["errors"] == 0 for row in report["overhead"])
    assert "throughput ratios" in done.stdout


async def test_no_duplicate_prompts_within_a_question() -> None:
    """Every prompt a question sends is distinct (the same variant is never asked twice),
    and all chain prompts of a question share the prefix up to the option block."""
    engine = FakeEngine(generate=chain_script_generate(SAMPLES, REPLIES, 5))
    await score(Q5, engine, ScoreParams(mode="sampling", samples=10), PromptTemplate())
    prompts = [p.user for call in engine.calls for p in call.prompts]
    assert len(prompts) == len(set(prompts)) > 1
    shared = prompts[0].split("Options:")[0]
    assert all(p.startswith(shared + "Options:") for p in prompts)


class _ResettableInstantEngine(InstantEngine):
    def __init__(self) -> None:
        self.resets = 0

    async def reset_prefix_cache(self) -> bool:
        self.resets += 1
        return True


async def test_every_variant_starts_with_a_cold_prefix_cache() -> None:
    """The variants ask the same questions: each must not inherit the previous' cache."""
    engine = _ResettableInstantEngine()
    results = await run_engine_variants(
        engine, [Q5] * 2, PromptTemplate(), variants=("a", "b"), concurrency=2
    )
    assert engine.resets == 2
    assert all(stats.summary()["prefix_cache_reset"] for stats in results.values())
    plain = await run_engine_variants(
        InstantEngine(), [Q5], PromptTemplate(), variants=("a",), concurrency=1
    )
    assert plain["a"].summary()["prefix_cache_reset"] is False


class _CountingInstantEngine(InstantEngine):
    """Exports prompt-token counters like vLLM's /metrics: half computed, half cached."""

    def __init__(self) -> None:
        self.tokens = 0

    async def read_letters(
        self, prompts: Sequence[Prompt], labels: Sequence[Sequence[str]]
    ) -> list[LetterRead]:
        reads = await super().read_letters(prompts, labels)
        self.tokens += sum(r.prompt_tokens for r in reads)
        return reads

    async def generate(
        self, prompts: Sequence[Prompt], params: Sequence[GenerationParams]
    ) -> list[Generation]:
        generations = await super().generate(prompts, params)
        self.tokens += sum(g.prompt_tokens for g in generations)
        return generations

    async def prompt_token_counters(self) -> dict[str, float]:
        return {"computed": self.tokens / 2, "cached": self.tokens / 2}


async def test_engine_token_counters_give_the_prefill_bound() -> None:
    """Computed prompt tokens per question come from the engine's counters, per variant,
    and a/b of them is the throughput ratio a prefill-bound engine allows."""
    results = await run_engine_variants(
        _CountingInstantEngine(), [Q5] * 4, PromptTemplate(), variants=("a", "b"), concurrency=2
    )
    a, b = results["a"], results["b"]
    assert a.computed_prompt_tokens == a.prompt_tokens / 2
    assert b.computed_prompt_tokens == b.prompt_tokens / 2
    assert a.summary()["computed_prompt_tokens_per_q"] == a.prompt_tokens / 2 / 4
    expected = a.per_question(a.prompt_tokens) / b.per_question(b.prompt_tokens)
    assert prefill_bound(results) == {"b/a": pytest.approx(expected, abs=1e-3)}
