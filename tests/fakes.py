"""A scriptable in-process engine for tests: implements ``service.engines.base.Engine``
without vLLM.

The model is two plain functions:

* ``letters(prompt, labels) -> {label: logprob}`` answers ``read_letters`` (white-box mode).
  Labels it leaves out get ``-inf``; extra labels are ignored.
* ``generate(prompt, params) -> [text, ...]`` answers ``generate`` (sampling mode); it should
  return ``params.n`` texts (the fake does not enforce it).

Either may be left out: without ``letters`` the engine reports
``supports_letter_logprobs = False`` and ``read_letters`` raises ``EngineFeatureMissing``
(like a black-box server); without ``generate`` the engine raises ``EngineFeatureMissing``
for generation.

Every call is recorded in ``engine.calls`` (a ``FakeCall`` per batch, in order), so a test
can check exactly which prompts were sent together. ``parse_prompt`` turns a rendered
``Prompt`` back into its option lines, which is what a scripted model usually needs:

    def letters(prompt, labels):
        view = parse_prompt(prompt)
        if view.substituted is None:          # step 1: the plain question
            return {"A": -0.1, "B": -2.5}
        return {view.substituted: 0.0}        # chains: always stay with the start

    engine = FakeEngine(letters=letters)

Fault and load injection, all optional:

* ``delay``: seconds to sleep inside every call (a number, or ``f(call) -> seconds``).
* ``fail``: an exception raised by every call, or ``f(call) -> exception | None`` deciding per
  call (``fail_on_calls`` builds one that fails given call numbers). A failing call is still
  recorded (with ``call.failed`` set).
* ``start_event``: ``start()`` waits until the event is set (an engine that is loading);
  ``start_error``: ``start()`` raises it.
* ``context_length``: what ``count_tokens`` reports as the model's context (prompts are
  counted with the token model below; ``counted`` lists the prompts it measured).
* ``healthy``: set it to False to make ``ready()`` report the engine down.
* ``in_flight`` / ``max_in_flight``: how many calls run now / ran at once at most.

Token counts are deterministic: a prompt costs one token per whitespace-separated word of its
text (user block + answer prefix, plus the system prompt), a letter read costs one completion
token, a generated text one per word (at least 1). ``reported_prompt_tokens`` and
``reported_completion_tokens`` sum what the engine reported, for checking ``usage``.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from service.calibration.prompts import SUBSTITUTE_TEXT, Prompt
from service.engines.base import (
    EngineFeatureMissing,
    Generation,
    GenerationParams,
    LetterRead,
    TokenCounts,
)

LettersFn = Callable[[Prompt, Sequence[str]], Mapping[str, float]]
GenerateFn = Callable[[Prompt, GenerationParams], Sequence[str]]


@dataclass
class FakeCall:
    """One batch the engine received."""

    index: int
    kind: Literal["read_letters", "generate"]
    prompts: list[Prompt]
    labels: list[list[str]] | None = None
    params: list[GenerationParams] | None = None
    failed: BaseException | None = None

    @property
    def views(self) -> list[PromptView]:
        return [parse_prompt(p) for p in self.prompts]


FailFn = Callable[[FakeCall], BaseException | None]


@dataclass(frozen=True)
class PromptView:
    """What a rendered prompt shows: option lines by label, and which label (if any) carries
    the substitute text (a fidelity-chain step)."""

    question: str
    options: dict[str, str]
    substituted: str | None

    @property
    def labels(self) -> list[str]:
        return list(self.options)


_OPTION_LINE = re.compile(r"^([A-Z])\. (.*)$")


def parse_prompt(prompt: Prompt, substitute_text: str = SUBSTITUTE_TEXT) -> PromptView:
    """Read the question and the option lines back out of a rendered prompt."""
    lines = prompt.user.splitlines()
    question = ""
    options: dict[str, str] = {}
    in_options = False
    for line in lines:
        if line.startswith("Question: "):
            question = line[len("Question: ") :]
            in_options = False
            options = {}  # the last question block wins (few-shot examples come first)
        elif line == "Options:":
            in_options = True
        elif in_options and (m := _OPTION_LINE.match(line)):
            options[m.group(1)] = m.group(2)
        elif in_options:
            in_options = False
    substituted = next((k for k, v in options.items() if v == substitute_text), None)
    return PromptView(question, options, substituted)


def fail_on_calls(calls: Iterable[int], exc: BaseException) -> FailFn:
    """A ``fail`` function raising ``exc`` on the given 0-based call numbers."""
    wanted = set(calls)
    return lambda call: exc if call.index in wanted else None


def _words(text: str) -> int:
    return len(text.split())


class FakeEngine:
    """A scriptable ``Engine``; see the module docstring."""

    def __init__(
        self,
        letters: LettersFn | None = None,
        generate: GenerateFn | None = None,
        *,
        model: str = "fake-model",
        delay: float | Callable[[FakeCall], float] = 0.0,
        fail: BaseException | FailFn | None = None,
        start_event: asyncio.Event | None = None,
        start_error: BaseException | None = None,
        context_length: int = 1_000_000,
    ) -> None:
        self._letters = letters
        self._generate = generate
        self._model = model
        self.delay = delay
        self.fail = fail
        self.start_event = start_event
        self.start_error = start_error
        self.calls: list[FakeCall] = []
        self.started = False
        self.closed = False
        self.healthy = True
        self.in_flight = 0
        self.max_in_flight = 0
        self.reported_prompt_tokens = 0
        self.reported_completion_tokens = 0
        self.context_length = context_length
        self.counted: list[Prompt] = []  # every prompt count_tokens measured

    # ------------------------------------------------------------------ Engine protocol

    @property
    def model(self) -> str:
        return self._model

    @property
    def supports_letter_logprobs(self) -> bool:
        return self._letters is not None

    async def start(self) -> None:
        if self.start_event is not None:
            await self.start_event.wait()
        if self.start_error is not None:
            raise self.start_error
        self.started = True

    async def ready(self) -> bool:
        return self.started and self.healthy and not self.closed

    async def read_letters(
        self, prompts: Sequence[Prompt], labels: Sequence[Sequence[str]]
    ) -> list[LetterRead]:
        if len(prompts) != len(labels):
            raise AssertionError("read_letters: one label list per prompt expected")
        call = self._record("read_letters", prompts, labels=[list(x) for x in labels])
        await self._enter(call)
        try:
            if self._letters is None:
                raise EngineFeatureMissing("letter log-probabilities")
            reads = []
            for prompt, allowed in zip(prompts, labels, strict=True):
                scripted = self._letters(prompt, allowed)
                logprobs = {lab: float(scripted.get(lab, -math.inf)) for lab in allowed}
                read = LetterRead(logprobs=logprobs, prompt_tokens=self._prompt_tokens(prompt))
                self.reported_prompt_tokens += read.prompt_tokens
                self.reported_completion_tokens += read.completion_tokens
                reads.append(read)
            return reads
        finally:
            self.in_flight -= 1

    async def generate(
        self, prompts: Sequence[Prompt], params: Sequence[GenerationParams]
    ) -> list[Generation]:
        if len(prompts) != len(params):
            raise AssertionError("generate: one GenerationParams per prompt expected")
        call = self._record("generate", prompts, params=list(params))
        await self._enter(call)
        try:
            if self._generate is None:
                raise EngineFeatureMissing("text generation")
            out = []
            for prompt, p in zip(prompts, params, strict=True):
                texts = list(self._generate(prompt, p))
                gen = Generation(
                    texts=texts,
                    prompt_tokens=self._prompt_tokens(prompt),
                    completion_tokens=sum(max(1, _words(t)) for t in texts),
                )
                self.reported_prompt_tokens += gen.prompt_tokens
                self.reported_completion_tokens += gen.completion_tokens
                out.append(gen)
            return out
        finally:
            self.in_flight -= 1

    async def close(self) -> None:
        self.closed = True

    # ------------------------------------------------------------------ helpers

    @property
    def batch_sizes(self) -> list[int]:
        """Prompts per recorded call, in order."""
        return [len(c.prompts) for c in self.calls]

    def _record(
        self,
        kind: Literal["read_letters", "generate"],
        prompts: Sequence[Prompt],
        *,
        labels: list[list[str]] | None = None,
        params: list[GenerationParams] | None = None,
    ) -> FakeCall:
        call = FakeCall(len(self.calls), kind, list(prompts), labels=labels, params=params)
        self.calls.append(call)
        return call

    async def _enter(self, call: FakeCall) -> None:
        """Count the call in flight, apply the delay, then maybe fail it."""
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            delay = self.delay(call) if callable(self.delay) else self.delay
            if delay > 0:
                await asyncio.sleep(delay)
            exc = self.fail(call) if callable(self.fail) else self.fail
            if exc is not None:
                call.failed = exc
                raise exc
        except BaseException:
            self.in_flight -= 1
            raise

    async def count_tokens(self, prompts: Sequence[Prompt]) -> TokenCounts:
        """The fake's own token count (one per word), against ``context_length``."""
        self.counted.extend(prompts)
        return TokenCounts([self._prompt_tokens(p) for p in prompts], self.context_length)

    @staticmethod
    def _prompt_tokens(prompt: Prompt) -> int:
        system = prompt.system_prompt or ""
        return _words(prompt.user) + _words(prompt.answer_prefix) + _words(system)


