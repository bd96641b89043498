"""Unit tests of service.scoring_freeform over the scriptable fake engine (no vLLM)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import pytest

from service.calibration import freeform as ff
from service.calibration import uf
from service.calibration.prompts import Prompt
from service.engines.base import EngineFeatureMissing, GenerationParams
from service.scoring import ScoreParams, Unscorable, Usage
from service.scoring_freeform import (
    JUDGE_CHOICES,
    SAMPLE_MAX_TOKENS,
    EngineJudge,
    FreeformContext,
    FreeformResult,
    NliJudge,
    NothingToGroup,
    entailment_label,
    option_confidences,
    score_freeform,
)
from tests.fakes import FakeEngine, log, parse_prompt

QUESTION = "What is the capital of France?"
PARIS = {"paris", "city of light", "lutetia"}
_JUDGE_LINES = re.compile(r"Answer 1: (.*)\nAnswer 2: (.*)\n")


def _same_meaning(a: str, b: str) -> bool:
    a, b = ff.normalize_answer(a), ff.normalize_answer(b)
    return a == b or (a in PARIS and b in PARIS)


class Model:
    """A scripted model for the three kinds of prompt a free-form question sends.

    * the brief-answer prompt: returns ``samples`` (raw continuations of "The answer is");
    * the judge prompt: "yes" when ``same`` says the two answers mean the same;
    * the multiple-choice prompts of the UF part, scripted by option TEXT: step 1 reads
      ``weights`` (logprobs mode) or names the options of ``mc_samples`` (sampling mode);
      a chain step picks the shown option ranked first in ``ranking`` (the substituted
      slot counts as its start's text), so a model ranking its own answer first is loyal.
    """

    def __init__(
        self,
        samples: Sequence[str],
        weights: Mapping[str, float] | None = None,
        ranking: Sequence[str] = (),
        mc_samples: Sequence[str] = (),
        same: Callable[[str, str], bool] = _same_meaning,
    ) -> None:
        self.samples = list(samples)
        self.weights = dict(weights or {})
        self.ranking = list(ranking)
        self.mc_samples = list(mc_samples)
        self.same = same
        self._start_texts: dict[str, dict[str, str]] = {}  # prefix key -> label -> text

    def _rank(self, text: str) -> int:
        key = ff.normalize_answer(text)
        ranked = [ff.normalize_answer(r) for r in self.ranking]
        return ranked.index(key) if key in ranked else len(ranked)

    def _chain_pick(self, prompt: Prompt, labels: Sequence[str]) -> str:
        view = parse_prompt(prompt)
        start = view.substituted
        assert start is not None
        # The start's own text is what its slot stood for; the prompt shows the substitute.
        texts = {lab: self._start_texts.get(prompt.prefix_key, {}).get(lab, "") for lab in labels}
        texts.update({lab: view.options[lab] for lab in labels if lab != start})
        return min(labels, key=lambda lab: (self._rank(texts[lab]), lab))

    def letters(self, prompt: Prompt, labels: Sequence[str]) -> Mapping[str, float]:
        view = parse_prompt(prompt)
        if view.substituted is None:
            self._start_texts[prompt.prefix_key] = dict(view.options)
            return {lab: log(self.weights.get(view.options[lab], 0.0)) for lab in labels}
        pick = self._chain_pick(prompt, labels)
        return {lab: (0.0 if lab == pick else -10.0) for lab in labels}

    def generate(self, prompt: Prompt, params: GenerationParams) -> Sequence[str]:
        if prompt.answer_prefix == ff.SAMPLE_PREFIX:
            return self.samples
        if prompt.answer_prefix == ff.JUDGE_PREFIX:
            m = _JUDGE_LINES.search(prompt.user)
            assert m is not None
            return ["yes" if self.same(m.group(1), m.group(2)) else "no"]
        view = parse_prompt(prompt)
        if view.substituted is None:
            self._start_texts[prompt.prefix_key] = dict(view.options)
            by_text = {t: lab for lab, t in view.options.items()}
            return [f" {by_text[t]}" for t in self.mc_samples]
        labels = [lab for lab in view.options]
        return [f" {self._chain_pick(prompt, labels)}"]

    def engine(self, white_box: bool = True) -> FakeEngine:
        return FakeEngine(letters=self.letters if white_box else None, generate=self.generate)


def _run(
    engine: FakeEngine,
    params: ScoreParams | None = None,
    answer: str | None = None,
    context: FreeformContext | None = None,
) -> FreeformResult:
    params = params or ScoreParams(mode="logprobs", samples=5)
    return asyncio.run(score_freeform(QUESTION, engine, params, answer, context))


def _judge_calls(engine: FakeEngine) -> list[int]:
    return [
        len(c.prompts)
        for c in engine.calls
        if c.kind == "generate" and c.prompts[0].answer_prefix == ff.JUDGE_PREFIX
    ]


def _check_accounting(result: FreeformResult, engine: FakeEngine) -> None:
    sent = sum(len(c.prompts) for c in engine.calls)
    assert result.usage.prompts == sent == 1 + result.judge_prompts + result.uf_prompts
    assert result.usage.engine_calls == len(engine.calls)
    assert result.usage.prompt_tokens == engine.reported_prompt_tokens
    assert result.usage.completion_tokens == engine.reported_completion_tokens
    confidences = option_confidences(result.uf)
    assert [g.confidence for g in result.groups] == confidences[: len(result.groups)]
    assert result.confidence == pytest.approx(confidences[result.uf.answer])


SAMPLES = [" Paris.", " Paris", " the City of Light.", " Rome", " Lutetia\nQuestion: 2"]
WEIGHTS = {"Paris": 0.7, "Rome": 0.3}


# ---------------------------------------------------------------- samples and judge


def test_k_samples_are_one_engine_request() -> None:
    model = Model(SAMPLES, WEIGHTS, ranking=["Paris", "Rome"])
    engine = model.engine()
    result = _run(engine, ScoreParams(mode="logprobs", samples=5))
    first = engine.calls[0]
    assert first.kind == "generate" and len(first.prompts) == 1
    assert first.params == [GenerationParams(n=5, temperature=1.0, max_tokens=SAMPLE_MAX_TOKENS)]
    prompt = first.prompts[0]
    assert prompt.messages()[-1] == {"role": "assistant", "content": "The answer is"}
    assert QUESTION in prompt.user
    assert result.samples == SAMPLES and result.samples_taken == 5 == result.samples_usable
    _check_accounting(result, engine)


def test_judge_round_is_one_batch_against_the_representative() -> None:
    model = Model(SAMPLES, WEIGHTS, ranking=["Paris", "Rome"])
    engine = model.engine()
    result = _run(engine)
    # Exact tier: Paris x2, City of Light, Rome, Lutetia. Round 0: Paris against the three
    # others in ONE batch; City of Light and Lutetia join; round 1 (Rome) has no pair.
    assert _judge_calls(engine) == [3]
    judge_call = next(c for c in engine.calls if c.prompts[0].answer_prefix == ff.JUDGE_PREFIX)
    assert all("Answer 1: Paris\n" in p.user for p in judge_call.prompts)
    assert (
        judge_call.params
        == [GenerationParams(n=1, temperature=0.0, max_tokens=1, choices=JUDGE_CHOICES)] * 3
    )
    assert result.judge_prompts == 3 and result.judge_rounds == 1 and result.judge_skipped == 0
    assert [(g.representative, g.count) for g in result.groups] == [("Paris", 4), ("Rome", 1)]
    assert result.groups[0].members == ("Paris", "the City of Light", "Lutetia")
    assert result.groups[0].sample_indices == (0, 1, 2, 4)
    assert result.uf.question.options == ("Paris", "Rome")
    assert result.largest_group_share == pytest.approx(0.8)
    four_one = ff.exact_groups(["x", "x", "x", "x", "y"])
    assert result.semantic_entropy == pytest.approx(ff.semantic_entropy(four_one))
    _check_accounting(result, engine)


def test_loyal_model_worked_confidence() -> None:
    # P = (0.7, 0.3); both chains stay with their start: F = P, confidence = (1 - U) F.
    model = Model(SAMPLES, WEIGHTS, ranking=["Paris", "Rome"])
    result = _run(model.engine())
    u = uf.uncertainty([0.7, 0.3])
    assert result.uf.chains == {0: [0], 1: [1, 0]}  # Rome's chain falls to Paris first
    f = uf.fidelity([0.7, 0.3], result.uf.chains)
    assert result.groups[0].confidence == pytest.approx((1 - u) * f[0])
    assert result.answer == "Paris" and result.confidence == result.groups[0].confidence


def test_judge_tier_only_where_exact_does_not_decide() -> None:
    model = Model([" Paris", " paris.", " The Paris"], {"Paris": 1.0})
    engine = model.engine()
    result = _run(engine, ScoreParams(mode="logprobs", samples=3))
    assert _judge_calls(engine) == []  # one exact group: nothing to ask
    assert result.judge_prompts == 0 and len(result.groups) == 1


def test_engine_judge_without_structured_choice_asks_in_free_text() -> None:
    def no_choices(prompt: Prompt, params: GenerationParams) -> Sequence[str]:
        if params.choices is not None:
            raise EngineFeatureMissing("structured choice")
        return [" Yes"]

    engine = FakeEngine(generate=no_choices)
    usage = Usage()
    verdicts = asyncio.run(EngineJudge(engine).same(QUESTION, [("a", "b")] * 2, usage))
    assert verdicts == [True, True]
    assert usage.engine_calls == 2 and usage.prompts == 4


def test_unparsed_verdict_counts_as_different() -> None:
    engine = FakeEngine(generate=lambda p, g: ["maybe"])
    usage = Usage()
    assert asyncio.run(EngineJudge(engine).same(QUESTION, [("a", "b")], usage)) == [False]
    assert usage.unparsed == 1


# ---------------------------------------------------------------- budget


def test_budget_cuts_the_judge_and_leaves_the_uf_minimum() -> None:
    samples = [" Paris", " Rome", " Berlin", " Madrid", " Lisbon"]
    model = Model(samples, {s.strip(): 0.2 for s in samples}, ranking=["Paris"])
    engine = model.engine()
    result = _run(engine, ScoreParams(mode="logprobs", samples=5, max_prompts=6))
    # 6 = 1 (samples, n = 5) + 3 judge prompts (6 - 1 - 2 reserved for UF) + 2 for UF.
    assert result.judge_prompts == 3 and result.judge_skipped == 1 + 3 + 2 + 1
    assert result.budget_hit and result.usage.budget_hit
    assert result.usage.prompts == 6 and result.uf_prompts == 2
    assert len(result.groups) == 5  # nothing merged: every option stays
    _check_accounting(result, engine)


def test_unbounded_budget_judges_every_pair() -> None:
    samples = [" Paris", " Rome", " Berlin", " Madrid"]
    model = Model(samples, {s.strip(): 0.25 for s in samples}, ranking=["Paris"])
    engine = model.engine()
    result = _run(engine, ScoreParams(mode="logprobs", samples=4, max_prompts=0))
    assert _judge_calls(engine) == [3, 2, 1]
    assert result.judge_prompts == 6 and not result.budget_hit
    _check_accounting(result, engine)


def test_uf_part_gets_what_remains() -> None:
    model = Model(SAMPLES, WEIGHTS, ranking=["Rome", "Paris"])  # disloyal: chains step
    engine = model.engine()
    result = _run(engine, ScoreParams(mode="logprobs", samples=5, max_prompts=5))
    assert result.judge_prompts == 2  # 5 - 1 - 2: round 0 sends two of its three pairs
    assert result.uf_prompts <= 5 - 1 - 2
    assert result.usage.prompts <= 5
    _check_accounting(result, engine)


def test_budget_below_the_minimum_is_refused() -> None:
    engine = Model(SAMPLES).engine()
    with pytest.raises(ValueError, match="max_prompts"):
        _run(engine, ScoreParams(mode="logprobs", samples=5, max_prompts=2))
    assert engine.calls == []


def test_other_methods_are_refused() -> None:
    with pytest.raises(ValueError, match="uf"):
        _run(Model(SAMPLES).engine(), ScoreParams(method="sampled"))


# ---------------------------------------------------------------- the given answer


def test_given_answer_exact() -> None:
    model = Model(SAMPLES, WEIGHTS, ranking=["Paris", "Rome"])
    result = _run(model.engine(), answer="paris")
    assert result.given_match == "exact" and result.given_group == 0
    assert result.groups[0].given and result.groups[0].count == 4
    assert result.given_confidence == result.groups[0].confidence
    assert result.largest_group_share == pytest.approx(0.8)  # the answer counts no sample


def test_given_answer_joins_a_group_through_the_judge() -> None:
    model = Model([" Paris", " Rome", " Paris"], WEIGHTS, ranking=["Paris", "Rome"])
    engine = model.engine()
    result = _run(engine, ScoreParams(mode="logprobs", samples=3), answer="The City of Light")
    assert result.given_match == "judge" and result.given_group == 0
    assert "The City of Light" in result.groups[0].members and result.groups[0].count == 2
    assert result.uf.question.options == ("Paris", "Rome")
    assert _judge_calls(engine) == [2]  # Paris~Rome and Paris~answer in one batch
    assert result.given_confidence == result.groups[0].confidence
    _check_accounting(result, engine)


def test_given_answer_absent_never_picked_gets_zero() -> None:
    # The model never names Berlin and never falls back to it: it is in no chain, F = 0.
    model = Model(SAMPLES, {"Paris": 0.7, "Rome": 0.3}, ranking=["Paris", "Rome"])
    engine = model.engine()
    result = _run(engine, answer="Berlin")
    assert result.given_match == "absent" and result.given_group == 2
    assert result.uf.question.options == ("Paris", "Rome", "Berlin")
    assert result.groups[2].count == 0 and result.groups[2].members == ("Berlin",)
    assert all(2 not in chain for chain in result.uf.chains.values())
    assert result.given_confidence == 0.0
    _check_accounting(result, engine)


def test_given_answer_absent_reached_in_a_chain_is_low_but_not_zero() -> None:
    # Berlin is the model's fallback once Paris and Rome are gone: F(Berlin) > 0, small.
    model = Model(SAMPLES, {"Paris": 0.7, "Rome": 0.3}, ranking=["Rome", "Berlin", "Paris"])
    result = _run(model.engine(), answer="Berlin")
    assert result.given_match == "absent"
    conf = result.given_confidence
    assert conf is not None and 0.0 < conf < result.confidence
    f = uf.fidelity(result.uf.distribution, result.uf.chains)
    assert conf == pytest.approx((1 - result.uf.uncertainty) * f[2])


def test_given_answer_must_have_content() -> None:
    with pytest.raises(ValueError, match="empty"):
        _run(Model(SAMPLES).engine(), answer=" the ")


# ---------------------------------------------------------------- nothing or one group


def test_all_samples_unusable_is_nothing_to_group() -> None:
    engine = Model(["", " ...", "\n\n", " the"]).engine()
    with pytest.raises(NothingToGroup, match="nothing to group") as info:
        _run(engine, ScoreParams(mode="logprobs", samples=4))
    assert isinstance(info.value, Unscorable)
    assert info.value.usage is not None and info.value.usage.prompts == 1
    assert info.value.usage.unparsed == 4
    assert len(engine.calls) == 1


def test_unusable_samples_are_dropped_and_counted() -> None:
    model = Model([" Paris", "", " Paris", " ..."], {"Paris": 1.0}, ranking=["Paris"])
    result = _run(model.engine(), ScoreParams(mode="logprobs", samples=4))
    assert result.samples_usable == 2 and result.largest_group_share == 1.0


def test_one_group_is_offered_an_abstention() -> None:
    model = Model([" Paris."] * 4, {"Paris": 0.9, "I don't know.": 0.1}, ranking=["Paris"])
    engine = model.engine()
    result = _run(engine, ScoreParams(mode="logprobs", samples=4))
    assert result.extra_option == ff.ABSTAIN_OPTION
    assert result.uf.question.options == ("Paris", "I don't know.")
    assert len(result.groups) == 1 and result.groups[0].count == 4
    assert result.semantic_entropy == 0.0 and result.largest_group_share == 1.0
    u = uf.uncertainty([0.9, 0.1])
    f = uf.fidelity([0.9, 0.1], result.uf.chains)
    assert result.groups[0].confidence == pytest.approx((1 - u) * f[0])
    assert 0 < result.groups[0].confidence < 1
    _check_accounting(result, engine)


def test_one_group_with_an_absent_answer_needs_no_abstention() -> None:
    model = Model([" Paris"] * 3, {"Paris": 0.8, "Rome": 0.2}, ranking=["Paris"])
    result = _run(model.engine(), ScoreParams(mode="logprobs", samples=3), answer="Rome")
    assert result.extra_option is None
    assert result.uf.question.options == ("Paris", "Rome")


# ---------------------------------------------------------------- modes


def test_sampling_mode() -> None:
    model = Model(
        SAMPLES,
        ranking=["Paris", "Rome"],
        mc_samples=["Paris"] * 3 + ["Rome"] * 2,
    )
    engine = model.engine(white_box=False)
    result = _run(engine, ScoreParams(mode="sampling", samples=5), answer="Paris")
    assert result.uf.mode == "sampling"
    assert result.uf.distribution == pytest.approx([0.6, 0.4])
    assert all(c.kind == "generate" for c in engine.calls)
    assert result.given_match == "exact" and result.given_confidence == result.confidence
    _check_accounting(result, engine)


def test_logprobs_mode_reads_letters() -> None:
    model = Model(SAMPLES, WEIGHTS, ranking=["Paris", "Rome"])
    engine = model.engine()
    result = _run(engine, ScoreParams(mode="logprobs", samples=5))
    assert result.uf.mode == "logprobs"
    assert any(c.kind == "read_letters" for c in engine.calls)
    assert result.uf.distribution == pytest.approx([0.7, 0.3])


def test_fidelity_method_drops_the_uncertainty_factor() -> None:
    model = Model(SAMPLES, WEIGHTS, ranking=["Paris", "Rome"])
    result = _run(model.engine(), ScoreParams(method="fidelity", mode="logprobs", samples=5))
    assert result.groups[0].confidence == pytest.approx(result.uf.fidelity[0])


def test_a_custom_judge_plugs_in() -> None:
    class Everything:
        engine_prompts_per_pair = 0

        async def same(
            self, question: str, pairs: Sequence[tuple[str, str]], usage: Usage | None = None
        ) -> list[bool]:
            return [True] * len(pairs)

    model = Model([" Paris", " Rome"], {"Paris": 0.5, "I don't know.": 0.5}, ranking=["Paris"])
    engine = model.engine()
    result = _run(
        engine, ScoreParams(mode="logprobs", samples=2), context=FreeformContext(judge=Everything())
    )
    assert _judge_calls(engine) == [] and result.judge_prompts == 0 and result.judge_rounds == 1
    assert [g.members for g in result.groups] == [("Paris", "Rome")]


# ---------------------------------------------------------------- the NLI judge


def _tiny_nli(path: Path, entail_bias: float) -> Path:
    """A randomly initialised 1-layer BERT NLI classifier, built offline: a word-piece
    vocabulary written here, the classifier's bias set to decide every pair."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "what", "is", "paris", "rome", "?"]
    vocab = path / "vocab.txt"
    path.mkdir(parents=True, exist_ok=True)
    vocab.write_text("\n".join(words) + "\n")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(path)
    labels = {0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"}
    config = BertConfig(
        vocab_size=len(words),
        hidden_size=8,
        num_hidden_layers=1,
        num_attention_heads=1,
        intermediate_size=16,
        max_position_embeddings=64,
        num_labels=3,
        id2label=labels,
        label2id={v: k for k, v in labels.items()},
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 0.0, entail_bias]))
    model.save_pretrained(path)
    return path


