"""The work budget per question (issue 13): the pure plan, the scorer under it, and the
request validation. No vLLM: a fake engine whose chains never come back to their start, so
every question costs its worst case."""

from __future__ import annotations

import asyncio
import json
import os
import string
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from service.calibration import budget, uf
from service.calibration.prompts import Prompt, PromptTemplate, Question
from service.engines.base import GenerationParams
from service.scoring import ScoreParams, score
from tests.fakes import FakeEngine, parse_prompt
from tests.servers import SHARED_DATA
from tests.test_api import _settings, serve

TEMPLATE = PromptTemplate()
PAPER_DATASETS = (
    "arc_challenge_test.jsonl",
    "mmlu_test.jsonl",
    "commonsense_qa_validation.jsonl",
    "truthfulqa_mc1_validation.jsonl",
)


def _wandering_letters(prompt: Prompt, labels: Sequence[str]) -> Mapping[str, float]:
    """Step 1: nearly flat over the options (every one starts a chain). Chains: always the
    first option shown that is not the start, so a chain takes its M - 1 steps."""
    view = parse_prompt(prompt)
    if view.substituted is None:
        return {label: -0.01 * i for i, label in enumerate(labels)}
    pick = next(label for label in labels if label != view.substituted)
    return {pick: 0.0}


def _wandering_generate(prompt: Prompt, params: GenerationParams) -> Sequence[str]:
    view = parse_prompt(prompt)
    labels = view.labels
    if view.substituted is None:
        return [labels[i % len(labels)] for i in range(params.n)]
    return [next(label for label in labels if label != view.substituted)]


def _engine() -> FakeEngine:
    return FakeEngine(letters=_wandering_letters, generate=_wandering_generate)


def _question(m: int) -> Question:
    return Question("Which one?", tuple(f"option {c}" for c in string.ascii_lowercase[:m]))


# ---------------------------------------------------------------- the plan (pure)


def test_worst_case_and_plan() -> None:
    assert budget.unbounded_prompts("uf", 4) == 13
    assert budget.unbounded_prompts("uf", 26) == 651
    assert budget.planned_prompts("uf", 26, 64) == 64
    assert budget.planned_prompts("uf", 26, 0) == 651
    assert budget.planned_prompts("token", 26, 64) == 1
    assert budget.planned_prompts("linguistic", 4, 64) == 3
    assert budget.min_prompts("uf") == 2 and budget.min_prompts("sampled") == 1
    plan = budget.plan_starts([0.5, 0.1, 0.3, 0.1], [0, 1, 2, 3], 2)
    assert plan.starts == [0, 2]
    assert plan.dropped == [1, 3]
    assert plan.dropped_share == pytest.approx(0.2)
    assert budget.fit_round([0.5, 0.1, 0.3, 0.1], [0, 1, 2], 2) == ([0, 2], [1])
    assert budget.fit_round([0.5, 0.1], [0, 1], None) == ([0, 1], [])


@given(st.lists(st.floats(0.0, 1.0), min_size=2, max_size=26), st.integers(1, 80))
def test_plan_keeps_the_answer_and_fits(weights: list[float], chain_prompts: int) -> None:
    total = sum(weights)
    if total <= 0:
        return
    p = [w / total for w in weights]
    starts = uf.start_set(p, 0.01)
    plan = budget.plan_starts(p, starts, chain_prompts)
    assert len(plan.starts) <= chain_prompts
    assert uf.answer_index(p) in plan.starts
    assert sorted(plan.starts + plan.dropped) == starts
    kept_min = min(p[s] for s in plan.starts)
    assert all(p[d] <= kept_min for d in plan.dropped)  # the least likely went first
    assert 0.0 <= plan.dropped_share <= 1.0


def _paper_rows() -> list[dict[str, object]]:
    data = SHARED_DATA if SHARED_DATA.is_dir() else Path(os.environ.get("UFCAL_DATA_DIR", "-"))
    rows = []
    for name in PAPER_DATASETS:
        path = data / name
        if not path.is_file():
            pytest.fail(f"evaluation data missing: {path} (../shared must sit beside the repo)")
        with path.open(encoding="utf-8") as handle:
            rows += [json.loads(line) for line in handle]
    return rows


def _worst_case_is_unbounded(n_options: int, max_prompts: int) -> bool:
    """Whatever the model answers (every option a start, every chain its M - 1 steps), the
    plan drops no start and cuts no round."""
    flat = [1.0 / n_options] * n_options
    starts = list(range(n_options))
    if budget.plan_starts(flat, starts, max_prompts - 1).dropped:
        return False
    used, active = 0, starts
    for _ in range(budget.chain_steps_bound(n_options)):
        sent, cut = budget.fit_round(flat, active, max_prompts - 1 - used)
        if cut:
            return False
        used += len(sent)
    return 1 + used == budget.unbounded_prompts("uf", n_options)


def test_default_budget_changes_no_four_option_question() -> None:
    """On the four paper datasets, a 4-option question costs at most 1 + 4 x 3 = 13 prompts,
    under the default budget of 64: the plan of every one is the unbounded plan. The budget
    can bind only questions of 9 options or more (1 + 9 x 8 = 73): TruthfulQA's."""
    rows = _paper_rows()
    default = budget.DEFAULT_MAX_PROMPTS
    four = [r for r in rows if len(r["options"]) == 4]  # type: ignore[arg-type]
    assert len(four) > 10000
    for n_options in {len(r["options"]) for r in rows}:  # type: ignore[arg-type]
        assert _worst_case_is_unbounded(n_options, default) == (n_options <= 8), n_options
    bindable = {str(r["dataset"]) for r in rows if len(r["options"]) > 8}  # type: ignore[arg-type]
    assert bindable == {"truthfulqa_mc1"}


