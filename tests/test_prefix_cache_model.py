"""The prefix-cache cost model: the prompts it rebuilds are the scorer's, and its cache
counts whole blocks as vLLM does."""

from __future__ import annotations

from collections.abc import Sequence

from service.bench.prefix_cache_model import PrefixCache, model_cost, uf_logprobs_steps
from service.calibration.prompts import Prompt, PromptTemplate, Question
from service.scoring import ScoreParams, score
from tests.fakes import FakeEngine, chain_script_letters, log

Q4 = Question("Which one?", ("alpha", "beta", "gamma", "delta"))


async def test_rebuilt_prompts_are_the_ones_the_scorer_sends() -> None:
    """Same chains in, same prompts step by step: the model counts what UF really asks."""
    first = {"A": log(0.4), "B": log(0.3), "C": log(0.2), "D": log(0.1)}
    script = {"A": ["B", "C"], "B": ["A"], "C": ["D", "A", "B"], "D": []}
    engine = FakeEngine(letters=chain_script_letters(first, script, 4))
    result = await score(Q4, engine, ScoreParams(mode="logprobs"), PromptTemplate())
    sent = [[p.user for p in call.prompts] for call in engine.calls]
    rebuilt = uf_logprobs_steps(Q4, result.chains, PromptTemplate())
    assert [sorted(p.user for p in step) for step in rebuilt] == [sorted(s) for s in sent]
    assert len(sent) == 4  # the read and three chain steps (C's chain is the longest)


def test_whole_blocks_are_cached_and_the_last_token_is_always_computed() -> None:
    cache = PrefixCache(block=4, cached=set())
    assert cache.run_step([list(range(10))]) == (10, 10)
    # 8 tokens shared (two whole blocks), then a different tail
    assert cache.run_step([[*range(8), 99, 98]]) == (10, 2)
    # fully cached prompt of whole blocks: still computes its last token
    assert cache.run_step([list(range(8))]) == (8, 1)
    # prompts of one step do not see each other's blocks
    fresh = PrefixCache(block=4, cached=set())
    assert fresh.run_step([[7] * 8, [7] * 8]) == (16, 16)


def test_cost_model_bounds_b_over_a_by_computed_tokens() -> None:
    def tokenize(prompt: Prompt) -> Sequence[int]:
        return [ord(c) for c in prompt.user]  # one token per character

    chains = {0: [0, 1], 1: [1], 2: [2, 0, 1], 3: [3, 1]}
    rows = model_cost([(Q4, chains)], tokenize, PromptTemplate(), blocks=(1, 32))
    ideal, coarse = rows
    assert ideal["prompts_per_q"] == coarse["prompts_per_q"] == 1 + 2 + 1 + 3 + 2
    assert ideal["uf_computed_per_q"] < coarse["uf_computed_per_q"]
    for row in rows:
        bound = row["plain_computed_per_q"] / row["uf_computed_per_q"]
        assert row["b_over_a_bound"] == round(bound, 3)
