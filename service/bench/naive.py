"""The naive, paper-style UF implementation, kept as the benchmark's reference.

K separate single-sample requests, then every chain run one step at a time and one chain
after another: the way a research script calls an API. It computes the same method (and
the same numbers, given the same replies) as ``service.scoring`` in sampling mode."""

from __future__ import annotations

import time

from service.calibration import uf
from service.calibration.prompts import (
    PromptTemplate,
    Question,
    all_options,
    chain_options,
    parse_answer,
    render,
)
from service.engines.base import Engine, GenerationParams
from service.engines.letters import choice_strings
from service.scoring import SAMPLE_MAX_TOKENS, ScoreResult, Unscorable, Usage


async def naive_uf_sampling(
    question: Question,
    engine: Engine,
    template: PromptTemplate,
    *,
    samples: int = 10,
    temperature: float = 1.0,
    tau: float = uf.DEFAULT_TAU,
) -> ScoreResult:
    """UF in sampling mode with one prompt per engine call, strictly in sequence."""
    started = time.perf_counter()
    usage = Usage()
    labels = question.labels
    prompt = render(question, all_options(question), template)
    answers: list[int | None] = []
    texts: list[str] = []
    for _ in range(samples):
        params = GenerationParams(n=1, temperature=temperature, max_tokens=SAMPLE_MAX_TOKENS)
        generation = (await engine.generate([prompt], [params]))[0]
        usage.engine_calls += 1
        usage.prompts += 1
        usage.prompt_tokens += generation.prompt_tokens
        usage.completion_tokens += generation.completion_tokens
        texts.extend(generation.texts)
        label = parse_answer(generation.texts[0] if generation.texts else "", labels)
        answers.append(None if label is None else labels.index(label))
    usage.unparsed += answers.count(None)
    try:
        distribution = uf.distribution_from_samples(answers, len(labels))
    except ValueError as exc:
        raise Unscorable("no sampled reply named an option") from exc

    chains: dict[int, list[int]] = {}
    for start in uf.start_set(distribution):
        chain = uf.ChainState(start, len(labels))
        while not chain.done:
            shown = chain_options(question, start, chain.removed, template.substitute_text)
            allowed = [labels[i] for i in chain.allowed()]
            params = GenerationParams(
                n=1, temperature=0.0, max_tokens=4, choices=choice_strings(allowed)
            )
            generation = (await engine.generate([render(question, shown, template)], [params]))[0]
            usage.engine_calls += 1
            usage.prompts += 1
            usage.prompt_tokens += generation.prompt_tokens
            usage.completion_tokens += generation.completion_tokens
            pick = parse_answer(generation.texts[0] if generation.texts else "", allowed)
            chain.advance(None if pick is None else labels.index(pick))
            usage.unparsed += chain.unparsed
        chains[start] = list(chain.chain)

    answer = uf.answer_index(distribution)
    uncertainty = uf.uncertainty(distribution)
    fidelity = uf.fidelity(distribution, chains, tau)
    return ScoreResult(
        question=question,
        answer=answer,
        confidence=uf.confidence(uncertainty, fidelity[answer]),
        uncertainty=uncertainty,
        distribution=distribution,
        fidelity=fidelity,
        chains=chains,
        method="uf",
        mode="sampling",
        model=engine.model,
        usage=usage,
        latency_s=time.perf_counter() - started,
        samples=texts,
    )