# ---------------------------------------------------------------------- ready-made models


def log(p: float) -> float:
    """ln p with ln 0 = -inf (handy for scripting letter log-probabilities)."""
    return math.log(p) if p > 0 else -math.inf


def chain_script_letters(
    first: Mapping[str, float], chains: Mapping[str, Sequence[str]], n_options: int
) -> LettersFn:
    """A white-box model for questions of ``n_options`` options. Step 1 (the plain question)
    reads ``first`` (label -> logprob; labels left out are ``-inf``). A fidelity-chain step
    of the chain started at label ``s`` with k options already removed puts the mass on
    ``chains[s][k]``, and on ``s`` itself once the script runs out (the chain stops). A
    scripted label that is not shown any more is not readable, so the argmax then falls to
    the first allowed label."""

    def letters(prompt: Prompt, labels: Sequence[str]) -> Mapping[str, float]:
        view = parse_prompt(prompt)
        if view.substituted is None:
            return first
        script = chains.get(view.substituted, [])
        step = n_options - len(view.options)
        target = script[step] if step < len(script) else view.substituted
        return {lab: (0.0 if lab == target else -10.0) for lab in labels}

    return letters


def chain_script_generate(
    samples: Sequence[str], chains: Mapping[str, Sequence[str | None]], n_options: int
) -> GenerateFn:
    """A black-box model for questions of ``n_options`` options. Step 1 returns ``samples``
    (whatever ``n`` asks for). The chain started at label ``s``, with k options already
    removed, replies ``chains[s][k]`` (a raw reply, e.g. " A" or "(C)"; ``None`` replies
    "I don't know"), and ``" " + s`` once the script runs out."""

    def generate(prompt: Prompt, params: GenerationParams) -> Sequence[str]:
        view = parse_prompt(prompt)
        if view.substituted is None:
            return list(samples)
        script = chains.get(view.substituted, [])
        step = n_options - len(view.options)
        if step < len(script):
            reply = script[step]
            return ["I don't know" if reply is None else reply]
        return [f" {view.substituted}"]

    return generate
