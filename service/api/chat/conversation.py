"""The pure part of ``POST /v1/chat/completions``: which turn is scored and as what question,
which option a reply names, and the byte-level handling of the reply (server-sent events,
the ``ufcal`` key added to a JSON object). No HTTP, no engine.

The question scored is the last user turn. The conversation before it is context, put in
front of it as a transcript, oldest turn first::

    Earlier in this conversation:
    System: You are a geography tutor.
    User: Hi!
    Assistant: Hello, what shall we study?

    Which is the largest planet? ...

The transcript keeps the most recent turns that fit in ``max_chars`` with the turn itself
(the question limit, UFCAL_MAX_QUESTION_CHARS); older ones are left out whole. Turns after
the last user turn (an assistant pre-fill) are not part of the question."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from service.calibration.prompts import LETTERS, parse_answer
from service.engines.chat_openai import message_text

CONTEXT_HEADER = "Earlier in this conversation:"
_SPEAKERS = {"system": "System", "developer": "System", "user": "User", "assistant": "Assistant"}
_DONE = b"data: [DONE]"


class ChatInputError(Exception):
    """A chat request that cannot be scored: ``loc`` names the field (a 422)."""

    def __init__(self, loc: Sequence[str | int], msg: str, kind: str) -> None:
        super().__init__(msg)
        self.loc = tuple(loc)
        self.kind = kind

    def issue(self) -> dict[str, Any]:
        """The validation issue, as ``RequestValidationError`` takes it."""
        return {"loc": self.loc, "msg": str(self), "type": self.kind}


@dataclass(frozen=True)
class ScoredTurn:
    """The turn a chat request asks to score: its position in ``messages``, its text, and
    the question text (context and turn) the scorer gets."""

    index: int
    text: str
    question: str
    context_turns: int


def last_user_turn(messages: Any) -> tuple[int, str]:
    """The position and text of the last user message; ``ChatInputError`` when there is
    none or its text is empty."""
    if not isinstance(messages, list) or not messages:
        raise ChatInputError(("body", "messages"), "messages must be a non-empty list", "list_type")
    for i in range(len(messages) - 1, -1, -1):
        message = messages[i]
        if isinstance(message, dict) and message.get("role") == "user":
            text = message_text(message.get("content"))
            if text is None:
                raise ChatInputError(
                    ("body", "messages", i, "content"),
                    "the user turn's content must be a string or a list of text parts",
                    "string_type",
                )
            if not text.strip():
                raise ChatInputError(
                    ("body", "messages", i, "content"),
                    "the last user turn is empty: there is no question to score",
                    "string_too_short",
                )
            return i, text.strip()
    raise ChatInputError(
        ("body", "messages"), "no user turn: there is no question to score", "missing_user_turn"
    )


def _transcript_line(message: Any) -> str | None:
    if not isinstance(message, dict):
        return None
    speaker = _SPEAKERS.get(str(message.get("role")))
    text = message_text(message.get("content"))
    if speaker is None or text is None or not text.strip():
        return None
    return f"{speaker}: {text.strip()}"


def scored_turn(messages: Any, max_chars: int) -> ScoredTurn:
    """The last user turn and its question text (see the module docstring)."""
    index, text = last_user_turn(messages)
    lines = [line for m in messages[:index] if (line := _transcript_line(m)) is not None]
    kept: list[str] = []
    size = len(text) + len(CONTEXT_HEADER) + 2
    for line in reversed(lines):
        size += len(line) + 1
        if size > max_chars:
            break
        kept.append(line)
    if not kept:
        return ScoredTurn(index, text, text, 0)
    context = "\n".join([CONTEXT_HEADER, *reversed(kept)])
    return ScoredTurn(index, text, f"{context}\n\n{text}", len(kept))


def conversation_key(messages: Any) -> str | None:
    """A key shared by every request of one conversation (its first two messages), so that
    a router sends them to one server, whose prefix cache holds the conversation."""
    if not isinstance(messages, list) or not messages:
        return None
    head = json.dumps(messages[:2], sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.blake2b(head.encode(errors="replace"), digest_size=16).hexdigest()


@dataclass(frozen=True)
class OptionMatch:
    """The option a reply names: its index and how it was recognised."""

    index: int
    by: Literal["label", "text"]


def match_option(reply: str, options: Sequence[str]) -> OptionMatch | None:
    """The option a chat reply names: a leading letter label ("B", "B)", "(B)", "B. ...",
    "Answer: B") or the option's exact text (case-insensitive, surrounding whitespace and a
    final full stop ignored); None when it names none."""
    labels = LETTERS[: len(options)]
    label = parse_answer(reply, labels)
    if label is not None:
        return OptionMatch(labels.index(label), "label")
    said = reply.strip().rstrip(".").strip().casefold()
    for i, option in enumerate(options):
        if said == option.strip().rstrip(".").strip().casefold():
            return OptionMatch(i, "text")
    return None


def completion_text(completion: Any) -> str | None:
    """The first choice's message text of a ``chat.completion``, or None."""
    try:
        content = completion["choices"][0]["message"].get("content")
    except (KeyError, IndexError, TypeError, AttributeError):
        return None
    return message_text(content)


