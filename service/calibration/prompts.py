"""Render multiple-choice prompts, build the fidelity-chain variants, parse replies.

Every variant of one question shares the longest possible prefix: instructions and the
question come first, the option block (the only part that changes) last, so that vLLM's
prefix cache serves all the prompts of a question from one cached prefix."""

from __future__ import annotations

import functools
import hashlib
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field

LETTERS = string.ascii_uppercase
MAX_OPTIONS = len(LETTERS)
SUBSTITUTE_TEXT = "All other options are wrong."


@dataclass(frozen=True)
class PromptTemplate:
    """How a question is shown to the model.

    ``chat``: the question block is the user message of the model's chat template and the
    assistant turn is pre-filled with ``answer_prefix`` (the model then continues that turn).
    ``plain``: one text ``few_shot + question block + "\\n" + answer_prefix`` for base models.
    """

    chat: bool = True
    system_prompt: str | None = None
    instruction: str = "Answer with the letter of the correct option only."
    answer_prefix: str = "Answer:"
    few_shot: str = ""
    substitute_text: str = SUBSTITUTE_TEXT


@dataclass(frozen=True)
class Prompt:
    """One rendered prompt. ``user`` is the question block; engines turn it into either a
    chat conversation (user message + pre-filled assistant turn) or a plain text.

    ``prefix_key`` is the same for every prompt of one question (``prefix_key()``): engines
    over several servers send all of them to one server, whose prefix cache then serves the
    prefix they share. Empty: no affinity."""

    user: str
    answer_prefix: str
    chat: bool
    system_prompt: str | None = None
    prefix_key: str = ""

    @property
    def text(self) -> str:
        """The plain-text form (used when ``chat`` is false)."""
        return f"{self.user}\n{self.answer_prefix}"

    def messages(self) -> list[dict[str, str]]:
        """The chat form: optional system message, user message, pre-filled assistant turn."""
        msgs: list[dict[str, str]] = []
        if self.system_prompt:
            msgs.append({"role": "system", "content": self.system_prompt})
        msgs.append({"role": "user", "content": self.user})
        msgs.append({"role": "assistant", "content": self.answer_prefix})
        return msgs


@dataclass(frozen=True)
class ShownOption:
    """An option as shown in one prompt: its original index, its letter and its text."""

    index: int
    label: str
    text: str


@dataclass(frozen=True)
class Question:
    """A multiple-choice question with 2 to 26 options, labelled A, B, C, ..."""

    text: str
    options: tuple[str, ...]
    labels: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not 2 <= len(self.options) <= MAX_OPTIONS:
            raise ValueError(f"a question needs 2 to {MAX_OPTIONS} options")
        object.__setattr__(self, "labels", tuple(LETTERS[: len(self.options)]))


def all_options(question: Question) -> list[ShownOption]:
    """Every option of the question, with its own letter and text."""
    return [ShownOption(i, question.labels[i], t) for i, t in enumerate(question.options)]


def chain_options(
    question: Question,
    substituted: int,
    removed: frozenset[int] = frozenset(),
    substitute_text: str = SUBSTITUTE_TEXT,
) -> list[ShownOption]:
    """The option list of one fidelity-chain step: option ``substituted`` keeps its letter
    but its text becomes ``substitute_text``; options in ``removed`` are dropped and the
    other letters are kept as they were (the spec's reading)."""
    shown = []
    for i, text in enumerate(question.options):
        if i in removed:
            continue
        shown.append(
            ShownOption(i, question.labels[i], substitute_text if i == substituted else text)
        )
    return shown


def render(question: Question, shown: Sequence[ShownOption], template: PromptTemplate) -> Prompt:
    """Render the question with the given option list."""
    lines = [f"Question: {question.text.strip()}", "Options:"]
    lines += [f"{o.label}. {o.text.strip()}" for o in shown]
    if template.instruction:
        lines.append(template.instruction)
    user = template.few_shot + "\n".join(lines)
    return Prompt(
        user=user,
        answer_prefix=template.answer_prefix,
        chat=template.chat,
        system_prompt=template.system_prompt,
        prefix_key=prefix_key(question, template),
    )


def prefix_key(question: Question, template: PromptTemplate) -> str:
    """A stable key of the question and what precedes it (system prompt, few-shot text):
    the same for every prompt rendered from the question, whatever its option list or
    instruction, and in every process (SHA-256, not Python's salted ``hash()``). The
    options are part of it, so that many questions sharing a stem ("Which of the following
    is true?") spread over the servers instead of piling onto one."""
    return _prefix_digest(
        template.system_prompt or "", template.few_shot, question.text, tuple(question.options)
    )


@functools.lru_cache(maxsize=1024)  # every prompt of a question asks again
def _prefix_digest(system: str, few_shot: str, text: str, options: tuple[str, ...]) -> str:
    digest = hashlib.sha256("\x00".join((system, few_shot, text, *options)).encode())
    return digest.hexdigest()[:32]


_ANSWER_LEAD = re.compile(
    r"^(?:the\s+)?(?:correct\s+)?(?:answer|option)\s*(?:is)?\s*[:\-]?\s*", re.I
)
_OPENERS = " \t\n\"'([*_"


def parse_answer(reply: str, allowed: Sequence[str]) -> str | None:
    """The option letter a reply names, or None when it names none of ``allowed``.

    Accepts "B", " B", "B.", "(B)", "B) text", "**B**", "Answer: B"; rejects words that
    merely start with a capital letter ("Because ...")."""
    text = _ANSWER_LEAD.sub("", reply.lstrip(_OPENERS)).lstrip(_OPENERS)
    if not text or text[0] not in LETTERS:
        return None
    if len(text) > 1 and text[1].isalpha():
        return None
    return text[0] if text[0] in allowed else None


def letter_forms(label: str) -> tuple[str, str]:
    """The two token spellings of an option letter that follow ``Answer:``."""
    return (label, f" {label}")
