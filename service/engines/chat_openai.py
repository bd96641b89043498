"""OpenAI chat completion shapes for an engine that runs the model itself (the in-process
one): read a request's decoding fields, and write completions, stream chunks, model lists
and errors as OpenAI's API does. Plain functions over plain data, no vLLM.

Only what a chat completion with the model's own chat template needs is served: ``model``,
``messages`` (string content, or a list of text parts), ``n``, ``temperature``, ``top_p``,
``max_tokens`` / ``max_completion_tokens``, ``stop``, ``seed``, ``presence_penalty``,
``frequency_penalty``, ``stream`` and ``stream_options.include_usage``; ``user``,
``metadata`` and ``store`` are accepted and ignored. Any other field (tools, logprobs,
response_format, ...) is a 400 naming it, rather than a reply that silently ignored it."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from service.engines.base import ChatReply

SERVED_FIELDS = frozenset(
    {
        "model",
        "messages",
        "n",
        "temperature",
        "top_p",
        "max_tokens",
        "max_completion_tokens",
        "stop",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "stream",
        "stream_options",
        "user",
        "metadata",
        "store",
    }
)
ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
MAX_N = 16
DONE = b"data: [DONE]\n\n"


class ChatRequestError(Exception):
    """A chat request the engine cannot serve as asked: an OpenAI error reply."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.param = param

    def reply(self) -> ChatReply:
        """The error as OpenAI's API sends it."""
        return error_reply(self.status, str(self), self.param)


@dataclass(frozen=True)
class ChatDecoding:
    """What one chat request asks of the model."""

    messages: list[dict[str, str]]
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stream: bool = False
    include_usage: bool = False


def message_text(content: Any) -> str | None:
    """A message's text: its string content, or its text parts joined by newlines
    (other parts left out); None for content that is neither."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = [
            part["text"]
            for part in content
            if isinstance(part, dict)
            and part.get("type") == "text"
            and isinstance(part.get("text"), str)
        ]
        return "\n".join(texts)
    return None


def _number(body: Mapping[str, Any], name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ChatRequestError(400, f"{name} must be a number from {low} to {high}", name)
    return float(value)


def _integer(body: Mapping[str, Any], name: str, low: int, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ChatRequestError(400, f"{name} must be an integer of at least {low}", name)
    if high is not None and value > high:
        raise ChatRequestError(400, f"{name} must be at most {high}", name)
    return value


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ChatRequestError(400, "messages must be a non-empty list", "messages")
    messages = []
    for i, message in enumerate(value):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise ChatRequestError(
                400, f"messages[{i}].role must be one of {sorted(ROLES)}", "messages"
            )
        text = message_text(message.get("content"))
        if text is None:
            if message.get("content") is None and role == "assistant":
                text = ""
            else:
                raise ChatRequestError(
                    400, f"messages[{i}].content must be a string or text parts", "messages"
                )
        messages.append({"role": "system" if role == "developer" else role, "content": text})
    return messages


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value) and len(value) <= 4:
        return tuple(value)
    raise ChatRequestError(400, "stop must be a string or a list of at most 4 strings", "stop")


def read_decoding(body: Mapping[str, Any], model: str) -> ChatDecoding:
    """The decoding a chat request asks for; ``ChatRequestError`` (400, or 404 for another
    model) for what the engine cannot serve."""
    unknown = sorted(set(body) - SERVED_FIELDS)
    if unknown:
        raise ChatRequestError(
            400, f"not supported by the in-process engine: {', '.join(unknown)}", unknown[0]
        )
    asked = body.get("model")
    if asked is not None and asked != model:
        raise ChatRequestError(
            404, f"The model `{asked}` does not exist; this engine serves `{model}`.", "model"
        )
    max_tokens = _integer(body, "max_completion_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", 1)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise ChatRequestError(400, "stream_options must be an object", "stream_options")
    seed = _integer(body, "seed", -(2**63))
    return ChatDecoding(
        messages=_messages(body.get("messages")),
        n=_integer(body, "n", 1, MAX_N) or 1,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0),
        max_tokens=max_tokens,
        stop=_stop(body.get("stop")),
        seed=seed,
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        stream=bool(body.get("stream")),
        include_usage=bool((options or {}).get("include_usage")),
    )


def error_reply(status: int, message: str, param: str | None = None) -> ChatReply:
    """An error as OpenAI's API sends it."""
    kind = "not_found_error" if status == 404 else "invalid_request_error"
    error = {"message": message, "type": kind, "param": param, "code": None}
    return ChatReply(status, json.dumps({"error": error}).encode())


def model_list(model: str, created: int) -> ChatReply:
    """``GET /v1/models`` of an engine serving one model."""
    entry = {"id": model, "object": "model", "created": created, "owned_by": "ufcal"}
    return ChatReply(200, json.dumps({"object": "list", "data": [entry]}).encode())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


@dataclass(frozen=True)
class ChoiceOut:
    """One finished choice."""

    text: str
    finish_reason: str | None
    tokens: int


def completion(
    completion_id: str, model: str, choices: Sequence[ChoiceOut], prompt_tokens: int
) -> ChatReply:
    """A whole ``chat.completion``."""
    body = {
        "id": completion_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": choice.text},
                "logprobs": None,
                "finish_reason": choice.finish_reason,
            }
            for i, choice in enumerate(choices)
        ],
        "usage": usage(prompt_tokens, sum(c.tokens for c in choices)),
    }
    return ChatReply(200, json.dumps(body).encode())


def sse(data: Mapping[str, Any]) -> bytes:
    """One server-sent event carrying ``data`` as JSON."""
    return b"data: " + json.dumps(data).encode() + b"\n\n"


def chunk(
    completion_id: str,
    created: int,
    model: str,
    choices: list[dict[str, Any]],
    **extra: Any,
) -> bytes:
    """One ``chat.completion.chunk`` event."""
    return sse(
        {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": choices,
            **extra,
        }
    )


def delta_choice(
    index: int, delta: dict[str, str], finish_reason: str | None = None
) -> dict[str, Any]:
    """A chunk's choice: the new text (and the role, first) of choice ``index``."""
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
