"""Baselines: parsing of stated confidences, their math, and the methods on the fake engine."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

import pytest

from service.calibration import baselines, uf
from service.calibration.prompts import Prompt, PromptTemplate, Question
from service.engines.base import EngineFeatureMissing, GenerationParams
from service.engines.letters import choice_strings
from service.scoring import (
    METHODS,
    QuestionRun,
    ScoreParams,
    ScoreResult,
    Unscorable,
    score,
    score_methods,
)
from tests.fakes import FakeEngine, log, parse_prompt

TEMPLATE = PromptTemplate()
Q4 = Question("Which one?", ("alpha", "beta", "gamma", "delta"))
FIRST = {"A": log(0.1), "B": log(0.5), "C": log(0.2)}  # 0.8 of the mass on letters; D: 0


# ------------------------------------------------------------------- verbalized parsing


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("0.8", 0.8),
        (" 0.8", 0.8),
        (".8", 0.8),
        ("1", 1.0),
        ("0", 0.0),
        ("1.0", 1.0),
        ("80%", 0.8),
        ("80 %", 0.8),
        ("80 percent", 0.8),
        ("85", 0.85),
        ("100", 1.0),
        ("8/10", 0.8),
        ("Confidence: 0.75", 0.75),
        ("confidence = 0.75.", 0.75),
        ("**0.9**", 0.9),
        (" 0.0125\n\nThe answer", 0.0125),
        ("I am 90% sure", 0.9),
        ("0.5\n\nThe answer is B", 0.5),
    ],
)
def test_parse_verbalized_reads_numbers(reply: str, expected: float) -> None:
    value = baselines.parse_verbalized(reply)
    assert value is not None
    assert value == pytest.approx(expected)


@pytest.mark.parametrize(
    "reply",
    ["", "B", "eight", "very sure", "150", "120%", "3/0", "Answer: C", "high"],
)
def test_parse_verbalized_rejects_what_states_no_confidence(reply: str) -> None:
    assert baselines.parse_verbalized(reply) is None


# ------------------------------------------------------------------- linguistic parsing


@pytest.mark.parametrize(
    ("reply", "phrase", "value"),
    [
        ("Likely", "Likely", 0.70),
        (" likely", "Likely", 0.70),
        ("ALMOST CERTAIN", "Almost certain", 0.95),
        ("Unlikely", "Unlikely", 0.30),
        (" very unlikely", "Very unlikely", 0.20),
        ("Highly unlikely.", "Highly unlikely", 0.10),
        ("It is highly   likely!", "Highly likely", 0.90),
        ("about even, maybe likely", "About even", 0.50),
        ("Somewhat likely", "Somewhat likely", 0.60),
    ],
)
def test_parse_linguistic_maps_phrases(reply: str, phrase: str, value: float) -> None:
    assert baselines.parse_linguistic(reply) == (phrase, value)


@pytest.mark.parametrize("reply", ["", "0.8", "sure", "likelyhood", "unlikelier"])
def test_parse_linguistic_rejects_other_text(reply: str) -> None:
    assert baselines.parse_linguistic(reply) is None


def test_linguistic_scale_is_ordered_and_choices_cover_it() -> None:
    values = [v for _, v in baselines.LINGUISTIC_PHRASES]
    assert values == sorted(values, reverse=True)
    assert all(0 < v < 1 for v in values)
    choices = baselines.linguistic_choices()
    for phrase, value in baselines.LINGUISTIC_PHRASES:
        assert phrase in choices and f" {phrase}" in choices
        assert baselines.parse_linguistic(phrase) == (phrase, value)
        assert baselines.parse_linguistic(f" {phrase}") == (phrase, value)


# ------------------------------------------------------------------------------ math


def test_token_confidence_is_the_raw_letter_probability() -> None:
    assert baselines.token_confidence(math.log(0.5)) == pytest.approx(0.5)
    assert baselines.token_confidence(-math.inf) == 0.0
    assert baselines.token_confidence(0.0) == 1.0


def test_sampled_confidence_is_p_of_the_answer() -> None:
    assert baselines.sampled_confidence([0.2, 0.7, 0.1], 1) == pytest.approx(0.7)


def test_follow_up_prompts_share_the_question_block_and_name_the_answer() -> None:
    answer_prompt_user = "Question: Which one?\nOptions:\nA. alpha\nB. beta\nC. gamma\nD. delta"
    verbal = baselines.verbalized_prompt(Q4, 1, TEMPLATE)
    ling = baselines.linguistic_prompt(Q4, 2, TEMPLATE)
    assert verbal.user.startswith(answer_prompt_user)
    assert "Proposed answer: B. beta" in verbal.user
    assert verbal.answer_prefix == baselines.VERBALIZED_ANSWER_PREFIX
    assert ling.user.startswith(answer_prompt_user)
    assert "Proposed answer: C. gamma" in ling.user
    assert "Almost certain" in ling.user and "Almost impossible" in ling.user
    assert ling.answer_prefix == baselines.LINGUISTIC_ANSWER_PREFIX


# ------------------------------------------------------------- methods on the fake engine


def _letters(prompt: Prompt, labels: Sequence[str]) -> dict[str, float]:
    view = parse_prompt(prompt)
    if view.substituted is None:
        return FIRST
    return {view.substituted: 0.0}  # every chain stays with its start


def _generate(
    verbal: str = " 0.7", samples: Sequence[str] = (" B", " B", " A", "B.", "??")
) -> object:
    def generate(prompt: Prompt, params: GenerationParams) -> list[str]:
        if prompt.answer_prefix == baselines.VERBALIZED_ANSWER_PREFIX:
            return [verbal]
        if prompt.answer_prefix == baselines.LINGUISTIC_ANSWER_PREFIX:
            assert params.choices == baselines.linguistic_choices()
            return [" Highly likely"]
        view = parse_prompt(prompt)
        if view.substituted is None:
            return list(samples)[: params.n]
        assert params.choices is not None
        return [f" {view.substituted}"]

    return generate


def _engine(**kwargs: object) -> FakeEngine:
    return FakeEngine(letters=_letters, generate=_generate(**kwargs))  # type: ignore[arg-type]


def _score(engine: FakeEngine, method: str, **params: object) -> ScoreResult:
    p = ScoreParams(method=method, samples=5, **params)  # type: ignore[arg-type]
    return asyncio.run(score(Q4, engine, p, TEMPLATE))


def test_token_returns_the_raw_probability_of_the_answer_letter() -> None:
    engine = _engine()
    result = _score(engine, "token")
    assert result.mode == "logprobs"
    assert result.answer == 1
    assert result.confidence == pytest.approx(0.5)  # raw, not 0.5 / 0.8
    assert result.distribution == pytest.approx([0.125, 0.625, 0.25, 0.0])
    assert result.uncertainty == pytest.approx(uf.uncertainty(result.distribution))
    assert result.chains == {} and result.fidelity == [0.0] * 4
    assert engine.batch_sizes == [1]  # one letter read, nothing else
    assert result.usage.engine_calls == 1 and result.usage.prompts == 1


def test_token_needs_letter_logprobs() -> None:
    engine = FakeEngine(generate=_generate())
    with pytest.raises(EngineFeatureMissing, match="white-box"):
        _score(engine, "token")


def test_sampled_is_the_share_of_samples_and_always_samples() -> None:
    engine = _engine()
    result = _score(engine, "sampled", mode="logprobs")  # the mode does not apply
    assert result.mode == "sampling"
    assert result.answer == 1
    assert result.confidence == pytest.approx(3 / 4)  # B, B, B of 4 parsed ("??" dropped)
    assert result.usage.unparsed == 1
    assert result.samples == [" B", " B", " A", "B.", "??"]
    assert len(engine.calls) == 1 and engine.calls[0].params is not None
    assert engine.calls[0].params[0].n == 5 and engine.calls[0].params[0].temperature == 1.0


def test_sampled_with_no_parsed_sample_cannot_be_scored() -> None:
    engine = _engine(samples=["no", "idea", "?", "-", "."])
    with pytest.raises(Unscorable) as info:
        _score(engine, "sampled")
    assert info.value.usage is not None and info.value.usage.unparsed == 5


@pytest.mark.parametrize("mode", ["logprobs", "sampling"])
def test_verbalized_states_a_number_for_the_answer(mode: str) -> None:
    engine = _engine(verbal=" 70%")
    result = _score(engine, "verbalized", mode=mode)
    assert result.mode == mode
    assert result.answer == 1
    assert result.confidence == pytest.approx(0.7)
    asked = [p for c in engine.calls for p in c.prompts if p.answer_prefix == "Confidence:"]
    assert len(asked) == 1 and "Proposed answer: B. beta" in asked[0].user
    assert result.usage.engine_calls == 2
    params = engine.calls[-1].params
    assert params is not None and params[0].temperature == 0.0 and params[0].choices is None


def test_verbalized_without_a_number_is_unscorable_and_counted() -> None:
    engine = _engine(verbal=" I think so")
    with pytest.raises(Unscorable, match="no verbalized confidence") as info:
        _score(engine, "verbalized")
    assert info.value.usage is not None
    assert info.value.usage.unparsed == 1 and info.value.usage.engine_calls == 2


def test_linguistic_picks_a_phrase_by_structured_choice() -> None:
    engine = _engine()
    result = _score(engine, "linguistic")
    assert result.confidence == pytest.approx(0.90)
    assert result.chains == {}
    params = engine.calls[-1].params
    assert params is not None and params[0].choices == baselines.linguistic_choices()


def test_all_methods_together_equal_each_method_alone_and_share_steps() -> None:
    params = ScoreParams(samples=5, mode="logprobs")
    together_engine = _engine()
    together = asyncio.run(score_methods(Q4, together_engine, params, list(METHODS), TEMPLATE))
    alone_prompts = 0
    for method in METHODS:
        engine = _engine()
        alone = asyncio.run(
            score(Q4, engine, ScoreParams(method=method, samples=5, mode="logprobs"), TEMPLATE)
        )
        alone_prompts += sum(engine.batch_sizes)
        shared = together[method]
        assert isinstance(shared, ScoreResult)
        assert shared.answer == alone.answer
        assert shared.confidence == alone.confidence
        assert shared.distribution == alone.distribution
        assert shared.fidelity == alone.fidelity
        assert shared.chains == alone.chains
        assert shared.mode == alone.mode
        assert vars(shared.usage) == vars(alone.usage)  # each reports its own cost
    # The letter read is made once for uf, fidelity, token, verbalized and linguistic,
    # the chains once for uf and fidelity.
    reads = [c for c in together_engine.calls if c.kind == "read_letters"]
    step_one = [c for c in reads if parse_prompt(c.prompts[0]).substituted is None]
    assert len(step_one) == 1
    assert sum(together_engine.batch_sizes) < alone_prompts


def test_score_methods_returns_each_methods_own_failure() -> None:
    engine = _engine(verbal="??")
    outcome = asyncio.run(
        score_methods(Q4, engine, ScoreParams(samples=5), ["uf", "verbalized"], TEMPLATE)
    )
    assert isinstance(outcome["uf"], ScoreResult)
    assert isinstance(outcome["verbalized"], Unscorable)


def test_uf_through_a_question_run_is_unchanged() -> None:
    engine = _engine()
    run = QuestionRun(Q4, engine, ScoreParams(mode="logprobs"), TEMPLATE)
    result = asyncio.run(run.result("uf"))
    expected_f = uf.fidelity(result.distribution, result.chains, 2.0)
    assert result.fidelity == pytest.approx(expected_f)
    assert set(result.chains) == {0, 1, 2}


def test_choice_strings_still_cover_letters() -> None:
    assert choice_strings(["A"]) == ("A", " A")


def test_linguistic_falls_back_to_free_text_without_structured_choice() -> None:
    def generate(prompt: Prompt, params: GenerationParams) -> list[str]:
        if params.choices is not None:
            raise EngineFeatureMissing("structured_outputs.choice")
        return ["I would say it is unlikely."]

    engine = FakeEngine(letters=_letters, generate=generate)
    result = _score(engine, "linguistic")
    assert result.confidence == pytest.approx(0.30)
    assert result.usage.engine_calls == 3  # the letter read, the refused choice, free text
    assert result.usage.unparsed == 0