def test_nli_judge_loads_a_local_model(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    yes = NliJudge(_tiny_nli(tmp_path / "yes", 5.0))
    assert yes.entailment == 2 and yes.engine_prompts_per_pair == 0
    assert asyncio.run(yes.same("what is?", [("paris", "rome"), ("rome", "rome")])) == [True] * 2
    no = NliJudge(_tiny_nli(tmp_path / "no", -5.0))
    assert asyncio.run(no.same("what is?", [("paris", "paris")])) == [False]
    assert asyncio.run(no.same("what is?", [])) == []


def test_nli_judge_needs_entailment_both_ways(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    judge = NliJudge(_tiny_nli(tmp_path / "m", 5.0))
    # "paris" entails "city of light" but not the reverse: not the same.
    judge.entails = lambda premises, hypotheses: [  # type: ignore[method-assign]
        p.endswith("paris") for p in premises
    ]
    assert judge.same_sync("q", [("paris", "city of light"), ("paris", "paris")]) == [False, True]


def test_nli_judge_scores_a_question(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    judge = NliJudge(_tiny_nli(tmp_path / "m", 5.0))  # says everything is the same
    model = Model([" Paris", " Rome"], {"Paris": 0.5, "I don't know.": 0.5}, ranking=["Paris"])
    engine = model.engine()
    result = _run(
        engine, ScoreParams(mode="logprobs", samples=2), context=FreeformContext(judge=judge)
    )
    assert _judge_calls(engine) == [] and result.judge_prompts == 0
    assert len(result.groups) == 1 and result.extra_option == ff.ABSTAIN_OPTION


def test_nli_judge_refuses_a_missing_folder_and_settings_default(tmp_path: Path) -> None:
    pytest.importorskip("transformers")
    with pytest.raises(FileNotFoundError):
        NliJudge(tmp_path / "nowhere")
    from service.config import Settings

    assert NliJudge.from_settings(Settings(freeform_nli_model=None)) is None


def test_entailment_label() -> None:
    assert entailment_label({0: "entailment", 1: "neutral", 2: "contradiction"}) == 0
    assert entailment_label({0: "CONTRADICTION", 1: "NEUTRAL", 2: "ENTAILMENT"}) == 2
    with pytest.raises(ValueError, match="entailment"):
        entailment_label({0: "LABEL_0", 1: "LABEL_1"})
