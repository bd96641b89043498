"""The baselines of the UF paper's comparison, as plain functions over plain data (no I/O).

| method       | confidence of the returned answer                                        |
|--------------|--------------------------------------------------------------------------|
| ``sampled``  | P(answer) from K sampled answers (the share of samples naming it)        |
| ``token``    | raw probability of the answer's letter token (both forms "A", " A"       |
|              | summed) over the full vocabulary, NOT renormalised over the letters      |
| ``verbalized``| the number in [0, 1] the model states when asked for one (Verb)         |
| ``linguistic``| the number a fixed phrase maps to, the model picking the phrase (Ling)  |

This module holds their math, the follow-up prompts that elicit a stated confidence, and
the parsers of the model's replies. ``service.scoring`` runs them over an engine.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence

from service.calibration.prompts import (
    Prompt,
    PromptTemplate,
    Question,
    all_options,
    render,
)

__all__ = [
    "LINGUISTIC_ANSWER_PREFIX",
    "LINGUISTIC_PHRASES",
    "VERBALIZED_ANSWER_PREFIX",
    "linguistic_choices",
    "linguistic_prompt",
    "parse_linguistic",
    "parse_verbalized",
    "sampled_confidence",
    "token_confidence",
    "verbalized_prompt",
]

# The Ling scale: a fixed list of phrases, most to least confident, and the probability each
# stands for. Fixed a priori (the usual reading of the words, evenly spread), never tuned on
# evaluation data.
LINGUISTIC_PHRASES: tuple[tuple[str, float], ...] = (
    ("Almost certain", 0.95),
    ("Highly likely", 0.90),
    ("Very likely", 0.80),
    ("Likely", 0.70),
    ("Somewhat likely", 0.60),
    ("About even", 0.50),
    ("Somewhat unlikely", 0.40),
    ("Unlikely", 0.30),
    ("Very unlikely", 0.20),
    ("Highly unlikely", 0.10),
    ("Almost impossible", 0.05),
)

VERBALIZED_INSTRUCTION = (
    "Proposed answer: {label}. {text}\n"
    "How confident are you that the proposed answer is correct? "
    "Reply with a number between 0 and 1 only."
)
VERBALIZED_ANSWER_PREFIX = "Confidence:"
LINGUISTIC_INSTRUCTION = (
    "Proposed answer: {label}. {text}\n"
    "How likely is it that the proposed answer is correct? "
    "Reply with one of: {phrases}."
)
LINGUISTIC_ANSWER_PREFIX = "Likelihood:"


# ------------------------------------------------------------------------------ math


def sampled_confidence(distribution: Sequence[float], answer: int) -> float:
    """Sampled: P(answer), the share of the parsed samples that named it."""
    return min(1.0, max(0.0, float(distribution[answer])))


def token_confidence(letter_logprob: float) -> float:
    """Token: the raw probability of the answer letter, ``exp(logprob)``, where the logprob
    is the full-vocabulary log-probability of the letter's token forms summed. Mass the
    model puts on other tokens (ending its turn, words) is not given back to the letters, so
    this is at most the normalised P(answer) and says how sure the model is that the next
    token is this letter at all."""
    if letter_logprob == -math.inf:
        return 0.0
    return min(1.0, max(0.0, math.exp(letter_logprob)))


# ---------------------------------------------------------------------------- prompts


def _follow_up(
    question: Question,
    answer: int,
    template: PromptTemplate,
    instruction: str,
    answer_prefix: str,
) -> Prompt:
    shown = all_options(question)
    text = instruction.format(
        label=question.labels[answer],
        text=question.options[answer].strip(),
        phrases=", ".join(p for p, _ in LINGUISTIC_PHRASES),
    )
    # The question and option block come first, as in the answer prompt, so that the
    # engine's prefix cache serves both.
    variant = dataclasses.replace(template, instruction=text, answer_prefix=answer_prefix)
    return render(question, shown, variant)


def verbalized_prompt(question: Question, answer: int, template: PromptTemplate) -> Prompt:
    """Ask the model how likely the proposed ``answer`` is correct, as a number."""
    return _follow_up(question, answer, template, VERBALIZED_INSTRUCTION, VERBALIZED_ANSWER_PREFIX)


def linguistic_prompt(question: Question, answer: int, template: PromptTemplate) -> Prompt:
    """Ask the model how likely the proposed ``answer`` is correct, as a phrase."""
    return _follow_up(question, answer, template, LINGUISTIC_INSTRUCTION, LINGUISTIC_ANSWER_PREFIX)


def linguistic_choices() -> tuple[str, ...]:
    """The strings a structured choice over the phrases may produce (with and without the
    space that follows the answer prefix)."""
    return tuple(form for phrase, _ in LINGUISTIC_PHRASES for form in (phrase, f" {phrase}"))


# ---------------------------------------------------------------------------- parsing

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_VERBAL_NUMBER = re.compile(
    rf"(?<![\w.])(?P<num>{_NUMBER})\s*(?:(?P<pct>%|percent\b|per\s*cent\b)"
    rf"|/\s*(?P<den>{_NUMBER})(?![\w.]))?",
    re.I,
)


def parse_verbalized(reply: str) -> float | None:
    """The confidence stated in a reply, in [0, 1], or None when it states none.

    Reads the first number: "0.8", ".8", "1", "80%", "80 percent", "8/10", "Confidence: 0.75",
    "**0.9**". A number above 1 without a unit is read as a percentage ("85" -> 0.85) up to
    100; anything larger, or a percentage above 100, is not a confidence (None). Spelled-out
    numbers ("eight") are not read: their scale is ambiguous."""
    match = _VERBAL_NUMBER.search(reply)
    if match is None:
        return None
    value = float(match.group("num"))
    if match.group("den") is not None:
        den = float(match.group("den"))
        if den <= 0:
            return None
        value /= den
    elif match.group("pct") is not None or value > 1.0:
        value /= 100.0
    if not 0.0 <= value <= 1.0:
        return None
    return value


_PHRASES_LONGEST_FIRST = sorted(LINGUISTIC_PHRASES, key=lambda item: -len(item[0]))
_PHRASE_PATTERNS = [
    (re.compile(r"(?<![a-z])" + r"\s+".join(map(re.escape, p.lower().split())) + r"(?![a-z])"), v)
    for p, v in _PHRASES_LONGEST_FIRST
]


def parse_linguistic(reply: str) -> tuple[str, float] | None:
    """The phrase of the fixed list a reply uses (case-insensitive, whole words; the
    earliest in the reply, the longest where several start there) and its number, or None.
    "Unlikely" is not read as "Likely", nor "highly unlikely" as "unlikely"."""
    text = reply.lower()
    best: tuple[int, int, str, float] | None = None
    for (phrase, value), (pattern, _) in zip(_PHRASES_LONGEST_FIRST, _PHRASE_PATTERNS, strict=True):
        match = pattern.search(text)
        if match is None:
            continue
        key = (match.start(), -len(phrase))
        if best is None or key < (best[0], best[1]):
            best = (match.start(), -len(phrase), phrase, value)
    if best is None:
        return None
    return best[2], best[3]