# ---------------------------------------------------------------- the scorer under it


@pytest.mark.parametrize("mode", ["logprobs", "sampling"])
@pytest.mark.parametrize("m", [2, 4, 10, 11, 13, 26])
def test_no_question_sends_more_than_the_budget(mode: str, m: int) -> None:
    params = ScoreParams(mode=mode)  # type: ignore[arg-type]
    result = asyncio.run(score(_question(m), _engine(), params, TEMPLATE))
    usage = result.usage
    worst = budget.unbounded_prompts("uf", m)
    assert usage.prompts == min(worst, budget.DEFAULT_MAX_PROMPTS)
    assert usage.budget_hit == (worst > budget.DEFAULT_MAX_PROMPTS)
    if m == 4:
        assert (usage.dropped_mass, usage.chains_cut) == (0.0, 0)
    assert sum(result.fidelity) == pytest.approx(1.0)


def test_budget_drops_least_likely_starts_and_says_how_much() -> None:
    # 26 options, budget 10: 9 chain prompts, so 9 starts (the most likely) of 26.
    params = ScoreParams(mode="logprobs", max_prompts=10)
    result = asyncio.run(score(_question(26), _engine(), params, TEMPLATE))
    assert result.usage.prompts == 10
    assert result.usage.budget_hit
    assert sorted(result.chains) == list(range(9))  # the step-1 read prefers earlier letters
    p = result.distribution
    assert result.usage.dropped_mass == pytest.approx(sum(p[9:]) / sum(p))
    assert result.usage.chains_cut == 9  # one step each, then the budget was spent
    assert all(len(c) == 2 for c in result.chains.values())


def test_no_bound_runs_every_chain_to_its_end() -> None:
    params = ScoreParams(mode="logprobs", max_prompts=0)
    result = asyncio.run(score(_question(13), _engine(), params, TEMPLATE))
    assert result.usage.prompts == budget.unbounded_prompts("uf", 13) == 157
    assert not result.usage.budget_hit


def test_budget_below_a_read_is_refused_by_the_scorer() -> None:
    with pytest.raises(ValueError, match="max_prompts=1"):
        asyncio.run(score(_question(4), _engine(), ScoreParams(max_prompts=1), TEMPLATE))


# ---------------------------------------------------------------- the HTTP contract


def _body(m: int, **extra: object) -> dict[str, object]:
    return {"question": "Which one?", "options": list(_question(m).options), **extra}


async def test_http_budget_field_and_errors() -> None:
    async with serve(_engine(), _settings()) as client:
        ok = await client.post("/score", json=_body(26, mode="sampling"))
        assert ok.status_code == 200, ok.text
        usage = ok.json()["usage"]
        assert usage["prompts"] == 64 and usage["budget_hit"] is True
        assert usage["dropped_mass"] > 0 or usage["chains_cut"] > 0

        small = await client.post("/score", json=_body(26, max_prompts=5))
        assert small.status_code == 200 and small.json()["usage"]["prompts"] == 5

        one = await client.post("/score", json=_body(4, mode="sampling", max_prompts=1))
        assert one.status_code == 422
        issue = one.json()["detail"][0]
        assert issue["loc"] == ["body", "max_prompts"]
        assert "uf needs" in issue["msg"]

        token = await client.post("/score", json=_body(4, method="token", max_prompts=1))
        assert token.status_code == 200  # one read is all the token baseline needs

        over = await client.post("/score", json=_body(4, max_prompts=65))
        assert over.status_code == 422
        assert "UFCAL_MAX_PROMPTS_PER_QUESTION=64" in over.json()["detail"][0]["msg"]

        many = await client.post("/score", json={"question": "Q?", "options": ["x"] * 27})
        assert many.status_code == 422
        assert many.json()["detail"][0]["loc"][:2] == ["body", "options"]

        batch = await client.post(
            "/score/batch", json={"items": [_body(4), _body(4, max_prompts=1)]}
        )
        assert batch.status_code == 422
        assert batch.json()["detail"][0]["loc"] == ["body", "items", 1, "max_prompts"]


async def test_configured_budget_of_one_names_the_setting() -> None:
    async with serve(_engine(), _settings(max_prompts_per_question=1)) as client:
        reply = await client.post("/score", json=_body(4))
        assert reply.status_code == 422
        assert "UFCAL_MAX_PROMPTS_PER_QUESTION=1" in reply.json()["detail"][0]["msg"]


def test_eval_report_counts_budget_hits(tmp_path: Path) -> None:
    from service.evaluation.report import budget_table, summarize

    rows = [
        {"dataset": "tqa", "method": "uf", "mode": "logprobs", "confidence": 0.5,
         "correct": True, "usage": {"prompts": 64, "budget_hit": True, "dropped_mass": 0.2}},
        {"dataset": "tqa", "method": "uf", "mode": "logprobs", "confidence": 0.5,
         "correct": False, "usage": {"prompts": 13}},
    ]  # fmt: skip
    (summary,) = summarize(rows)
    assert summary.budget_hits == 1
    table = budget_table([summary], 64)
    assert "| tqa | uf | logprobs | 2 | 1 | 0.500 | 0.1000 |" in table


def test_a_prompt_s_size_grows_with_its_options_not_its_cached_question() -> None:
    from service.calibration.budget import prompt_size

    standard = prompt_size(120, [25] * 4)
    assert standard == pytest.approx(1.0)
    # 26 options of the same length: several standard prompts' worth of engine work
    assert 1.8 < prompt_size(120, [25] * 26) < 3.0
    # a long question is served from the prefix cache after its first prompt: it counts little
    assert prompt_size(1200, [25] * 4) < 2.5 * standard
    assert prompt_size(120, [250] * 4) > 2 * standard
