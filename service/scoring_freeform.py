"""Score a free-form question over an engine: sample short answers, group them by meaning,
run UF over the groups as a multiple-choice question (``service.scoring.score``).

The steps, and what each costs under the work budget ``params.max_prompts`` (0 = no bound;
the budget counts prompts as ``service.calibration.budget`` does, so a prompt sampled n
times is one prompt, exactly as step 1 of sampling mode counts its K samples):

1. **Samples**: ONE engine request, the brief-answer prompt (assistant turn pre-filled with
   "The answer is") with ``GenerationParams(n=K)``: 1 prompt.
2. **Grouping**: the exact tier is free; the judge tier asks an ``EquivalenceJudge`` about
   pairs of group representatives, one batch per round (``calibration.freeform``). The
   engine judge costs 1 prompt per pair; the NLI judge costs no engine prompt. The judge may
   use the budget minus the samples' prompt minus the 2 prompts the UF part needs at least
   (its read and its answer's first chain step); the pairs that do not fit are not asked,
   their groups stay apart (``judge_skipped``, ``budget_hit``). Grouping comes first
   because UF's options are its outcome.
3. **UF** over the groups (largest first, at most 26) as a multiple-choice question, in
   the mode ``params.mode`` says, with what remains of the budget. A group's confidence is
   UF's per-option confidence (1 - U) * F(option) (the ``fidelity`` method: F(option)).

One group only (all samples agree): UF needs two options, so the abstention "I don't
know." is offered beside it (``freeform.single_group_option`` says why). All samples
empty or unusable: ``NothingToGroup``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from service import scoring
from service.calibration import budget, freeform, uf
from service.calibration.freeform import FreeformTemplate, Group
from service.calibration.prompts import MAX_OPTIONS, PromptTemplate, Question
from service.engines.base import Engine, EngineFeatureMissing, GenerationParams
from service.scoring import ScoreParams, ScoreResult, Unscorable, Usage

if TYPE_CHECKING:
    from service.config import Settings

SAMPLE_MAX_TOKENS = 12  # a short answer after "The answer is"
SAMPLE_TEMPERATURE = 1.0
JUDGE_CHOICES = ("yes", "no")
FREEFORM_METHODS = ("uf", "fidelity")
# The samples' prompt, then the UF part's read and its answer's first chain step.
MIN_FREEFORM_PROMPTS = budget.freeform_min_prompts("uf")
GivenMatch = Literal["exact", "judge", "absent"]


class NothingToGroup(Unscorable):
    """Every sampled answer was empty or unusable: there is nothing to group, so no
    confidence can honestly be given (the HTTP layer's 422 "nothing to group", like any
    ``Unscorable``)."""


# ----------------------------------------------------------------------- judges


@runtime_checkable
class EquivalenceJudge(Protocol):
    """Decides whether two answers to a question say the same thing.

    ``engine_prompts_per_pair`` is what one pair costs in engine prompts (the budget plans
    the rounds with it; 0: the judge uses no engine). ``same`` answers every pair of one
    round (one batch) and adds what it cost the engine to ``usage`` when given one: the
    work budget counts those prompts."""

    @property
    def engine_prompts_per_pair(self) -> int: ...

    async def same(
        self, question: str, pairs: Sequence[tuple[str, str]], usage: Usage | None = None
    ) -> list[bool]: ...


class EngineJudge:
    """The default judge: the engine's own model, asked with a restricted yes/no choice
    (temperature 0, one token) whether two answers say the same thing given the question;
    all pairs of a round in ONE engine request. An engine without structured choice is
    asked again in free text. A reply that is neither yes nor no counts as "no" (the
    answers stay apart) and as unparsed in ``usage``."""

    engine_prompts_per_pair = 1

    def __init__(self, engine: Engine, template: FreeformTemplate | None = None) -> None:
        self.engine = engine
        self.template = template or FreeformTemplate()

    async def same(
        self, question: str, pairs: Sequence[tuple[str, str]], usage: Usage | None = None
    ) -> list[bool]:
        if not pairs:
            return []
        used = usage if usage is not None else Usage()
        prompts = [freeform.judge_prompt(question, a, b, self.template) for a, b in pairs]
        gen = GenerationParams(n=1, temperature=0.0, max_tokens=1, choices=JUDGE_CHOICES)
        used.engine_calls += 1
        used.prompts += len(prompts)
        try:
            generations = await self.engine.generate(prompts, [gen] * len(prompts))
        except EngineFeatureMissing:
            used.engine_calls += 1
            used.prompts += len(prompts)
            free = dataclasses.replace(gen, choices=None, max_tokens=2)
            generations = await self.engine.generate(prompts, [free] * len(prompts))
        verdicts = []
        for g in generations:
            used.prompt_tokens += g.prompt_tokens
            used.completion_tokens += g.completion_tokens
            verdict = freeform.parse_yes_no(g.texts[0] if g.texts else "")
            used.unparsed += verdict is None
            verdicts.append(bool(verdict))
        return verdicts


class ExactOnlyJudge:
    """No judge: every pair is "different", so only the exact tier (normalised match)
    groups answers; costs nothing. For answers with one canonical written form (numbers),
    where a paraphrase judge can only add errors."""

    engine_prompts_per_pair = 0

    async def same(
        self, question: str, pairs: Sequence[tuple[str, str]], usage: Usage | None = None
    ) -> list[bool]:
        return [False] * len(pairs)


class NliJudge:
    """The alternative judge: an NLI cross-encoder (e.g. DeBERTa-MNLI) loaded with
    ``transformers`` from a local folder (``UFCAL_FREEFORM_NLI_MODEL``; never the hub).
    Two answers are the same when each, after the question, entails the other
    (bidirectional entailment, Kuhn et al. 2023). Costs no engine prompt; runs on the CPU
    (or ``device``) in a worker thread, every pair of a round in one forward pass."""

    engine_prompts_per_pair = 0

    def __init__(self, path: str | Path, *, device: str = "cpu", max_length: int = 256) -> None:
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        self.path = Path(path)
        if not self.path.is_dir():
            raise FileNotFoundError(f"no NLI model folder at {self.path}")
        self.tokenizer: Any = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        self.model: Any = AutoModelForSequenceClassification.from_pretrained(
            self.path, local_files_only=True
        )
        self.model.to(device).eval()
        self.device = device
        self.max_length = max_length
        self.entailment = entailment_label(self.model.config.id2label)

    @classmethod
    def from_settings(cls, settings: Settings) -> NliJudge | None:
        """The NLI judge the settings name, or None (the engine judge then)."""
        if settings.freeform_nli_model is None:
            return None
        return cls(settings.freeform_nli_model)

    def entails(self, premises: Sequence[str], hypotheses: Sequence[str]) -> list[bool]:
        """For each (premise, hypothesis), whether the model's argmax label is entailment."""
        import torch

        if not premises:
            return []
        batch = self.tokenizer(
            list(premises),
            list(hypotheses),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        with torch.no_grad():
            logits = self.model(**batch).logits
        return [int(i) == self.entailment for i in logits.argmax(dim=-1).tolist()]

    def same_sync(self, question: str, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        """``same`` without the thread: both directions of every pair in one batch."""
        first = [f"{question} {a}" for a, _ in pairs]
        second = [f"{question} {b}" for _, b in pairs]
        verdicts = self.entails(first + second, second + first)
        n = len(pairs)
        return [verdicts[i] and verdicts[n + i] for i in range(n)]

    async def same(
        self, question: str, pairs: Sequence[tuple[str, str]], usage: Usage | None = None
    ) -> list[bool]:
        if not pairs:
            return []
        return await asyncio.to_thread(self.same_sync, question, pairs)


def entailment_label(id2label: dict[int, str]) -> int:
    """The id of the entailment class in an NLI model's labels."""
    for i, name in id2label.items():
        if str(name).lower().startswith("entail"):
            return int(i)
    raise ValueError(f"the model has no entailment label: {sorted(id2label.values())}")


# ----------------------------------------------------------------------- results


@dataclass(frozen=True)
class FreeformContext:
    """What surrounds a free-form question: the multiple-choice template of the UF part,
    the free-form prompts' template (default: derived from it), the judge (default: an
    ``EngineJudge`` over the engine, one per question) and the sampling settings."""

    template: PromptTemplate = field(default_factory=PromptTemplate)
    freeform_template: FreeformTemplate | None = None
    judge: EquivalenceJudge | None = None
    sample_max_tokens: int = SAMPLE_MAX_TOKENS
    sample_temperature: float = SAMPLE_TEMPERATURE


@dataclass(frozen=True)
class GroupScore:
    """One group of sampled answers with the UF confidence of its option."""

    representative: str
    members: tuple[str, ...]
    count: int
    sample_indices: tuple[int, ...]
    confidence: float
    given: bool = False


@dataclass(frozen=True)
class FreeformResult:
    """Everything behind the confidences of one free-form question.

    ``answer``/``confidence``: UF's chosen option (the model's answer) and its confidence.
    ``given_*``: the given answer's group (index into ``groups``), how it was matched and
    its confidence (the group's). ``extra_option``: the abstention added to a one-group
    question (not a group). ``uf``: the multiple-choice result (options = the groups'
    representatives, then ``extra_option``); ``uf_prompts`` its prompts. ``usage``: the
    whole question (samples + judge + UF). ``budget_hit``: the budget cut the judge rounds
    or UF's chains."""

    question: str
    groups: list[GroupScore]
    answer: str
    confidence: float
    given_answer: str | None
    given_group: int | None
    given_match: GivenMatch | None
    given_confidence: float | None
    extra_option: str | None
    samples: list[str]
    samples_taken: int
    samples_usable: int
    largest_group_share: float
    semantic_entropy: float
    semantic_entropy_normalized: float
    judge_prompts: int
    judge_rounds: int
    judge_skipped: int
    dropped_groups: int
    dropped_samples: int
    uf: ScoreResult
    uf_prompts: int
    usage: Usage
    budget_hit: bool
    latency_s: float


def option_confidences(result: ScoreResult) -> list[float]:
    """UF's confidence of every option, (1 - U) * F(option) (``fidelity``: F(option))."""
    use_u = result.method == "uf"
    return [uf.confidence(result.uncertainty, f, use_uncertainty=use_u) for f in result.fidelity]


# ----------------------------------------------------------------------- scoring


async def _sample(
    question: str,
    engine: Engine,
    params: ScoreParams,
    ctx: FreeformContext,
    template: FreeformTemplate,
    usage: Usage,
) -> list[str]:
    prompt = freeform.sample_prompt(question, template)
    gen = GenerationParams(
        n=params.samples,
        temperature=ctx.sample_temperature,
        top_p=params.top_p,
        max_tokens=ctx.sample_max_tokens,
    )
    usage.engine_calls += 1
    usage.prompts += 1  # one prompt, n = K (as step 1 of sampling mode counts it)
    generation = (await engine.generate([prompt], [gen]))[0]
    usage.prompt_tokens += generation.prompt_tokens
    usage.completion_tokens += generation.completion_tokens
    return list(generation.texts)


@dataclass
class _Grouping:
    groups: list[Group]
    asked: int = 0
    rounds: int = 0
    skipped: int = 0


async def _judge_rounds(
    question: str, groups: list[Group], judge: EquivalenceJudge, limit: int | None, usage: Usage
) -> _Grouping:
    """The judge tier's rounds (``freeform.judge_requests``), each one batch; ``limit`` is
    the engine prompts the judge may use (None: no bound), counted from what ``usage``
    (the judge's own) says it has cost so far. A round that would pass it sends its first
    pairs (those of the largest groups) and skips the rest."""
    state = _Grouping(groups)
    per_pair = judge.engine_prompts_per_pair
    head = 0
    while head < len(state.groups) - 1:
        pairs = freeform.judge_requests(state.groups, head)
        if limit is not None and per_pair > 0:
            fit = max(0, (limit - usage.prompts) // per_pair)
            if fit < len(pairs):
                state.skipped += len(pairs) - fit
                usage.budget_hit = True
                pairs = pairs[:fit]
        if pairs:
            verdicts = await judge.same(question, [(p.first, p.second) for p in pairs], usage)
            if len(verdicts) != len(pairs):
                raise RuntimeError("the judge gave a different number of verdicts than pairs")
            state.rounds += 1
            state.asked += len(pairs)
            state.groups = freeform.merge_groups(state.groups, pairs, verdicts)
        head += 1
    state.groups = freeform.order_groups(state.groups)
    return state


async def score_freeform(
    question: str,
    engine: Engine,
    params: ScoreParams,
    answer: str | None = None,
    context: FreeformContext | None = None,
) -> FreeformResult:
    """Score a free-form question: the groups of the model's own answers with their UF
    confidence, and the given ``answer``'s (the chatbot's text) when there is one.

    A given answer is located exact tier first, then by the judge (it joins the rounds as
    a group of no sample); when the model never produces anything like it, it is an
    option of its own and its confidence is UF's confidence of that option, 0 when it is
    in no fidelity chain (``freeform.add_candidate`` gives the reasons).

    Raises ``NothingToGroup`` when no sample is usable, ``Unscorable`` when the UF part
    cannot be scored, ``ValueError`` for a method other than uf/fidelity, a budget below
    ``MIN_FREEFORM_PROMPTS`` or a given answer with no content."""
    ctx = context or FreeformContext()
    started = time.perf_counter()
    if params.method not in FREEFORM_METHODS:
        raise ValueError(
            f"free-form questions are scored with {FREEFORM_METHODS}, not {params.method!r}"
        )
    if 0 < params.max_prompts < MIN_FREEFORM_PROMPTS:
        raise ValueError(
            f"max_prompts={params.max_prompts} is below the {MIN_FREEFORM_PROMPTS} prompts "
            "a free-form question needs"
        )
    if answer is not None and not freeform.normalize_answer(answer):
        raise ValueError("the given answer is empty")
    template = ctx.freeform_template or FreeformTemplate.from_template(ctx.template)
    judge = ctx.judge or EngineJudge(engine, template)
    usage = Usage()

    samples = await _sample(question, engine, params, ctx, template, usage)
    cleaned = [freeform.clean_sample(s) for s in samples]
    usable = sum(1 for c in cleaned if c)
    usage.unparsed += len(cleaned) - usable
    groups = freeform.exact_groups(cleaned)
    if not groups:
        example = samples[0][:40] if samples else ""
        raise NothingToGroup(
            f"nothing to group: none of the {len(samples)} sampled answers was usable "
            f"(e.g. {example!r})",
            usage,
        )
    exact = False
    if answer is not None:
        groups, exact = freeform.add_candidate(groups, answer.strip())

    limit = None
    if params.max_prompts > 0:
        limit = params.max_prompts - usage.prompts - budget.min_prompts(params.method)
    judge_usage = Usage()
    grouping = await _judge_rounds(question, groups, judge, limit, judge_usage)
    usage.add(judge_usage)
    groups = grouping.groups

    share = freeform.largest_group_share(groups, usable)
    entropy = freeform.semantic_entropy(groups)
    entropy_n = freeform.normalized_semantic_entropy(groups)
    kept, dropped_samples = freeform.cap_groups(groups, MAX_OPTIONS)
    extra = freeform.single_group_option(kept)
    options = freeform.groups_to_options(kept) + ([extra] if extra else [])

    uf_budget = 0  # no bound
    if params.max_prompts > 0:
        # At least the UF part's minimum: only a judge that had to ask twice (no structured
        # choice on the engine) can have taken more than it was given.
        uf_budget = max(budget.min_prompts(params.method), params.max_prompts - usage.prompts)
    uf_params = dataclasses.replace(params, max_prompts=uf_budget)
    mcq = Question(question, tuple(options))
    try:
        result = await scoring.score(mcq, engine, uf_params, ctx.template)
    except Unscorable as exc:
        if exc.usage is not None:
            usage.add(exc.usage)
        raise Unscorable(str(exc), usage) from exc
    usage.add(result.usage)

    confidences = option_confidences(result)
    scored = [
        GroupScore(g.representative, g.members, g.count, g.indices, confidences[i], g.given)
        for i, g in enumerate(kept)
    ]
    given_index = freeform.given_group(kept) if answer is not None else None
    match: GivenMatch | None = None
    if given_index is not None:
        match = "exact" if exact else ("judge" if kept[given_index].count > 0 else "absent")
    return FreeformResult(
        question=question,
        groups=scored,
        answer=options[result.answer],
        confidence=result.confidence,
        given_answer=answer,
        given_group=given_index,
        given_match=match,
        given_confidence=None if given_index is None else confidences[given_index],
        extra_option=extra,
        samples=samples,
        samples_taken=len(samples),
        samples_usable=usable,
        largest_group_share=share,
        semantic_entropy=entropy,
        semantic_entropy_normalized=entropy_n,
        judge_prompts=judge_usage.prompts,
        judge_rounds=grouping.rounds,
        judge_skipped=grouping.skipped,
        dropped_groups=len(groups) - len(kept),
        dropped_samples=dropped_samples,
        uf=result,
        uf_prompts=result.usage.prompts,
        usage=usage,
        budget_hit=grouping.skipped > 0 or result.usage.budget_hit,
        latency_s=time.perf_counter() - started,
    )
