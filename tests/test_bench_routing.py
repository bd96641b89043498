"""The routing benchmark over a fake pair of servers that each cache what they computed."""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from pathlib import Path

import pytest

from service.bench.overhead import InstantEngine
from service.bench.routing import compare_routings, format_report, main
from service.bench.runner import load_questions
from service.calibration.prompts import Prompt, PromptTemplate, Question
from service.engines.base import Generation, GenerationParams, LetterRead
from service.engines.routing import EngineRouter, Routing

SHARED, OWN = 40, 20  # tokens of a prompt its question shares / its own


class TwoCachingServers(InstantEngine):
    """Two fake servers behind one router: a prompt whose question a server has seen costs
    only its own tokens there (the shared prefix is cached), else all of them."""

    def __init__(self, routing: Routing) -> None:
        self.router = EngineRouter(["s1", "s2"], routing)
        self.seen: dict[str, set[str]] = {"s1": set(), "s2": set()}
        self.totals = {s: {"computed": 0.0, "cached": 0.0, "requests": 0.0} for s in self.seen}

    def _account(self, prompts: Sequence[Prompt]) -> None:
        for prompt in prompts:
            server = self.router.choose(prompt.prefix_key)
            totals = self.totals[server]
            totals["requests"] += 1
            if prompt.prefix_key in self.seen[server]:
                totals["cached"] += SHARED
                totals["computed"] += OWN
            else:
                totals["computed"] += SHARED + OWN
                self.seen[server].add(prompt.prefix_key)

    async def read_letters(
        self, prompts: Sequence[Prompt], labels: Sequence[Sequence[str]]
    ) -> list[LetterRead]:
        self._account(prompts)
        return await super().read_letters(prompts, labels)

    async def generate(
        self, prompts: Sequence[Prompt], params: Sequence[GenerationParams]
    ) -> list[Generation]:
        self._account(prompts)
        return await super().generate(prompts, params)

    async def reset_prefix_cache(self) -> bool:
        for keys in self.seen.values():
            keys.clear()
        return True

    async def server_counters(self) -> dict[str, dict[str, float]]:
        return copy.deepcopy(self.totals)


async def test_affinity_computes_fewer_tokens_than_round_robin_on_caching_servers() -> None:
    questions = [Question(f"Question {i}?", ("alpha", "beta", "gamma", "delta")) for i in range(12)]
    report = await compare_routings(TwoCachingServers, questions, PromptTemplate(), concurrency=4)
    rr, aff = report["routings"]["round_robin"], report["routings"]["affinity"]
    assert aff["prefix_cache_reset"] and rr["prefix_cache_reset"]
    assert aff["prompts_per_q"] == rr["prompts_per_q"]
    # affinity computes the shared prefix once per question, round-robin once per server
    assert aff["computed_prompt_tokens_per_q"] == SHARED + aff["prompts_per_q"] * OWN
    assert rr["computed_prompt_tokens_per_q"] == 2 * SHARED + rr["prompts_per_q"] * OWN
    ratio = report["affinity_over_round_robin"]["computed_prompt_tokens_per_q"]
    expected = aff["computed_prompt_tokens_per_q"] / rr["computed_prompt_tokens_per_q"]
    assert ratio == round(expected, 3) and ratio < 1
    for row in (rr, aff):
        assert sum(row["requests_by_server"].values()) == row["prompts_per_q"] * len(questions)
        assert all(count > 0 for count in row["requests_by_server"].values())
    table = format_report(
        {
            **report,
            "engines": "s1,s2",
            "n": 12,
            "dataset": "x",
            "mode": "logprobs",
            "concurrency": 4,
        }
    )
    assert "affinity over round-robin: computed_prompt_tokens_per_q = " in table


def test_subjects_pick_only_their_questions(tmp_path: Path) -> None:
    rows = [
        {"id": str(i), "dataset": "d", "subject": subject, "question": f"Q{i}?"}
        | {"options": ["a", "b"], "answer": 0}
        for i, subject in enumerate(["law", "history", "law", None, "history"])
    ]
    data = tmp_path / "mcqa.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert [q.text for q in load_questions(data, 10, {"history"})] == ["Q1?", "Q4?"]
    assert [q.text for q in load_questions(data, 1, {"law", "history"})] == ["Q0?"]
    assert len(load_questions(data, 10)) == 5


def test_no_question_of_the_subjects_is_a_usage_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "mcqa.jsonl"
    data.write_text(
        json.dumps({"id": "1", "dataset": "d", "subject": "law", "question": "Q?"})[:-1]
        + ', "options": ["a", "b"], "answer": 0}\n'
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["--engine-url", "http://127.0.0.1:1", "--data", str(data), "--subjects", "art"])
    assert exit_info.value.code == 2
    assert "--subjects" in capsys.readouterr().err
