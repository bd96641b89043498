"""The work budget of one question: how many prompts scoring it may send, planned before
any engine call (admission weighs a request by it) and enforced while its chains run.

Plain functions over plain data. A question of M options costs one read (step 1) plus, for
``uf`` and ``fidelity``, one prompt per chain step; a chain takes at most M - 1 steps (each
step removes one option; it stops when only its start's slot is left). So the most a
question can cost is 1 + |S| (M - 1) with |S| <= M starts: 13 prompts at M = 4, 651 at
M = 26. A budget B caps that: the starts are planned to fit (the least likely dropped first,
as ``skip_mass`` does) and a chain step that would pass B is not sent (the chain is cut)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from service.calibration.prompts import MAX_OPTIONS

DEFAULT_MAX_PROMPTS = 64
CHAIN_METHODS = frozenset({"uf", "fidelity"})
STATED_METHODS = frozenset({"verbalized", "linguistic"})


def chain_steps_bound(n_options: int) -> int:
    """The most steps one fidelity chain of a question with ``n_options`` can take."""
    return max(0, n_options - 1)


def min_prompts(method: str) -> int:
    """The fewest prompts ``method`` can be scored with: the read, plus the answer's first
    chain step (uf, fidelity) or the question for a stated confidence (verbalized,
    linguistic). A budget below this cannot give a result."""
    if method in CHAIN_METHODS or method in STATED_METHODS:
        return 2
    return 1


def unbounded_prompts(method: str, n_options: int) -> int:
    """The most prompts ``method`` can send for a question of ``n_options`` with no budget
    (linguistic: one more when the engine has no structured choice)."""
    if method in CHAIN_METHODS:
        return 1 + n_options * chain_steps_bound(n_options)
    if method == "linguistic":
        return 3
    if method == "verbalized":
        return 2
    return 1


def planned_prompts(method: str, n_options: int, max_prompts: int) -> int:
    """The prompts a question is planned at before its first engine call: its worst case
    under the budget ``max_prompts`` (0 = no bound). Admission weighs requests by this."""
    worst = unbounded_prompts(method, n_options)
    return worst if max_prompts <= 0 else min(worst, max(max_prompts, min_prompts(method)))


@dataclass(frozen=True)
class StartPlan:
    """The chain starts kept under a budget, and the share of the start set's probability
    mass dropped to fit (0 when nothing was dropped)."""

    starts: list[int]
    dropped: list[int]
    dropped_share: float


def plan_starts(
    distribution: Sequence[float], starts: Sequence[int], chain_prompts: int | None
) -> StartPlan:
    """Keep the most likely starts while each can take at least one chain step within
    ``chain_prompts`` (None: no bound). The least likely go first (ties: the later option);
    the argmax answer is kept whenever any start is. Kept starts stay in index order."""
    if chain_prompts is None or len(starts) <= chain_prompts:
        return StartPlan(list(starts), [], 0.0)
    by_likelihood = sorted(starts, key=lambda i: (-distribution[i], i))
    kept = set(by_likelihood[: max(0, chain_prompts)])
    dropped = [s for s in starts if s not in kept]
    total = sum(distribution[s] for s in starts)
    share = sum(distribution[s] for s in dropped) / total if total > 0 else 0.0
    return StartPlan([s for s in starts if s in kept], dropped, share)


def fit_round(
    distribution: Sequence[float], active: Sequence[int], remaining: int | None
) -> tuple[list[int], list[int]]:
    """One lockstep round of chains (``active`` are their starts) under ``remaining``
    prompts (None: no bound): the starts whose step is sent, and those cut because their
    step would pass the budget (the least likely first; ties: the later option)."""
    if remaining is None or len(active) <= remaining:
        return list(active), []
    by_likelihood = sorted(active, key=lambda i: (-distribution[i], i))
    sent = set(by_likelihood[: max(0, remaining)])
    return [s for s in active if s in sent], [s for s in active if s not in sent]


#: The sizes of one standard prompt (a 4-option question of ordinary length), in bytes.
STANDARD_QUESTION_BYTES = 120
STANDARD_OPTION_BYTES = 4 * 25


def prompt_size(question_bytes: int, option_bytes: Sequence[int]) -> float:
    """The relative engine cost of one prompt of a question, 1.0 for a standard 4-option
    one, from text lengths alone (known before any engine call): what admission predicts
    time by. Its prompts share the question's prefix, which the engine's prefix cache
    serves after the first, so the options (one of them replaced in each chain step) and
    the instruction after them are what each prompt costs; the question counts a fifth."""
    standard = PROMPT_OVERHEAD_BYTES + STANDARD_QUESTION_BYTES / 5 + STANDARD_OPTION_BYTES
    own = PROMPT_OVERHEAD_BYTES + question_bytes / 5 + sum(option_bytes)
    return own / standard


# The option labels, the instruction and the answer prefix, and the engine's own cost per
# prompt (a step's latency floor), in bytes of options: fitted to the 2-core CPU engine's
# seconds per prompt alone at 4, 11, 13 and 26 options (0.13, 0.15, 0.19, 0.31 s;
# docs/performance.md), linear in the option bytes, within 25 % of each.
PROMPT_OVERHEAD_BYTES = 300


# ----------------------------------------------------------------------- free-form questions

#: A free-form question's K samples are one prompt sampled K times.
FREEFORM_SAMPLE_PROMPTS = 1


def freeform_min_prompts(method: str) -> int:
    """The fewest prompts a free-form question can be scored with: the samples' prompt,
    then what the UF part over the groups needs at least (``min_prompts``)."""
    return FREEFORM_SAMPLE_PROMPTS + min_prompts(method)


def freeform_planned_prompts(
    method: str,
    samples: int,
    max_prompts: int,
    *,
    given: bool = False,
    judge_prompts_per_pair: int = 1,
) -> int:
    """The prompts a free-form question is planned at (admission weighs it by this): its
    worst case under the budget ``max_prompts`` (0 = no bound).

    The worst case: the samples' prompt; every pair of the K samples' exact groups (and
    the given answer's, when ``given``) judged, ``judge_prompts_per_pair`` prompts each
    (0 for a judge that uses no engine); then UF over as many options as there can be
    groups, at least 2 (one group gets the abstention) and at most 26."""
    candidates = max(0, samples) + (1 if given else 0)
    pairs = candidates * (candidates - 1) // 2
    n_options = min(max(candidates, 2), MAX_OPTIONS)
    worst = (
        FREEFORM_SAMPLE_PROMPTS
        + pairs * max(0, judge_prompts_per_pair)
        + unbounded_prompts(method, n_options)
    )
    if max_prompts <= 0:
        return worst
    return min(worst, max(max_prompts, freeform_min_prompts(method)))


#: A free-form option is a short sampled answer (at most 12 tokens), or the given answer.
FREEFORM_OPTION_BYTES = 40


def freeform_prompt_size(question_bytes: int, samples: int, given_bytes: int | None) -> float:
    """``prompt_size`` for a free-form question: its UF prompts at their largest, the
    options being the groups of the K samples (short answers) and the given answer's, as
    many as ``freeform_planned_prompts`` plans for. The samples' and the judge's prompts
    hold fewer texts, so this errs on the slow side, as the plan does."""
    n_options = min(max(samples, 2), MAX_OPTIONS)
    options = [FREEFORM_OPTION_BYTES] * n_options
    if given_bytes is not None:
        options = [*options[: MAX_OPTIONS - 1], given_bytes]
    return prompt_size(question_bytes, options)