def with_key(document: bytes, key: str, value: bytes) -> bytes:
    """A JSON object's bytes with ``"key": value`` added at its end, every other byte as
    it was (the engine's reply is not re-encoded). ``ValueError`` if it is no object."""
    end = document.rstrip()
    if not end.endswith(b"}"):
        raise ValueError("not a JSON object")
    body = end[:-1].rstrip()
    comma = b"" if body.endswith(b"{") else b","
    return body + comma + json.dumps(key).encode() + b":" + value + b"}"


class EventSplitter:
    """Cuts a server-sent event stream into whole events as the bytes arrive, holding back
    the ``data: [DONE]`` event (the proxy sends its own last chunk before it)."""

    def __init__(self) -> None:
        self._pending = b""
        self.done = False

    def feed(self, part: bytes) -> bytes:
        """The whole events completed by ``part`` (bytes unchanged), without ``[DONE]``."""
        buffer = self._pending + part if self._pending else part
        cut = _last_boundary(buffer)
        if cut < 0:
            self._pending = buffer
            return b""
        ready, self._pending = buffer[:cut], buffer[cut:]
        at = ready.rfind(_DONE)
        if at >= 0 and not ready[at + len(_DONE) :].strip() and _starts_event(ready, at):
            self.done = True
            return ready[:at]
        return ready

    def rest(self) -> bytes:
        """What is left after the last whole event (a stream cut short)."""
        return self._pending


def _last_boundary(buffer: bytes) -> int:
    """The end of the last blank line (``\\n\\n`` or ``\\r\\n\\r\\n``) in ``buffer``, or -1."""
    lf = buffer.rfind(b"\n\n")
    crlf = buffer.rfind(b"\r\n\r\n")
    if lf < 0 and crlf < 0:
        return -1
    return max(lf + 2 if lf >= 0 else -1, crlf + 4 if crlf >= 0 else -1)


def _starts_event(buffer: bytes, at: int) -> bool:
    return at == 0 or buffer[at - 1 : at] in (b"\n", b"\r")


def stream_events(data: Iterable[bytes]) -> list[Any]:
    """The JSON payloads of the ``data:`` lines of whole events (others left out)."""
    payloads = []
    for block in data:
        for line in block.splitlines():
            if not line.startswith(b"data:"):
                continue
            text = line[5:].strip()
            if not text or text == b"[DONE]":
                continue
            try:
                payloads.append(json.loads(text))
            except ValueError:
                continue
    return payloads


@dataclass(frozen=True)
class StreamedReply:
    """What a chat stream said: choice 0's text, the first chunk's id, created and model
    (for the proxy's last chunk), and whether the server sent an error event."""

    text: str
    id: str
    created: int
    model: str
    error: bool


def streamed_reply(payloads: Sequence[Any]) -> StreamedReply:
    """Gather a chat stream's chunks."""
    parts: list[str] = []
    head: Mapping[str, Any] = {}
    error = False
    for payload in payloads:
        if not isinstance(payload, dict):
            continue
        if "error" in payload:
            error = True
            continue
        if not head:
            head = payload
        for choice in payload.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            content = delta.get("content") if isinstance(delta, dict) else None
            if isinstance(content, str):
                parts.append(content)
    created = head.get("created")
    return StreamedReply(
        text="".join(parts),
        id=str(head.get("id", "chatcmpl-ufcal")),
        created=created if isinstance(created, int) else 0,
        model=str(head.get("model", "")),
        error=error,
    )
