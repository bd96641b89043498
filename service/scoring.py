"""Run UF calibration for one question over an engine.

Step 1 is one engine call. Then all fidelity chains of the question advance in lockstep:
each step sends the next prompt of every unfinished chain as one concurrent batch, so a
question costs (1 + longest chain) engine round trips, never one chain after another."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

from service.calibration import uf
from service.calibration.prompts import (
    PromptTemplate,
    Question,
    all_options,
    chain_options,
    parse_answer,
    render,
)
from service.engines.base import Engine, EngineFeatureMissing, GenerationParams
from service.engines.letters import choice_strings

Method = Literal["uf", "fidelity"]
ResolvedMode = Literal["logprobs", "sampling"]
SAMPLE_MAX_TOKENS = 4  # enough for " C.", "(C)" or " The answer is C"


class Unscorable(Exception):
    """The model's replies named no option: no confidence can honestly be given."""


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


@dataclass
class Usage:
    """What one question cost the engine."""

    engine_calls: int = 0
    prompts: int = 0
    unparsed: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


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


def resolve_mode(requested: str, engine: Engine) -> ResolvedMode:
    """``auto`` means logprobs where the engine has them."""
    if requested == "auto":
        return "logprobs" if engine.supports_letter_logprobs else "sampling"
    if requested == "logprobs" and not engine.supports_letter_logprobs:
        raise EngineFeatureMissing("letter log-probabilities")
    if requested not in ("logprobs", "sampling"):
        raise ValueError(f"unknown mode {requested!r}")
    return requested  # type: ignore[return-value]


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
) -> tuple[list[float], list[str]]:
    prompt = render(question, all_options(question), template)
    labels = question.labels
    usage.engine_calls += 1
    usage.prompts += 1
    if mode == "logprobs":
        read = (await engine.read_letters([prompt], [labels]))[0]
        usage.prompt_tokens += read.prompt_tokens
        usage.completion_tokens += read.completion_tokens
        logprobs = [read.logprobs[label] for label in labels]
        return uf.distribution_from_logprobs(logprobs, params.temperature), []
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
        return uf.distribution_from_samples(answers, len(labels)), generation.texts
    except ValueError as exc:
        raise Unscorable(
            f"none of the {len(answers)} sampled replies named an option "
            f"(e.g. {generation.texts[0][:40]!r})"
        ) from exc


async def _run_chains(
    question: Question,
    engine: Engine,
    starts: Sequence[int],
    template: PromptTemplate,
    mode: ResolvedMode,
    usage: Usage,
) -> dict[int, list[int]]:
    labels = question.labels
    chains = [uf.ChainState(start, len(labels)) for start in starts]
    while active := [c for c in chains if not c.done]:
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
                GenerationParams(n=1, temperature=0.0, max_tokens=4, choices=choice_strings(a))
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


async def score(
    question: Question,
    engine: Engine,
    params: ScoreParams,
    template: PromptTemplate,
) -> ScoreResult:
    """Score one question: answer, confidence and every part behind it."""
    started = time.perf_counter()
    mode = resolve_mode(params.mode, engine)
    usage = Usage()
    distribution, samples = await _answer_distribution(
        question, engine, params, template, mode, usage
    )
    eps = params.eps if mode == "logprobs" else 0.0
    starts = uf.bounded_start_set(distribution, uf.start_set(distribution, eps), params.skip_mass)
    chains = await _run_chains(question, engine, starts, template, mode, usage)
    answer = uf.answer_index(distribution)
    uncertainty = uf.uncertainty(distribution)
    fidelity = uf.fidelity(distribution, chains, params.tau)
    confidence = uf.confidence(uncertainty, fidelity[answer], use_uncertainty=params.method == "uf")
    return ScoreResult(
        question=question,
        answer=answer,
        confidence=confidence,
        uncertainty=uncertainty,
        distribution=distribution,
        fidelity=fidelity,
        chains=chains,
        method=params.method,
        mode=mode,
        model=engine.model,
        usage=usage,
        latency_s=time.perf_counter() - started,
        samples=samples,
    )
