"""Score one question over an engine with UF calibration or one of the paper's baselines.

Step 1 is one engine call: the letter read (logprobs mode) or K samples (sampling mode). For
``uf`` and ``fidelity`` all fidelity chains of the question then advance in lockstep: each
step sends the next prompt of every unfinished chain as one concurrent batch, so a question
costs (1 + longest chain) engine round trips, never one chain after another.

Several methods of one question can be scored together (``score_methods``); every engine step
is done once and shared by the methods that need exactly that computation (uf and fidelity
share the chains; every method of one mode shares step 1). Each method's result is the one
``score`` gives for it alone: the same steps, the same prompts, the same arithmetic."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

from service.calibration import baselines, budget, uf
from service.calibration.prompts import (
    Prompt,
    PromptTemplate,
    Question,
    all_options,
    chain_options,
    parse_answer,
    render,
)
from service.context_fit import QuestionSize, check_fits
from service.engines.base import Engine, EngineFeatureMissing, GenerationParams
from service.engines.letters import choice_strings

Method = Literal["uf", "fidelity", "sampled", "token", "verbalized", "linguistic"]
METHODS: tuple[Method, ...] = get_args(Method)
ResolvedMode = Literal["logprobs", "sampling"]
SAMPLE_MAX_TOKENS = 4  # enough for " C.", "(C)" or " The answer is C"
VERBALIZED_MAX_TOKENS = 8  # " 0.85", " 85%", " 0.9 (very sure)"
LINGUISTIC_MAX_TOKENS = 8  # the longest phrase of the list
CHAIN_MAX_TOKENS = 4  # a chain step's reply in sampling mode


class Unscorable(Exception):
    """The model's replies named no option (or stated no confidence): no confidence can
    honestly be given. ``usage`` is what the attempt cost, when known."""

    def __init__(self, message: str, usage: Usage | None = None) -> None:
        super().__init__(message)
        self.usage = usage


@dataclass(frozen=True)
class ScoreParams:
    """How to score one question (the spec's defaults)."""

    method: Method = "uf"
    mode: Literal["auto", "logprobs", "sampling"] = "auto"
    samples: int = 10
    temperature: float = 1.0
    top_p: float = 1.0
    tau: float = uf.DEFAULT_TAU
    eps: float = uf.DEFAULT_EPS
    skip_mass: float = 0.0
    max_prompts: int = budget.DEFAULT_MAX_PROMPTS  # the work budget; 0 = no bound


@dataclass
class Usage:
    """What one question cost the engine, and whether the work budget bound it:
    ``dropped_mass`` is the share of the chain start set's probability mass whose chains
    were not run, ``chains_cut`` the chains ended early because their next step would pass
    the budget."""

    engine_calls: int = 0
    prompts: int = 0
    unparsed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    budget_hit: bool = False
    dropped_mass: float = 0.0
    chains_cut: int = 0

    def add(self, other: Usage) -> None:
        """Add ``other``'s counts to these."""
        self.engine_calls += other.engine_calls
        self.prompts += other.prompts
        self.unparsed += other.unparsed
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.budget_hit = self.budget_hit or other.budget_hit
        self.dropped_mass += other.dropped_mass
        self.chains_cut += other.chains_cut


@dataclass(frozen=True)
class ScoreResult:
    """Everything behind one confidence, options referred to by index."""

    question: Question
    answer: int
    confidence: float
    uncertainty: float
    distribution: list[float]
    fidelity: list[float]
    chains: dict[int, list[int]]
    method: Method
    mode: ResolvedMode
    model: str
    usage: Usage
    latency_s: float
    samples: list[str] = field(default_factory=list)
    #: Every option's confidence under the method, in option order (``answer``'s is
    #: ``confidence``): uf (1 - U) x F(option), fidelity F(option), sampled P(option),
    #: token its letter's raw probability. None for verbalized and linguistic: the model
    #: states a confidence for its own answer only.
    option_confidences: list[float] | None = None


def resolve_mode(requested: str, engine: Engine) -> ResolvedMode:
    """``auto`` means logprobs where the engine has them."""
    if requested == "auto":
        return "logprobs" if engine.supports_letter_logprobs else "sampling"
    if requested == "logprobs" and not engine.supports_letter_logprobs:
        raise EngineFeatureMissing("letter log-probabilities")
    if requested not in ("logprobs", "sampling"):
        raise ValueError(f"unknown mode {requested!r}")
    return requested  # type: ignore[return-value]


def method_mode(method: Method, requested: str, engine: Engine) -> ResolvedMode:
    """The mode a method runs in. ``sampled`` always samples and ``token`` always reads the
    letters (the requested mode does not apply to them); the others follow the request."""
    if method == "sampled":
        return "sampling"
    if method == "token":
        if not engine.supports_letter_logprobs:
            raise EngineFeatureMissing(
                "letter log-probabilities", hint="method token is white-box only"
            )
        return "logprobs"
    return resolve_mode(requested, engine)


def _argmax_label(logprobs: dict[str, float], allowed: Sequence[str]) -> str:
    best = allowed[0]
    for label in allowed[1:]:
        if logprobs[label] > logprobs[best]:
            best = label
    return best


async def _answer_distribution(
    question: Question,
    engine: Engine,
    params: ScoreParams,
    template: PromptTemplate,
    mode: ResolvedMode,
    usage: Usage,
) -> tuple[list[float], list[str], list[float] | None]:
    """Step 1: P over the options, the sampled replies (sampling mode) and the letters'
    raw log-probs (logprobs mode)."""
    prompt = render(question, all_options(question), template)
    labels = question.labels
    usage.engine_calls += 1
    usage.prompts += 1
    if mode == "logprobs":
        read = (await engine.read_letters([prompt], [labels]))[0]
        usage.prompt_tokens += read.prompt_tokens
        usage.completion_tokens += read.completion_tokens
        logprobs = [read.logprobs[label] for label in labels]
        return uf.distribution_from_logprobs(logprobs, params.temperature), [], logprobs
    gen_params = GenerationParams(
        n=params.samples,
        temperature=params.temperature,
        top_p=params.top_p,
        max_tokens=SAMPLE_MAX_TOKENS,
    )
    generation = (await engine.generate([prompt], [gen_params]))[0]
    usage.prompt_tokens += generation.prompt_tokens
    usage.completion_tokens += generation.completion_tokens
    answers: list[int | None] = []
    for text in generation.texts:
        label = parse_answer(text, labels)
        answers.append(None if label is None else labels.index(label))
    usage.unparsed += answers.count(None)
    try:
        return uf.distribution_from_samples(answers, len(labels)), generation.texts, None
    except ValueError as exc:
        raise Unscorable(
            f"none of the {len(answers)} sampled replies named an option "
            f"(e.g. {generation.texts[0][:40]!r})",
            usage,
        ) from exc


async def _run_chains(
    question: Question,
    engine: Engine,
    starts: Sequence[int],
    template: PromptTemplate,
    mode: ResolvedMode,
    usage: Usage,
    distribution: Sequence[float] = (),
    max_prompts: int | None = None,
) -> dict[int, list[int]]:
    """Run the chains of ``starts`` in lockstep. With ``max_prompts``, a round that would
    pass it sends only its most likely chains' steps; the others end where they are (cut)."""
    labels = question.labels
    chains = [uf.ChainState(start, len(labels)) for start in starts]
    while active := [c for c in chains if not c.done]:
        remaining = None if max_prompts is None else max_prompts - usage.prompts
        sent, cut = budget.fit_round(distribution, [c.start for c in active], remaining)
        if cut:
            for chain in active:
                if chain.start in cut:
                    chain.done = True
            usage.chains_cut += len(cut)
            usage.budget_hit = True
            active = [c for c in active if c.start in sent]
            if not active:
                break
        prompts = [
            render(
                question,
                chain_options(question, c.start, c.removed, template.substitute_text),
                template,
            )
            for c in active
        ]
        allowed = [[labels[i] for i in c.allowed()] for c in active]
        usage.engine_calls += 1
        usage.prompts += len(prompts)
        picks: list[str | None]
        if mode == "logprobs":
            reads = await engine.read_letters(prompts, allowed)
            picks = [_argmax_label(r.logprobs, a) for r, a in zip(reads, allowed, strict=True)]
            usage.prompt_tokens += sum(r.prompt_tokens for r in reads)
            usage.completion_tokens += sum(r.completion_tokens for r in reads)
        else:
            gen_params = [
                GenerationParams(
                    n=1, temperature=0.0, max_tokens=CHAIN_MAX_TOKENS, choices=choice_strings(a)
                )
                for a in allowed
            ]
            generations = await engine.generate(prompts, gen_params)
            picks = [
                parse_answer(g.texts[0] if g.texts else "", a)
                for g, a in zip(generations, allowed, strict=True)
            ]
            usage.prompt_tokens += sum(g.prompt_tokens for g in generations)
            usage.completion_tokens += sum(g.completion_tokens for g in generations)
        for chain, pick in zip(active, picks, strict=True):
            chain.advance(None if pick is None else labels.index(pick))
            usage.unparsed += chain.unparsed
    return {c.start: list(c.chain) for c in chains}


@dataclass(frozen=True)
class _StepOne:
    """Step 1 in one mode: P over the options, the letters' raw log-probs (logprobs mode)
    and the sampled replies (sampling mode)."""

    distribution: list[float]
    logprobs: list[float] | None
    samples: list[str]


@dataclass(frozen=True)
class _Stated:
    """A stated confidence (verbalized or linguistic): the reply and what it parsed to."""

    reply: str
    value: float | None


def prompts_sent(
    question: Question, method: Method, mode: ResolvedMode, template: PromptTemplate
) -> list[tuple[Prompt, int]]:
    """Every prompt scoring ``question`` with ``method`` may send, each with the tokens it
    may generate: step 1, the first step of each possible chain (later steps only drop
    options), and the stated-confidence prompt for each possible answer."""
    letters = mode == "logprobs"
    sent = [
        (render(question, all_options(question), template), 1 if letters else SAMPLE_MAX_TOKENS)
    ]
    indexes = range(len(question.options))
    if method in ("uf", "fidelity"):
        new = 1 if letters else CHAIN_MAX_TOKENS
        sent += [
            (
                render(
                    question,
                    chain_options(question, i, frozenset(), template.substitute_text),
                    template,
                ),
                new,
            )
            for i in indexes
        ]
    elif method == "verbalized":
        sent += [
            (baselines.verbalized_prompt(question, i, template), VERBALIZED_MAX_TOKENS)
            for i in indexes
        ]
    elif method == "linguistic":
        sent += [
            (baselines.linguistic_prompt(question, i, template), LINGUISTIC_MAX_TOKENS)
            for i in indexes
        ]
    return sent


def question_size(question: Question, template: PromptTemplate) -> QuestionSize:
    """Bounds over every prompt ``prompts_sent`` may render for ``question``, from text
    lengths alone: each holds the question, every option (one maybe replaced by the
    substitute text) and one instruction, possibly a follow-up naming one option."""
    options = [len(o.encode()) for o in question.options]
    fixed = [
        template.few_shot,
        template.system_prompt or "",
        template.instruction,
        template.substitute_text,
        template.answer_prefix,
        baselines.VERBALIZED_INSTRUCTION,
        baselines.VERBALIZED_ANSWER_PREFIX,
        baselines.LINGUISTIC_INSTRUCTION,
        baselines.LINGUISTIC_ANSWER_PREFIX,
        *(phrase for phrase, _ in baselines.LINGUISTIC_PHRASES),
    ]
    upper = len(question.text.encode()) + sum(options) + max(options)
    upper += sum(len(text.encode()) for text in fixed) + 8 * (len(options) + len(fixed) + 4)
    new_tokens = max(
        SAMPLE_MAX_TOKENS, CHAIN_MAX_TOKENS, VERBALIZED_MAX_TOKENS, LINGUISTIC_MAX_TOKENS
    )
    return QuestionSize(upper, new_tokens, template.chat)


class QuestionRun:
    """The engine work for one question, each step run at most once and shared by every
    method that needs it. A step's cost is kept with it, so each method reports the usage
    it would have alone."""

    def __init__(
        self, question: Question, engine: Engine, params: ScoreParams, template: PromptTemplate
    ) -> None:
        self.question = question
        self.engine = engine
        self.params = params
        self.template = template
        self.started = time.perf_counter()
        self._steps: dict[tuple[str, ...], asyncio.Future[Any]] = {}
        self._usage: dict[tuple[str, ...], Usage] = {}

    async def _once(
        self, key: tuple[str, ...], make: Callable[[Usage], Awaitable[Any]], used: Usage
    ) -> Any:
        """Run ``make`` once for ``key`` (later callers await the same result); add its
        cost to ``used`` whether it succeeded or not. Not shielded: cancelling the scoring
        (a request deadline) cancels the engine call."""
        future = self._steps.get(key)
        if future is None:
            step_usage = Usage()
            self._usage[key] = step_usage
            future = asyncio.ensure_future(make(step_usage))
            self._steps[key] = future
        try:
            return await future
        finally:
            used.add(self._usage[key])

    async def _step_one(self, mode: ResolvedMode, used: Usage) -> _StepOne:
        async def make(usage: Usage) -> _StepOne:
            distribution, samples, logprobs = await _answer_distribution(
                self.question, self.engine, self.params, self.template, mode, usage
            )
            return _StepOne(distribution, logprobs, samples)

        result: _StepOne = await self._once(("step1", mode), make, used)
        return result

    async def _chains(
        self, mode: ResolvedMode, first: _StepOne, used: Usage
    ) -> dict[int, list[int]]:
        async def make(usage: Usage) -> dict[int, list[int]]:
            eps = self.params.eps if mode == "logprobs" else 0.0
            distribution = first.distribution
            spec_starts = uf.start_set(distribution, eps)
            starts = uf.bounded_start_set(distribution, spec_starts, self.params.skip_mass)
            # Step 1 took one prompt; the chains get the rest of the budget.
            chain_prompts = self.params.max_prompts - 1 if self.params.max_prompts > 0 else None
            plan = budget.plan_starts(distribution, starts, chain_prompts)
            if plan.dropped:
                usage.budget_hit = True
                mass = sum(distribution[s] for s in spec_starts)
                usage.dropped_mass = sum(distribution[s] for s in plan.dropped) / mass
            return await _run_chains(
                self.question,
                self.engine,
                plan.starts,
                self.template,
                mode,
                usage,
                distribution,
                chain_prompts,
            )

        chains: dict[int, list[int]] = await self._once(("chains", mode), make, used)
        return chains

    async def _stated(
        self,
        kind: Literal["verbalized", "linguistic"],
        mode: ResolvedMode,
        answer: int,
        used: Usage,
    ) -> _Stated:
        async def make(usage: Usage) -> _Stated:
            if kind == "verbalized":
                prompt = baselines.verbalized_prompt(self.question, answer, self.template)
                gen = GenerationParams(n=1, temperature=0.0, max_tokens=VERBALIZED_MAX_TOKENS)
            else:
                prompt = baselines.linguistic_prompt(self.question, answer, self.template)
                gen = GenerationParams(
                    n=1,
                    temperature=0.0,
                    max_tokens=LINGUISTIC_MAX_TOKENS,
                    choices=baselines.linguistic_choices(),
                )
            usage.engine_calls += 1
            usage.prompts += 1
            try:
                generation = (await self.engine.generate([prompt], [gen]))[0]
            except EngineFeatureMissing:
                if gen.choices is None:
                    raise
                # No structured choice on this engine: ask again in free text and parse it.
                usage.engine_calls += 1
                usage.prompts += 1
                free = dataclasses.replace(gen, choices=None)
                generation = (await self.engine.generate([prompt], [free]))[0]
            usage.prompt_tokens += generation.prompt_tokens
            usage.completion_tokens += generation.completion_tokens
            reply = generation.texts[0] if generation.texts else ""
            if kind == "verbalized":
                value = baselines.parse_verbalized(reply)
            else:
                parsed = baselines.parse_linguistic(reply)
                value = None if parsed is None else parsed[1]
            if value is None:
                usage.unparsed += 1
            return _Stated(reply, value)

        stated: _Stated = await self._once((kind, mode, str(answer)), make, used)
        return stated

    async def result(self, method: Method) -> ScoreResult:
        """Score the question with ``method`` (sharing steps already run)."""
        params = self.params
        if 0 < params.max_prompts < budget.min_prompts(method):
            raise ValueError(
                f"max_prompts={params.max_prompts} is below the "
                f"{budget.min_prompts(method)} prompts method {method} needs"
            )
        mode = method_mode(method, params.mode, self.engine)
        usage = Usage()
        await check_fits(
            self.engine,
            question_size(self.question, self.template),
            lambda: prompts_sent(self.question, method, mode, self.template),
        )
        try:
            first = await self._step_one(mode, usage)
            distribution = first.distribution
            answer = uf.answer_index(distribution)
            uncertainty = uf.uncertainty(distribution)
            chains: dict[int, list[int]] = {}
            fidelity = [0.0] * len(distribution)
            options: list[float] | None = None
            if method == "uf" or method == "fidelity":
                chains = await self._chains(mode, first, usage)
                fidelity = uf.fidelity(distribution, chains, params.tau)
                options = [
                    uf.confidence(uncertainty, f, use_uncertainty=method == "uf") for f in fidelity
                ]
                confidence = options[answer]
            elif method == "sampled":
                options = [
                    baselines.sampled_confidence(distribution, i) for i in range(len(distribution))
                ]
                confidence = options[answer]
            elif method == "token":
                if first.logprobs is None:  # pragma: no cover - token is always logprobs
                    raise EngineFeatureMissing("letter log-probabilities")
                options = [baselines.token_confidence(lp) for lp in first.logprobs]
                confidence = options[answer]
            else:
                stated = await self._stated(method, mode, answer, usage)
                if stated.value is None:
                    raise Unscorable(
                        f"the model stated no {method} confidence (replied {stated.reply[:40]!r})",
                        usage,
                    )
                confidence = stated.value
        except Unscorable as exc:
            if exc.usage is not usage:
                raise Unscorable(str(exc), usage) from exc
            raise
        return ScoreResult(
            question=self.question,
            answer=answer,
            confidence=confidence,
            uncertainty=uncertainty,
            distribution=distribution,
            fidelity=fidelity,
            chains=chains,
            method=method,
            mode=mode,
            model=self.engine.model,
            usage=usage,
            latency_s=time.perf_counter() - self.started,
            samples=first.samples,
            option_confidences=options,
        )


async def score(
    question: Question,
    engine: Engine,
    params: ScoreParams,
    template: PromptTemplate,
) -> ScoreResult:
    """Score one question with ``params.method``: answer, confidence and every part behind
    it. For the baselines ``fidelity`` is all 0 and ``chains`` is empty (no chain is run);
    ``uncertainty`` is the normalised entropy of P, as for uf."""
    return await QuestionRun(question, engine, params, template).result(params.method)


async def score_methods(
    question: Question,
    engine: Engine,
    params: ScoreParams,
    methods: Sequence[Method],
    template: PromptTemplate,
) -> dict[Method, ScoreResult | Exception]:
    """Score one question with several methods at once, sharing identical engine steps.
    Each method gets its result, or the exception scoring it alone would have raised."""
    run = QuestionRun(question, engine, params, template)
    outcomes = await asyncio.gather(*(run.result(m) for m in methods), return_exceptions=True)
    result: dict[Method, ScoreResult | Exception] = {}
    for method, outcome in zip(methods, outcomes, strict=True):
        if isinstance(outcome, BaseException) and not isinstance(outcome, Exception):
            raise outcome
        result[method] = outcome
    return result
