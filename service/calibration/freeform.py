"""Free-form answers as a multiple-choice question for UF Calibration: plain functions over
plain data (no I/O). ``service.scoring_freeform`` runs them over an engine.

The way one free-form question is scored:

1. K short answers are sampled (``sample_prompt``) and cut to the answer proper
   (``clean_sample``); unusable samples are dropped and counted.
2. They are grouped by meaning in tiers, cheapest first; a pair is decided by the first
   tier that decides it:
   (a) normalised exact match (``normalize_answer``, SQuAD's): ``exact_groups``;
   (b) a semantic-equivalence judge, outside this module: ``judge_requests`` lists the
       pairs of one round, the caller asks the judge, ``merge_groups`` applies the verdicts.
   The judge rounds are the greedy clustering of Kuhn et al. (2023) done in lockstep: in
   round r the r-th group (the "head", largest first) is compared with every later group,
   always through the groups' representatives, and the later groups it is judged to match
   join it. Round r's pairs are independent, so they go to the judge as one batch; there
   are at most (groups - 1) rounds and (groups choose 2) pairs, far fewer when answers
   agree. A judge that is not transitive cannot chain two groups through a third: each
   group joins one head, compared with that head's representative.
3. The groups, largest first, become the options of a multiple-choice question
   (``groups_to_options``) scored by UF; a group's confidence is UF's per-option
   confidence (1 - U) * F(option).

A given answer (the chatbot's text) is added as a candidate before grouping
(``add_candidate``): exact tier first, then it takes part in the judge rounds like any
group, counting no sample. See ``add_candidate`` for the rule when the model never says
anything like it.
"""

from __future__ import annotations

import hashlib
import math
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, replace

from service.calibration.prompts import MAX_OPTIONS, Prompt, PromptTemplate

ABSTAIN_OPTION = "I don't know."
ABSTAIN_FALLBACK = "Something else."
SAMPLE_INSTRUCTION = "Answer the question in a few words only."
SAMPLE_PREFIX = "The answer is"
JUDGE_INSTRUCTION = (
    "Do the two answers say the same thing, as answers to the question? Reply yes or no."
)
JUDGE_PREFIX = "Reply:"

# ----------------------------------------------------------------------- normalisation

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, remove (ASCII) punctuation, remove the
    articles a/an/the, collapse whitespace. Idempotent."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


_LEAD = re.compile(
    r"^\s*:?\s*(?:(?:so\s+)?(?:the\s+)?(?:correct\s+|final\s+)?answer\s*(?:is|:)\s*:?\s*)*",
    re.I,
)
_SENTENCE_END = re.compile(r"[.!?](?=\s|$)")
_WRAP = " \t\"'`*_()[]{}"


