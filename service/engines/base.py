"""The one small async protocol every engine adapter implements.

All methods take a batch: the scorer sends every prompt of one step at once, and the
adapter hands them to vLLM together so that its scheduler batches them (and batches them
with other requests' prompts).

Every prompt carries its question's ``prefix_key`` (``render`` sets it): an adapter over
several servers sends the prompts of one key to one server (``routing.py``), so that its
prefix cache serves what they share; an adapter over one engine ignores it."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from service.calibration.prompts import Prompt


class EngineError(Exception):
    """The engine failed to answer (HTTP 502)."""


class EngineUnavailable(EngineError):
    """The engine cannot be reached or is not ready (HTTP 503)."""


class EngineRejected(EngineError):
    """The engine refused a request because of what it holds (a prompt over the context, a
    value out of its range): the client's question is the cause (HTTP 422, not a fault)."""


class EngineFeatureMissing(EngineError):
    """The engine lacks a feature a mode needs; the message names the feature."""

    def __init__(self, feature: str, hint: str = "use mode=sampling") -> None:
        super().__init__(f"the engine does not support {feature}; {hint}")
        self.feature = feature


@dataclass(frozen=True)
class LetterRead:
    """Next-token log-probabilities of option letters after one prompt.

    ``logprobs[label]`` is the log of the summed probability of the letter's token forms
    ("A" and " A")."""

    logprobs: dict[str, float]
    prompt_tokens: int
    completion_tokens: int = 1


@dataclass(frozen=True)
class Generation:
    """The completions of one prompt (``n`` of them)."""

    texts: list[str]
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True)
class GenerationParams:
    """Decoding settings for one batch of prompts. ``choices`` restricts every reply to one
    of the given strings (structured output)."""

    n: int = 1
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 8
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class TokenCounts:
    """Prompt lengths as the engine's own tokenizer counts them, and its context length
    (prompt plus generated tokens of one request)."""

    counts: list[int]
    context_length: int


@runtime_checkable
class Engine(Protocol):
    """An LLM engine the scorer can drive."""

    @property
    def model(self) -> str:
        """The model's name as reported in responses."""
        ...

    @property
    def supports_letter_logprobs(self) -> bool:
        """True when ``read_letters`` works (white-box engines)."""
        ...

    async def start(self) -> None:
        """Load or connect; raise ``EngineUnavailable`` when it cannot."""

    async def ready(self) -> bool:
        """True when the engine can take requests now."""
        ...

    async def read_letters(
        self, prompts: Sequence[Prompt], labels: Sequence[Sequence[str]]
    ) -> list[LetterRead]:
        """For each prompt, the next-token log-probabilities of its labels."""
        ...

    async def generate(
        self, prompts: Sequence[Prompt], params: Sequence[GenerationParams]
    ) -> list[Generation]:
        """For each prompt, completions decoded with its params."""
        ...

    async def count_tokens(self, prompts: Sequence[Prompt]) -> TokenCounts:
        """The tokens each prompt takes as sent (chat template applied), and the context;
        ``EngineFeatureMissing`` when the engine cannot count."""
        ...

    async def close(self) -> None:
        """Release the engine."""


@runtime_checkable
class PrefixCacheReset(Protocol):
    """An engine whose prefix cache can be emptied (benchmarks: every variant starts cold)."""

    async def reset_prefix_cache(self) -> bool:
        """Empty the cache; False where the engine refused."""
        ...


@runtime_checkable
class PromptTokenCounters(Protocol):
    """An engine that reports running totals of the prompt tokens it computed and those its
    prefix cache served (benchmarks: where the time goes)."""

    async def prompt_token_counters(self) -> dict[str, float] | None:
        """``{"computed": ..., "cached": ...}`` so far, or None when unavailable."""
        ...


@dataclass(frozen=True)
class ChatForward:
    """A client's OpenAI chat completion request as the engine is to receive it: the parsed
    body (for an engine that runs the model itself) and the same body as JSON bytes (for one
    that forwards them unchanged); ``key`` groups a conversation's requests on one server."""

    body: Mapping[str, Any]
    raw: bytes
    key: str | None = None


@dataclass(frozen=True)
class ChatReply:
    """An engine's whole answer to a chat request, as it goes on the wire: an OpenAI
    ``chat.completion`` (or model list) on 200, else the engine's own error body."""

    status: int
    body: bytes
    media_type: str = "application/json"


class ChatStream(Protocol):
    """A streamed answer: ``status`` is known before the first chunk is read; iterating
    yields the body's bytes as they come (server-sent events on 200); ``aclose`` releases
    the connection (safe to call twice)."""

    status: int
    media_type: str

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class ChatCompletions(Protocol):
    """An engine that answers OpenAI chat completions itself (``POST /v1/chat/completions``
    and ``GET /v1/models`` pass through it). Client errors come back as replies with the
    engine's 4xx; ``EngineError`` / ``EngineUnavailable`` mean the engine failed."""

    async def chat_completion(self, request: ChatForward) -> ChatReply:
        """The whole completion (``stream`` is not set)."""
        ...

    async def chat_completion_stream(self, request: ChatForward) -> ChatStream:
        """The completion streamed (``stream: true``); the status is read, the body not."""
        ...

    async def list_models(self) -> ChatReply:
        """The OpenAI model list."""
        ...
