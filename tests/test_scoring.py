"""Unit tests of service.scoring.score over the scriptable fake engine (no vLLM)."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.calibration import uf
from service.calibration.prompts import LETTERS, Prompt, PromptTemplate, Question
from service.engines.base import EngineError, EngineFeatureMissing, GenerationParams
from service.engines.letters import choice_strings
from service.scoring import SAMPLE_MAX_TOKENS, ScoreParams, ScoreResult, Unscorable, score
from tests.fakes import (
    FakeEngine,
    chain_script_generate,
    chain_script_letters,
    fail_on_calls,
    log,
    parse_prompt,
)

A, B, C, D, E = range(5)
Q5 = Question("Which one?", ("alpha", "beta", "gamma", "delta", "epsilon"))
TEMPLATE = PromptTemplate()

WORKED_FIRST = {"A": log(0.3), "C": log(0.1), "D": log(0.6)}  # B, E: -inf
FIG3_SCRIPT = {"D": ["A", "C"], "A": ["D", "C"], "C": ["A", "D"]}
LOYAL_SCRIPT = {"A": ["D"], "C": ["D"]}  # D stays with itself at once


def _run(engine: FakeEngine, params: ScoreParams, question: Question = Q5) -> ScoreResult:
    return asyncio.run(score(question, engine, params, TEMPLATE))


def _steps(chain: Sequence[int], unparsed: bool, n_options: int) -> int:
    """Engine steps one chain took: one per pick, except that a chain that ran out of
    options (only the start's slot left) ends without asking again."""
    if not unparsed and len(chain) == n_options:
        return n_options - 1
    return len(chain)


def _check_against_formulas(result: ScoreResult, tau: float = 2.0) -> None:
    """The result agrees with the spec's formulas applied to its own P and chains."""
    p = result.distribution
    assert sum(p) == pytest.approx(1.0)
    assert result.answer == uf.answer_index(p)
    assert result.uncertainty == pytest.approx(uf.uncertainty(p), abs=1e-12)
    expected_f = uf.fidelity(p, result.chains, tau)
    assert result.fidelity == pytest.approx(expected_f, abs=1e-12)
    factor = 1.0 - result.uncertainty if result.method == "uf" else 1.0
    assert result.confidence == pytest.approx(factor * expected_f[result.answer], abs=1e-12)


# ---------------------------------------------------------------- logprobs mode


async def test_logprobs_worked_example_fig3() -> None:
    engine = FakeEngine(letters=chain_script_letters(WORKED_FIRST, FIG3_SCRIPT, 5))
    result = await score(Q5, engine, ScoreParams(mode="logprobs"), TEMPLATE)

    assert result.mode == "logprobs"
    assert result.method == "uf"
    assert result.model == "fake-model"
    assert result.question is Q5
    assert result.distribution == pytest.approx([0.3, 0.0, 0.1, 0.6, 0.0], abs=1e-12)
    assert result.answer == D
    assert result.chains == {A: [A, D, C], C: [C, A, D], D: [D, A, C]}
    assert round(result.uncertainty, 5) == 0.55793
    assert round(result.fidelity[D], 5) == 0.44286
    assert round(result.confidence, 5) == 0.19578
    assert result.samples == []
    _check_against_formulas(result)

    # 1 call for step 1, then 3 lockstep steps of the 3 chains
    assert engine.batch_sizes == [1, 3, 3, 3]
    assert result.usage.engine_calls == 4
    assert result.usage.prompts == 10
    assert result.usage.unparsed == 0
    assert result.usage.prompt_tokens == engine.reported_prompt_tokens > 0
    assert result.usage.completion_tokens == engine.reported_completion_tokens == 10
    assert result.latency_s >= 0.0

    first = engine.calls[0]
    assert first.kind == "read_letters"
    assert first.labels == [list("ABCDE")]
    assert first.views[0].substituted is None
    assert first.views[0].options == dict(zip("ABCDE", Q5.options, strict=True))
    # every chain step is one batch of the three chains, in start order, with the
    # options removed so far gone from both the prompt and the allowed letters
    removed = {
        1: {"A": "", "C": "", "D": ""},
        2: {"A": "D", "C": "A", "D": "A"},
        3: {"A": "DC", "C": "AD", "D": "AC"},
    }
    for step in (1, 2, 3):
        call = engine.calls[step]
        assert call.kind == "read_letters"
        assert [v.substituted for v in call.views] == ["A", "C", "D"]
        for view, labels in zip(call.views, call.labels or [], strict=True):
            gone = removed[step][view.substituted or ""]
            expected = [x for x in "ABCDE" if x not in gone]
            assert view.labels == expected
            assert labels == expected


async def test_logprobs_worked_example_loyal_chains() -> None:
    engine = FakeEngine(letters=chain_script_letters(WORKED_FIRST, LOYAL_SCRIPT, 5))
    result = await score(Q5, engine, ScoreParams(mode="logprobs"), TEMPLATE)
    assert result.chains == {A: [A, D], C: [C, D], D: [D]}
    assert round(result.fidelity[D], 5) == 0.73333
    assert round(result.confidence, 5) == 0.32419
    _check_against_formulas(result)
    # D's chain stops after step 1: step 2 holds only the unfinished A and C chains
    assert engine.batch_sizes == [1, 3, 2]
    assert [v.substituted for v in engine.calls[2].views] == ["A", "C"]
    assert result.usage.engine_calls == 3
    assert result.usage.prompts == 1 + 1 + 2 + 2


async def test_logprobs_chain_runs_out_of_options() -> None:
    q = Question("q", ("x", "y", "z"))
    first = {"A": log(0.7), "B": log(0.3)}
    engine = FakeEngine(letters=chain_script_letters(first, {"A": ["C", "B"]}, 3))
    result = await score(q, engine, ScoreParams(mode="logprobs"), TEMPLATE)
    # A -> C -> B: only A's slot is left, so the chain ends without a third question
    assert result.chains == {0: [0, 2, 1], 1: [1]}
    assert engine.batch_sizes == [1, 2, 1]
    assert result.usage.engine_calls == 3
    assert result.usage.prompts == 1 + 2 + 1
    assert result.usage.unparsed == 0
    _check_against_formulas(result)


async def test_logprobs_temperature_scales_the_softmax() -> None:
    first = {"A": log(0.8), "B": log(0.2)}
    engine = FakeEngine(letters=chain_script_letters(first, {}, 2))
    q = Question("q", ("x", "y"))
    result = await score(q, engine, ScoreParams(mode="logprobs", temperature=2.0), TEMPLATE)
    assert result.distribution == pytest.approx([2 / 3, 1 / 3], abs=1e-12)
    _check_against_formulas(result)


async def test_logprobs_eps_bounds_the_start_set() -> None:
    first = {"A": log(0.985), "B": log(0.005), "C": log(0.01)}
    engine = FakeEngine(letters=chain_script_letters(first, {}, 3))
    q = Question("q", ("x", "y", "z"))
    result = await score(q, engine, ScoreParams(mode="logprobs"), TEMPLATE)
    assert set(result.chains) == {0, 2}  # B is under eps = 0.01; C is exactly at it
    result = await score(q, engine, ScoreParams(mode="logprobs", eps=0.02), TEMPLATE)
    assert set(result.chains) == {0}


async def test_skip_mass_drops_least_likely_starts() -> None:
    engine = FakeEngine(letters=chain_script_letters(WORKED_FIRST, FIG3_SCRIPT, 5))
    result = await score(Q5, engine, ScoreParams(mode="logprobs", skip_mass=0.15), TEMPLATE)
    assert result.chains == {A: [A, D, C], D: [D, A, C]}
    assert engine.batch_sizes == [1, 2, 2, 2]
    _check_against_formulas(result)
    assert result.fidelity[D] == pytest.approx((0.6 * 4 / 7 + 0.3 * 2 / 7) / 0.9)


async def test_tau_is_used() -> None:
    engine = FakeEngine(letters=chain_script_letters(WORKED_FIRST, FIG3_SCRIPT, 5))
    result = await score(Q5, engine, ScoreParams(mode="logprobs", tau=3.0), TEMPLATE)
    _check_against_formulas(result, tau=3.0)
    assert result.fidelity[D] == pytest.approx(0.6 * 27 / 39 + 0.3 * 9 / 39 + 0.1 * 3 / 39)


async def test_method_fidelity_drops_the_uncertainty_factor() -> None:
    engine = FakeEngine(letters=chain_script_letters(WORKED_FIRST, FIG3_SCRIPT, 5))
    result = await score(Q5, engine, ScoreParams(mode="logprobs", method="fidelity"), TEMPLATE)
    assert result.method == "fidelity"
    assert result.confidence == pytest.approx(result.fidelity[D], abs=1e-12)
    assert round(result.confidence, 5) == 0.44286
    assert round(result.uncertainty, 5) == 0.55793  # still reported
    _check_against_formulas(result)


# ---------------------------------------------------------------- sampling mode

FIG3_SAMPLES = [" D", "D.", "(D)", "A", "Answer: A", "The answer is C"]
FIG3_REPLIES = {"D": [" A", " C"], "A": [" D", "C."], "C": ["(A)", " D"]}


def _black_box(samples: Sequence[str], replies: dict[str, list[str | None]]) -> FakeEngine:
    return FakeEngine(generate=chain_script_generate(samples, replies, 5))


async def test_sampling_fig3() -> None:
    engine = _black_box(FIG3_SAMPLES, FIG3_REPLIES)
    params = ScoreParams(mode="sampling", samples=6)
    result = await score(Q5, engine, params, TEMPLATE)

    assert result.mode == "sampling"
    assert result.distribution == pytest.approx([2 / 6, 0, 1 / 6, 3 / 6, 0], abs=1e-12)
    assert result.answer == D
    assert result.chains == {A: [A, D, C], C: [C, A, D], D: [D, A, C]}
    assert result.samples == FIG3_SAMPLES
    assert result.fidelity[D] == pytest.approx(3 / 6 * 4 / 7 + 2 / 6 * 2 / 7 + 1 / 6 * 1 / 7)
    _check_against_formulas(result)

    assert engine.batch_sizes == [1, 3, 3, 3]
    assert result.usage.engine_calls == 4
    assert result.usage.prompts == 10
    assert result.usage.unparsed == 0
    assert result.usage.prompt_tokens == engine.reported_prompt_tokens
    assert result.usage.completion_tokens == engine.reported_completion_tokens

    first = engine.calls[0]
    assert first.kind == "generate"
    assert first.params == [
        GenerationParams(n=6, temperature=1.0, top_p=1.0, max_tokens=SAMPLE_MAX_TOKENS)
    ]
    # chain steps: greedy, one reply, a structured choice over the letters still shown
    step3 = engine.calls[3]
    assert [v.substituted for v in step3.views] == ["A", "C", "D"]
    for view, p in zip(step3.views, step3.params or [], strict=True):
        assert p.n == 1
        assert p.temperature == 0.0
        assert p.choices == choice_strings(view.labels)
    assert step3.params is not None
    assert step3.params[0].choices == choice_strings(["A", "B", "E"])


async def test_sampling_passes_temperature_and_k() -> None:
    engine = _black_box([" A"] * 3, {})
    params = ScoreParams(mode="sampling", samples=3, temperature=0.7, top_p=0.9)
    await score(Q5, engine, params, TEMPLATE)
    assert engine.calls[0].params == [
        GenerationParams(n=3, temperature=0.7, top_p=0.9, max_tokens=SAMPLE_MAX_TOKENS)
    ]


async def test_sampling_start_set_ignores_eps() -> None:
    # one sample in 200 (P = 0.005 < eps) still starts a chain in sampling mode
    engine = _black_box([" A"] * 199 + [" B"], {})
    result = await score(Q5, engine, ScoreParams(mode="sampling", samples=200), TEMPLATE)
    assert result.distribution[B] == pytest.approx(0.005)
    assert set(result.chains) == {A, B}


async def test_sampling_unparseable_samples_are_counted() -> None:
    samples = ["Because", " D", "", " A", "D", "I think"]
    engine = _black_box(samples, {"D": [" A"]})
    result = await score(Q5, engine, ScoreParams(mode="sampling", samples=6), TEMPLATE)
    assert result.distribution == pytest.approx([1 / 3, 0, 0, 2 / 3, 0], abs=1e-12)
    assert result.usage.unparsed == 3
    assert result.chains == {A: [A], D: [D, A]}
    _check_against_formulas(result)


async def test_sampling_unparseable_chain_reply_ends_chain() -> None:
    # D's chain: picks A, then says nothing usable; A's chain names D, then D again
    # (a removed option): both chains end where they are and are counted.
    engine = _black_box([" D", " D", " A"], {"D": [" A", None], "A": [" D", " D"]})
    result = await score(Q5, engine, ScoreParams(mode="sampling", samples=3), TEMPLATE)
    assert result.chains == {A: [A, D], D: [D, A]}
    assert result.usage.unparsed == 2
    assert engine.batch_sizes == [1, 2, 2]
    assert result.usage.engine_calls == 3
    assert result.usage.prompts == 5
    _check_against_formulas(result)


async def test_sampling_all_unparseable_is_unscorable() -> None:
    engine = _black_box(["Because", "", "I think", "no"], {})
    with pytest.raises(Unscorable, match="none of the 4 sampled replies named an option"):
        await score(Q5, engine, ScoreParams(mode="sampling", samples=4), TEMPLATE)
    assert len(engine.calls) == 1  # no chains were run


# ---------------------------------------------------------------- modes


def _letters_engine() -> FakeEngine:
    return FakeEngine(
        letters=chain_script_letters(WORKED_FIRST, FIG3_SCRIPT, 5),
        generate=chain_script_generate(FIG3_SAMPLES, FIG3_REPLIES, 5),
    )


async def test_auto_uses_logprobs_when_available() -> None:
    engine = _letters_engine()
    result = await score(Q5, engine, ScoreParams(mode="auto"), TEMPLATE)
    assert result.mode == "logprobs"
    assert {c.kind for c in engine.calls} == {"read_letters"}


async def test_auto_falls_back_to_sampling() -> None:
    engine = _black_box(FIG3_SAMPLES, FIG3_REPLIES)
    assert not engine.supports_letter_logprobs
    result = await score(Q5, engine, ScoreParams(mode="auto", samples=6), TEMPLATE)
    assert result.mode == "sampling"
    assert {c.kind for c in engine.calls} == {"generate"}
    assert result.chains == {A: [A, D, C], C: [C, A, D], D: [D, A, C]}


async def test_explicit_sampling_on_white_box_engine() -> None:
    engine = _letters_engine()
    result = await score(Q5, engine, ScoreParams(mode="sampling", samples=6), TEMPLATE)
    assert result.mode == "sampling"
    assert {c.kind for c in engine.calls} == {"generate"}


async def test_logprobs_mode_without_logprobs_raises() -> None:
    engine = _black_box(FIG3_SAMPLES, FIG3_REPLIES)
    with pytest.raises(EngineFeatureMissing) as info:
        await score(Q5, engine, ScoreParams(mode="logprobs"), TEMPLATE)
    assert info.value.feature == "letter log-probabilities"
    assert "letter log-probabilities" in str(info.value)
    assert engine.calls == []


async def test_engine_errors_propagate() -> None:
    engine = _letters_engine()
    engine.fail = fail_on_calls([2], EngineError("boom"))
    with pytest.raises(EngineError, match="boom"):
        await score(Q5, engine, ScoreParams(mode="logprobs"), TEMPLATE)
    assert engine.batch_sizes == [1, 3, 3]
    assert engine.in_flight == 0


async def test_eps_above_every_probability_does_not_crash() -> None:
    first = {"A": log(0.4), "B": log(0.3), "C": log(0.3)}
    engine = FakeEngine(letters=chain_script_letters(first, {}, 3))
    q = Question("q", ("x", "y", "z"))
    try:
        result = await score(q, engine, ScoreParams(mode="logprobs", eps=0.5), TEMPLATE)
    except Unscorable:
        return
    assert 0.0 <= result.confidence <= 1.0


# ---------------------------------------------------------------- lockstep property


@st.composite
def scripted_questions(
    draw: st.DrawFn,
) -> tuple[int, dict[str, float], dict[str, list[str]]]:
    m = draw(st.integers(2, 8))
    labels = list(LETTERS[:m])
    probs = draw(
        st.lists(st.one_of(st.just(0.0), st.floats(1e-4, 1.0)), min_size=m, max_size=m).filter(
            lambda xs: sum(xs) > 0
        )
    )
    first = {lab: log(p) for lab, p in zip(labels, probs, strict=True)}
    script = {}
    for lab in labels:
        others = draw(st.permutations([x for x in labels if x != lab]))
        script[lab] = list(others[: draw(st.integers(0, m - 1))])
    return m, first, script


@settings(max_examples=40, deadline=None)
@given(scripted_questions())
def test_lockstep_batching_and_usage(
    case: tuple[int, dict[str, float], dict[str, list[str]]],
) -> None:
    m, first, script = case
    labels = list(LETTERS[:m])
    question = Question("q?", tuple(f"option {x}" for x in labels))
    engine = FakeEngine(letters=chain_script_letters(first, script, m))
    result = _run(engine, ScoreParams(mode="logprobs"), question)

    p = uf.distribution_from_logprobs([first[x] for x in labels])
    assert result.distribution == pytest.approx(p, abs=1e-12)
    starts = uf.start_set(p, uf.DEFAULT_EPS)
    expected = {s: [s, *(labels.index(x) for x in script[labels[s]])] for s in starts}
    assert result.chains == expected
    _check_against_formulas(result)

    steps = {s: _steps(c, False, m) for s, c in expected.items()}
    n_steps = max(steps.values())
    assert result.usage.engine_calls == 1 + n_steps == len(engine.calls)
    assert result.usage.prompts == 1 + sum(steps.values())
    assert result.usage.unparsed == 0
    # batch t holds exactly the chains still running at step t, in start order
    for t in range(1, n_steps + 1):
        running = [labels[s] for s in starts if steps[s] >= t]
        assert [v.substituted for v in engine.calls[t].views] == running


def test_fake_parse_prompt_round_trip() -> None:
    prompt = Prompt(
        user="Question: q?\nOptions:\nA. x\nC. All other options are wrong.\nAnswer briefly.",
        answer_prefix="Answer:",
        chat=True,
    )
    view = parse_prompt(prompt)
    assert view.question == "q?"
    assert view.options == {"A": "x", "C": "All other options are wrong."}
    assert view.substituted == "C"
    assert math.isinf(log(0.0))