def clean_sample(text: str) -> str:
    """Cut a sampled short answer (what follows the pre-filled "The answer is") to the
    answer proper: the first non-empty line, a leading ":" or "The answer is" stripped,
    up to the end of the first sentence (a ``.``, ``!`` or ``?`` followed by a space or
    the end; "3.14" stays whole), quotes, markdown emphasis and a trailing period stripped.
    "" when nothing usable is left (nothing but punctuation, articles or spaces)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    answer = _LEAD.sub("", lines[0]).strip()
    if end := _SENTENCE_END.search(answer):
        answer = answer[: end.start()]
    answer = answer.strip(_WRAP).rstrip(".,;:!?").strip(_WRAP).strip()
    return answer if normalize_answer(answer) else ""


# ----------------------------------------------------------------------- groups


@dataclass(frozen=True)
class Group:
    """Answers that mean the same. ``representative`` is the text shown as the option
    (the group's most frequent sampled form; ties: first appearance); ``members`` its
    distinct original texts in order of first appearance; ``indices`` the sample indices
    it holds (``count`` of them). ``given`` marks the group holding the given answer,
    which counts no sample (a group of the given answer alone has count 0)."""

    representative: str
    members: tuple[str, ...]
    indices: tuple[int, ...] = ()
    given: bool = False

    @property
    def count(self) -> int:
        return len(self.indices)

    @property
    def first(self) -> float:
        """Where the group first appears in the samples (inf: the given answer alone)."""
        return min(self.indices) if self.indices else math.inf


def order_groups(groups: Sequence[Group]) -> list[Group]:
    """Largest first; ties: first appearance in the samples (the given answer alone last)."""
    return sorted(groups, key=lambda g: (-g.count, g.first))


def exact_groups(answers: Sequence[str]) -> list[Group]:
    """Tier (a): group cleaned answers by ``normalize_answer``; "" (unusable) is skipped
    (its index belongs to no group). Ordered by ``order_groups``."""
    by_key: dict[str, list[int]] = {}
    for i, text in enumerate(answers):
        key = normalize_answer(text)
        if key:
            by_key.setdefault(key, []).append(i)
    groups = []
    for indices in by_key.values():
        groups.append(_group_of([answers[i] for i in indices], tuple(indices)))
    return order_groups(groups)


def _group_of(texts: Sequence[str], indices: tuple[int, ...], given: bool = False) -> Group:
    members = tuple(dict.fromkeys(texts))
    representative = max(members, key=lambda m: (texts.count(m), -members.index(m)))
    return Group(representative, members, indices, given)


@dataclass(frozen=True)
class JudgePair:
    """One question to the judge: does group ``other`` mean what group ``head`` means?
    ``first``/``second`` are their representatives."""

    head: int
    other: int
    first: str
    second: str


def judge_requests(groups: Sequence[Group], head: int) -> list[JudgePair]:
    """The pairs of round ``head``: group ``head``'s representative against each later
    group's (groups before ``head`` are settled). Empty when ``head`` is the last group.
    Pairs are in group order, so a budget that cuts a round keeps the largest groups'."""
    if not 0 <= head < len(groups):
        return []
    h = groups[head]
    return [
        JudgePair(head, j, h.representative, groups[j].representative)
        for j in range(head + 1, len(groups))
    ]


def merge_groups(
    groups: Sequence[Group], pairs: Sequence[JudgePair], verdicts: Sequence[bool]
) -> list[Group]:
    """Apply one round's verdicts: each later group judged the same as its head joins it
    (members, indices and the given mark move over; the representative stays the head's).
    Positions are kept otherwise (the next round's head is ``head + 1``); reorder with
    ``order_groups`` when the rounds are over. A pair with no verdict (``verdicts`` shorter
    than ``pairs``, e.g. cut by a budget) counts as "different"."""
    merged = list(groups)
    gone: set[int] = set()
    for pair, same in zip(pairs, verdicts, strict=False):
        if not same or pair.other in gone or pair.head in gone:
            continue
        head, other = merged[pair.head], merged[pair.other]
        merged[pair.head] = Group(
            head.representative,
            tuple(dict.fromkeys(head.members + other.members)),
            tuple(sorted(head.indices + other.indices)),
            head.given or other.given,
        )
        gone.add(pair.other)
    return [g for i, g in enumerate(merged) if i not in gone]


def judge_rounds_bound(n_groups: int) -> tuple[int, int]:
    """The most rounds and judge pairs grouping ``n_groups`` exact groups can take."""
    return max(0, n_groups - 1), n_groups * (n_groups - 1) // 2


def cap_groups(groups: Sequence[Group], limit: int = MAX_OPTIONS) -> tuple[list[Group], int]:
    """Keep the first ``limit`` groups (ordered), always keeping the given answer's group
    (it takes the last kept slot when it would fall off). Returns the kept groups and the
    number of samples in the dropped ones."""
    if len(groups) <= limit:
        return list(groups), 0
    keep = list(range(limit))
    given = next((i for i in range(limit, len(groups)) if groups[i].given), None)
    if given is not None:
        keep[-1] = given
    dropped = sum(g.count for i, g in enumerate(groups) if i not in keep)
    return [groups[i] for i in keep], dropped


# ----------------------------------------------------------------------- the given answer


def add_candidate(groups: Sequence[Group], answer: str) -> tuple[list[Group], bool]:
    """Add the given answer as a candidate, exact tier first: when it normalises like a
    member of a group, that group is marked ``given`` (and True is returned: matched
    exactly). Otherwise it becomes a group of its own, with no sample (count 0), placed
    last, and takes part in the judge rounds like any group (every head is compared
    with it; never a head itself while any sampled group follows it).

    The rule when the model never produces anything like it (no exact match, no judge
    verdict): it stays an option of its own, so UF measures how the model treats it, and
    its confidence is the UF confidence of that option, (1 - U) * F(answer). F(answer) is
    what the fidelity chains give it: a share of a chain's weight only where the model
    fell to it once its own preferred options were removed, at most
    tau^i / (sum tau^j) for its position i, times the weight of that chain's start. It is
    exactly 0 when the answer is in no chain, i.e. the model neither picks it when shown
    the options (P below eps / never sampled) nor falls back to it in any chain: the model
    shows no sign of holding it, and 0 is what UF's formula says, not a floor we invent."""
    if not normalize_answer(answer):
        raise ValueError("the given answer is empty once normalised")
    key = normalize_answer(answer)
    result = list(groups)
    for i, g in enumerate(result):
        if any(normalize_answer(m) == key for m in g.members):
            result[i] = replace(g, members=tuple(dict.fromkeys((*g.members, answer))), given=True)
            return result, True
    result.append(Group(answer, (answer,), (), True))
    return result, False


def given_group(groups: Sequence[Group]) -> int | None:
    """The index of the group holding the given answer, or None."""
    return next((i for i, g in enumerate(groups) if g.given), None)


# ----------------------------------------------------------------------- options


def groups_to_options(groups: Sequence[Group]) -> list[str]:
    """The options of the multiple-choice question: the groups' representatives in the
    groups' order (largest group first)."""
    return [g.representative for g in groups]


def single_group_option(groups: Sequence[Group]) -> str | None:
    """The second option a one-group question gets (None when there are already two).

    UF needs at least two options: with one, there is no spread to measure (U undefined,
    ln 1 = 0) and a chain [s] alone gives F = 1, so the confidence would be 1 by
    construction. Instead an abstention, "I don't know.", is offered beside the one answer:
    U then measures whether the model would rather abstain, and the fidelity chain whether
    it stays in its slot when its answer's text is replaced by "All other options are
    wrong." (unlike "None of the above", which says the same as the substituted text and
    would make that step a coin toss). When the one group is itself an abstention,
    "Something else." is offered instead."""
    if len(groups) != 1:
        return None
    if normalize_answer(groups[0].representative) == normalize_answer(ABSTAIN_OPTION):
        return ABSTAIN_FALLBACK
    return ABSTAIN_OPTION


# ----------------------------------------------------------------------- anchors


def largest_group_share(groups: Sequence[Group], k: int) -> float:
    """The share of the ``k`` samples in the largest group (0 with no group): the
    free-form "sampled" confidence, computed on the same samples UF's options come from.
    Pass the usable samples as ``k`` (unusable ones are dropped, as in the spec)."""
    if k <= 0:
        raise ValueError("k must be > 0")
    return max((g.count for g in groups), default=0) / k


def semantic_entropy(groups: Sequence[Group]) -> float:
    """Discrete semantic entropy (Kuhn et al. 2023; Farquhar et al. 2024), as UQLM and
    LM-Polygraph compute it from cluster frequencies: -sum_c p_c ln p_c with
    p_c = count_c / m over the m sampled answers in ``groups``. NOT normalised: in nats,
    in [0, ln m]. Groups of no sample (the given answer alone) do not count."""
    m = sum(g.count for g in groups)
    if m == 0:
        return 0.0
    return max(0.0, -sum((g.count / m) * math.log(g.count / m) for g in groups if g.count))


def normalized_semantic_entropy(groups: Sequence[Group]) -> float:
    """``semantic_entropy`` / ln m, in [0, 1] (m = the sampled answers; 0 when m <= 1),
    UQLM's normalisation: 1 minus it is UQLM's Normalized Semantic Negentropy."""
    m = sum(g.count for g in groups)
    if m <= 1:
        return 0.0
    return min(1.0, semantic_entropy(groups) / math.log(m))


# ----------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class FreeformTemplate:
    """How the free-form prompts look. ``chat``/``system_prompt`` follow the question
    template; the sampling prompt's assistant turn is pre-filled with ``sample_prefix``
    (the model continues "The answer is ..."), the judge's with ``judge_prefix``."""

    chat: bool = True
    system_prompt: str | None = None
    sample_instruction: str = SAMPLE_INSTRUCTION
    sample_prefix: str = SAMPLE_PREFIX
    judge_instruction: str = JUDGE_INSTRUCTION
    judge_prefix: str = JUDGE_PREFIX

    @classmethod
    def from_template(cls, template: PromptTemplate) -> FreeformTemplate:
        """The free-form template of a multiple-choice one (same form and system prompt;
        its few-shot examples are multiple-choice, so they are not carried over)."""
        return cls(chat=template.chat, system_prompt=template.system_prompt)


def freeform_prefix_key(question: str, template: FreeformTemplate) -> str:
    """One key for every free-form prompt of a question (samples and judge)."""
    text = "\x00".join(("freeform", template.system_prompt or "", question))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def sample_prompt(question: str, template: FreeformTemplate) -> Prompt:
    """The brief-answer prompt the K samples continue: question, instruction, assistant
    turn pre-filled with "The answer is"."""
    user = f"Question: {question.strip()}"
    if template.sample_instruction:
        user += f"\n{template.sample_instruction}"
    return Prompt(
        user=user,
        answer_prefix=template.sample_prefix,
        chat=template.chat,
        system_prompt=template.system_prompt,
        prefix_key=freeform_prefix_key(question, template),
    )


def judge_prompt(question: str, first: str, second: str, template: FreeformTemplate) -> Prompt:
    """The yes/no prompt asking whether two answers say the same thing given the question.
    The question comes first so that all judge prompts of a question share it."""
    user = (
        f"Question: {question.strip()}\n"
        f"Answer 1: {first.strip()}\n"
        f"Answer 2: {second.strip()}\n"
        f"{template.judge_instruction}"
    )
    return Prompt(
        user=user,
        answer_prefix=template.judge_prefix,
        chat=template.chat,
        system_prompt=template.system_prompt,
        prefix_key=freeform_prefix_key(question, template),
    )


_YES_NO = re.compile(r"(yes|no)\b")


def parse_yes_no(reply: str) -> bool | None:
    """True for a reply starting with "yes", False for "no", None otherwise."""
    match = _YES_NO.match(reply.strip().strip(_WRAP).lower())
    return None if match is None else match.group(1) == "yes"
