"""Does a question fit the model's context? Checked before its first engine call, so that a
question that can never be scored is the client's 422 (naming the count and the limit),
not an engine refusal half-way through its chains.

Counting every prompt exactly would cost a tokenizer pass (or a ``/tokenize`` round trip)
per prompt per question. Instead prompts are first bounded from above without the
tokenizer: no token of a byte-level BPE or SentencePiece vocabulary covers less than one
byte of text, so a prompt takes at most its UTF-8 bytes plus what the template adds, which
is measured once per engine (``_baseline``) with a ``SLACK`` for merges at the seams. An
ordinary question passes on one bound for all its prompts, computed from text lengths
alone (nothing is rendered); otherwise each prompt is rendered and bounded, and only those
whose bound does not fit are counted exactly, by the engine's own tokenizer."""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from service.calibration.prompts import Prompt
from service.engines.base import Engine, EngineFeatureMissing, EngineRejected

log = logging.getLogger(__name__)

SLACK = 16


class ContextOverflow(EngineRejected):
    """A prompt of the question plus its generated tokens is over the model's context: the
    refusal the engine would give, given before asking it (so callers that count engine
    refusals, like the evaluation, count it with them)."""

    def __init__(self, prompt_tokens: int, new_tokens: int, limit: int) -> None:
        super().__init__(
            f"the question does not fit the model's context of {limit} tokens: its longest "
            f"prompt is {prompt_tokens} tokens plus {new_tokens} to generate "
            f"({prompt_tokens + new_tokens} > {limit}); shorten the question or the options"
        )
        self.prompt_tokens = prompt_tokens
        self.new_tokens = new_tokens
        self.limit = limit


@dataclass(frozen=True)
class QuestionSize:
    """Bounds over every prompt of one question: none is longer than ``upper_bytes`` of
    UTF-8 text or generates more than ``new_tokens``."""

    upper_bytes: int
    new_tokens: int
    chat: bool


@dataclass(frozen=True)
class _Baseline:
    overhead: int  # tokens of a near-empty prompt in this form: template, BOS, ...
    limit: int  # the context length


# By engine, then by prompt form (chat or plain text).
_baselines: weakref.WeakKeyDictionary[Engine, dict[bool, _Baseline]] = weakref.WeakKeyDictionary()
_cannot_count: weakref.WeakSet[Engine] = weakref.WeakSet()


def _bytes(prompt: Prompt) -> int:
    system = prompt.system_prompt or ""
    return len(prompt.user.encode()) + len(prompt.answer_prefix.encode()) + len(system.encode())


async def _baseline(engine: Engine, chat: bool) -> _Baseline:
    """The template's tokens (with its default system prompt, if any: a given system prompt
    replaces it, so its bytes on top still bound from above) and the context length."""
    known = _baselines.setdefault(engine, {})
    if chat not in known:
        probe = Prompt(user="A", answer_prefix="A", chat=chat, system_prompt=None)
        measured = await engine.count_tokens([probe])
        known[chat] = _Baseline(measured.counts[0], measured.context_length)
    return known[chat]


async def check_fits(
    engine: Engine, size: QuestionSize, prompts: Callable[[], Sequence[tuple[Prompt, int]]]
) -> None:
    """Raise ``ContextOverflow`` unless each ``(prompt, max generated tokens)`` of
    ``prompts()`` (called only when ``size`` does not settle it) fits the engine's context.
    An engine that cannot count tokens is not checked (its own refusal is then a 422)."""
    if engine in _cannot_count:
        return
    try:
        base = await _baseline(engine, size.chat)
        if base.overhead + size.upper_bytes + SLACK + size.new_tokens <= base.limit:
            return
        worst: dict[Prompt, int] = {}
        for prompt, new_tokens in prompts():
            if base.overhead + _bytes(prompt) + SLACK + new_tokens > base.limit:
                worst[prompt] = max(new_tokens, worst.get(prompt, 0))
        if not worst:
            return
        counted = await engine.count_tokens(list(worst))
    except EngineFeatureMissing as exc:
        _cannot_count.add(engine)
        log.warning("the engine cannot count tokens; prompts are not checked: %s", exc)
        return
    over = [
        (tokens, new_tokens)
        for tokens, new_tokens in zip(counted.counts, worst.values(), strict=True)
        if tokens + new_tokens > counted.context_length
    ]
    if over:
        tokens, new_tokens = max(over, key=sum)
        raise ContextOverflow(tokens, new_tokens, counted.context_length)
