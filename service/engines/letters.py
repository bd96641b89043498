"""Shared by the adapters: which token ids spell an option letter, and how their
log-probabilities combine into one per letter."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

from service.calibration.prompts import LETTERS, letter_forms
from service.engines.base import EngineFeatureMissing


class UnreadableLetter(EngineFeatureMissing):
    """No spelling of an option letter is one token of the model's tokenizer, so its
    probability cannot be read from one next-token step (HTTP 400: use sampling mode,
    whose structured choice spells the letter in as many tokens as it takes)."""

    def __init__(self, label: str) -> None:
        super().__init__(f"a single-token spelling of option letter {label!r} (logprobs mode)")
        self.label = label


def letter_token_ids(
    labels: Sequence[str], encode: Callable[[str], list[int]]
) -> dict[str, list[int]]:
    """For each label, the ids of its single-token forms ("A", " A"); forms that the
    tokenizer splits into several tokens cannot be read from one next-token step. A label
    with no single-token form raises ``UnreadableLetter``."""
    table: dict[str, list[int]] = {}
    for label in labels:
        ids: list[int] = []
        for form in letter_forms(label):
            tokens = encode(form)
            if len(tokens) == 1 and tokens[0] not in ids:
                ids.append(tokens[0])
        if not ids:
            raise UnreadableLetter(label)
        table[label] = ids
    return table


def max_letter_logprobs(max_options: int = len(LETTERS)) -> int:
    """Log-probs one letter read asks for at most: both forms of each of ``max_options``
    letters (an engine's cap on log-probs per token must be at least this)."""
    return len(letter_forms("A")) * max(2, min(max_options, len(LETTERS)))


def combine_letter_logprobs(
    table: Mapping[str, Sequence[int]], token_logprobs: Mapping[int, float], labels: Sequence[str]
) -> dict[str, float]:
    """log(sum of p over each label's token forms); a form missing from the read is 0."""
    result: dict[str, float] = {}
    for label in labels:
        values = [token_logprobs[t] for t in table[label] if t in token_logprobs]
        if not values:
            raise KeyError(label)
        top = max(values)
        if top == -math.inf:
            result[label] = -math.inf
        else:
            result[label] = top + math.log(sum(math.exp(v - top) for v in values))
    return result


def choice_strings(labels: Sequence[str]) -> tuple[str, ...]:
    """Every spelling a structured choice over ``labels`` may produce."""
    return tuple(form for label in labels for form in letter_forms(label))
