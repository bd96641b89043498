"""The wire contract of ``POST /score``: request and response models."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, Strict, StringConstraints, field_validator
from pydantic_core import PydanticCustomError

from service.calibration.freeform import normalize_answer
from service.calibration.prompts import LETTERS, MAX_OPTIONS
from service.scoring_freeform import FREEFORM_METHODS

NonEmptyText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
Task = Literal["multiple_choice", "free_form"]
#: The methods that give every option a confidence (a given option can be scored).
OPTION_METHODS = ("uf", "fidelity", "sampled", "token")


class ScoreRequest(BaseModel):
    """One question to answer with a calibrated confidence: multiple choice (``options``)
    or free-form (no ``options``), optionally with a given ``answer`` to score."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "question": "Which gas do plants take from the air for photosynthesis?",
                    "options": ["Oxygen", "Carbon dioxide", "Nitrogen", "Helium"],
                },
                {
                    "question": "Which gas do plants take from the air for photosynthesis?",
                    "options": ["Oxygen", "Carbon dioxide", "Nitrogen", "Helium"],
                    "answer": "B",
                },
                {
                    "question": "What is the capital of Australia?",
                    "answer": "Sydney",
                },
            ]
        },
    )

    question: NonEmptyText = Field(description="The question text.")
    options: list[NonEmptyText] | None = Field(
        default=None,
        min_length=2,
        max_length=MAX_OPTIONS,
        description="Option texts in order; they are labelled A, B, C, ... Absent or null: "
        "the question is free-form (the model's sampled answers are grouped by meaning and "
        "UF runs over the groups as options; methods uf and fidelity only).",
    )
    answer: Annotated[int, Strict()] | str | None = Field(
        default=None,
        description="An answer to score (e.g. a chatbot's), whose confidence comes back in "
        "`given` beside the model's own answer. With options: an option's 0-based index, "
        "its label (A..Z, any case) or its exact text (whitespace trimmed). Free-form: the "
        "answer's text. It gets the confidence of the group of sampled answers it belongs "
        "to (matched exactly after SQuAD normalisation, else by the judge); when the model "
        "never says anything like it, it is scored as an option of its own, "
        "(1 - U) x F(answer): low, and exactly 0 when it is in no fidelity chain, i.e. the "
        "model neither picks it nor falls back to it once its own answers are removed.",
    )

    @field_validator("options")
    @classmethod
    def _distinct_options(cls, options: list[str] | None) -> list[str] | None:
        """Options identical after trimming whitespace cannot be told apart by the model
        (the answer's index would be arbitrary): refuse them, naming their indexes."""
        if options is None:
            return None
        first: dict[str, int] = {}
        groups: dict[int, list[int]] = {}
        for i, text in enumerate(options):  # already stripped by NonEmptyText
            j = first.setdefault(text, i)
            if j != i:
                groups.setdefault(j, [j]).append(i)
        if groups:
            indexes = list(groups.values())
            shown = "; ".join(", ".join(str(i) for i in g) for g in indexes)
            raise PydanticCustomError(
                "duplicate_options",
                "options {shown} are identical after trimming whitespace",
                {"shown": shown, "indexes": indexes},
            )
        return options

    method: Literal["uf", "fidelity", "sampled", "token", "verbalized", "linguistic"] = Field(
        default="uf",
        description="uf: (1 - Uncertainty) x Fidelity; fidelity: the ablation without the "
        "uncertainty factor; baselines: sampled (P(answer) from K samples, always sampling), "
        "token (raw probability of the answer letter, always logprobs), verbalized (the model "
        "states a number), linguistic (the model picks a phrase mapped to a number). The "
        "baselines run no chains: their fidelity is all 0 and chains empty.",
    )
    # Unset fields take the service's configured defaults (UFCAL_MODE, UFCAL_SAMPLES, ...).
    mode: Literal["auto", "logprobs", "sampling"] | None = Field(
        default=None,
        description="logprobs: one forward pass reads the option letters (white-box); "
        "sampling: K sampled answers (black-box); auto: logprobs where the engine has them. "
        "Default: UFCAL_MODE (auto).",
    )
    samples: int | None = Field(
        default=None, ge=1, le=64, description="K, samples in sampling mode (default 10)."
    )
    temperature: float | None = Field(
        default=None,
        gt=0,
        le=10,
        description="Sampling temperature, or T of the letter softmax (default 1.0).",
    )
    tau: float | None = Field(
        default=None, gt=0, le=100, description="Fidelity chain position weight (default 2)."
    )
    eps: float | None = Field(
        default=None,
        ge=0,
        lt=1,
        description="Logprobs mode: options with P >= eps start a chain (default 0.01).",
    )
    max_prompts: int | None = Field(
        default=None,
        ge=1,
        description="Work budget: the most prompts this question may send (at least 2 for "
        "uf, fidelity, verbalized and linguistic; at most UFCAL_MAX_PROMPTS_PER_QUESTION, "
        "default 64). Chain starts are planned to fit, the least likely dropped first; "
        "usage.budget_hit says when it bound.",
    )
    id: str | None = Field(
        default=None, min_length=1, max_length=128, description="Your id for this question."
    )

    @property
    def task(self) -> Task:
        """``free_form`` without options, else ``multiple_choice``."""
        return "free_form" if self.options is None else "multiple_choice"


class AnswerNotAnOption(ValueError):
    """A given answer that names no option (or two different ones)."""


def option_index(options: Sequence[str], answer: int | str) -> int:
    """The option a given answer names: its 0-based index, its label (a letter, any case)
    or its exact text after trimming whitespace. Raises ``AnswerNotAnOption`` saying what
    is accepted, also when a letter is one option's label and another option's text."""
    n = len(options)
    accepted = (
        f"give an option's index 0..{n - 1}, its label {LETTERS[0]}..{LETTERS[n - 1]} "
        "(any case) or its exact text"
    )
    if isinstance(answer, int):
        if 0 <= answer < n:
            return answer
        raise AnswerNotAnOption(f"answer {answer} is not an option: {accepted}")
    text = answer.strip()
    by_text = next((i for i, option in enumerate(options) if option.strip() == text), None)
    label = text.upper()
    by_label = LETTERS.index(label) if len(label) == 1 and label in LETTERS[:n] else None
    if by_text is not None and by_label is not None and by_text != by_label:
        raise AnswerNotAnOption(
            f"answer {text!r} is ambiguous: label {label} is option {by_label} but "
            f"{text!r} is the text of option {by_text}; give the index"
        )
    found = by_text if by_text is not None else by_label
    if found is None:
        raise AnswerNotAnOption(f"answer {text[:60]!r} is not an option: {accepted}")
    return found


def request_issues(
    body: ScoreRequest, prefix: tuple[str | int, ...] = ("body",)
) -> list[dict[str, Any]]:
    """What the request's fields say together that no single field's type can: the given
    answer names an option (multiple choice) or has content (free-form), and the method
    fits the task. Validation-shaped issues (``loc`` under ``prefix``); empty: none."""
    issues: list[dict[str, Any]] = []

    def issue(field: str, msg: str, kind: str, value: Any) -> None:
        issues.append({"loc": (*prefix, field), "msg": msg, "type": kind, "input": value})

    if body.options is None:
        if body.method not in FREEFORM_METHODS:
            issue(
                "method",
                f"method {body.method} cannot score a free-form question (no options): "
                f"use one of {', '.join(FREEFORM_METHODS)}",
                "method_not_free_form",
                body.method,
            )
        if isinstance(body.answer, int):
            issue(
                "answer",
                "an index names an option, and a free-form question has none: give the "
                "answer's text",
                "answer_not_text",
                body.answer,
            )
        elif body.answer is not None and not normalize_answer(body.answer):
            issue(
                "answer",
                "the free-form answer is empty once punctuation, articles and whitespace "
                "are removed",
                "answer_empty",
                body.answer,
            )
        return issues
    if body.answer is None:
        return issues
    try:
        option_index(body.options, body.answer)
    except AnswerNotAnOption as exc:
        issue("answer", str(exc), "answer_not_an_option", body.answer)
    if body.method not in OPTION_METHODS:
        issue(
            "method",
            f"method {body.method} states a confidence for the model's own answer only, so "
            f"it cannot score a given answer: use one of {', '.join(OPTION_METHODS)}",
            "method_scores_no_given_answer",
            body.method,
        )
    return issues


class AnswerOut(BaseModel):
    index: int = Field(description="0-based position of the option.")
    label: str = Field(description="Its letter.")
    text: str = Field(description="Its text.")


class GivenOut(BaseModel):
    """The request's ``answer`` and its confidence."""

    answer: str = Field(
        description="The option's text (multiple choice), or the free-form answer as given."
    )
    index: int | None = Field(
        description="Multiple choice: the option's index. Free-form: the index of the "
        "answer's group in `groups` (also its option in `distribution`, by letter)."
    )
    match: Literal["option", "exact", "judge", "absent"] = Field(
        description="option: multiple choice. Free-form: exact (it normalises like a "
        "sampled answer), judge (the judge found it means what a group says) or absent "
        "(the model never said anything like it: scored as an option of its own, low, "
        "0 when it is in no fidelity chain)."
    )
    confidence: float = Field(
        ge=0,
        le=1,
        description="Its confidence, calibrated as `confidence` is (same calibrator).",
    )
    raw_confidence: float = Field(
        ge=0,
        le=1,
        description="The method's own score of it: (1 - U) x F(option) for uf, F(option) "
        "for fidelity, P(option) for sampled, its letter's probability for token.",
    )


class GroupOut(BaseModel):
    """One group of sampled answers that mean the same (free-form)."""

    label: str = Field(description="Its option letter in `distribution`/`fidelity`/`chains`.")
    representative: str = Field(description="The text shown as its option.")
    members: list[str] = Field(description="Its distinct texts, in order of appearance.")
    count: int = Field(description="Sampled answers in it (0: the given answer alone).")
    confidence: float = Field(ge=0, le=1, description="Its calibrated confidence.")
    raw_confidence: float = Field(ge=0, le=1, description="(1 - U) x F(group) (uf).")
    given: bool = Field(description="It holds the given answer.")


class FreeformUsageOut(BaseModel):
    """How a free-form question's options came about (its prompts are in `usage`)."""

    samples_taken: int = Field(description="K, the short answers sampled (one prompt).")
    samples_usable: int = Field(description="Those left once cleaned (others unparsed).")
    judge_prompts: int = Field(description="Prompts the equivalence judge took.")
    judge_rounds: int = Field(description="Judge rounds (one batch each).")
    judge_skipped: int = Field(
        description="Pairs the budget left unjudged (their groups stay apart)."
    )
    dropped_groups: int = Field(description="Groups past the 26 options UF can take.")
    dropped_samples: int = Field(description="Samples in the dropped groups.")
    largest_group_share: float = Field(
        ge=0, le=1, description="The largest group's share of the usable samples."
    )
    semantic_entropy: float = Field(ge=0, description="Over the groups, in nats.")
    semantic_entropy_normalized: float = Field(ge=0, le=1, description="Divided by ln K.")
    abstention: str | None = Field(
        description="The option added after the one group when all samples agree "
        '("I don\'t know."): UF needs two options. It is the last option, not a group.'
    )


class UsageOut(BaseModel):
    engine_calls: int = Field(description="Engine round trips (batches).")
    prompts: int = Field(description="Prompts sent to the engine.")
    unparsed: int = Field(description="Model replies that named no option.")
    prompt_tokens: int
    completion_tokens: int
    budget_hit: bool = Field(
        default=False,
        description="The work budget bound this question: chain starts were dropped "
        "(dropped_mass) or chains cut (chains_cut).",
    )
    dropped_mass: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="Share of the chain start set's probability mass whose chains the "
        "budget did not run; F(answer) moves by at most this much.",
    )
    chains_cut: int = Field(
        default=0,
        ge=0,
        description="Chains ended early because their next step would pass the budget.",
    )
    max_prompts: int = Field(
        default=0,
        ge=0,
        description="The work budget the question ran under (0: none): the request's "
        "max_prompts, else UFCAL_MAX_PROMPTS_PER_QUESTION, or less when budget_fitted.",
    )
    budget_fitted: bool = Field(
        default=False,
        description="The request set no max_prompts and the default budget would not have "
        "finished before the deadline at the engine's measured rate, so it was lowered to "
        "what is predicted to (fewer chain starts or shorter chains: see dropped_mass).",
    )


class CalibratorOut(BaseModel):
    """The calibrator that mapped the raw score to the returned confidence."""

    version: int = Field(description="Its version for this (model, method, mode, task).")
    kind: Literal["platt", "beta", "isotonic"]
    labels: int = Field(description="Labels it was fitted on.")


_FREEFORM_EXAMPLE: dict[str, Any] = {
    "id": "ff-1",
    "task": "free_form",
    "answer": {"index": 0, "label": "A", "text": "Canberra"},
    "confidence": 0.36,
    "raw_confidence": 0.36,
    "calibrator": None,
    "uncertainty": 0.55,
    "distribution": {"A": 0.7, "B": 0.3, "C": 0.0},
    "fidelity": {"A": 0.8, "B": 0.2, "C": 0.0},
    "chains": {"A": ["A"], "B": ["B", "A"]},
    "method": "uf",
    "mode": "logprobs",
    "model": "SmolLM2-135M-Instruct",
    "usage": {
        "engine_calls": 6,
        "prompts": 10,
        "unparsed": 0,
        "prompt_tokens": 282,
        "completion_tokens": 19,
        "budget_hit": False,
        "dropped_mass": 0.0,
        "chains_cut": 0,
        "max_prompts": 64,
        "budget_fitted": False,
    },
    "latency_ms": 812.4,
    "given": {
        "answer": "Sydney",
        "index": 2,
        "match": "absent",
        "confidence": 0.0,
        "raw_confidence": 0.0,
    },
    "groups": [
        {
            "label": "A",
            "representative": "Canberra",
            "members": ["Canberra", "canberra, the capital"],
            "count": 7,
            "confidence": 0.36,
            "raw_confidence": 0.36,
            "given": False,
        },
        {
            "label": "B",
            "representative": "Melbourne",
            "members": ["Melbourne"],
            "count": 3,
            "confidence": 0.09,
            "raw_confidence": 0.09,
            "given": False,
        },
        {
            "label": "C",
            "representative": "Sydney",
            "members": ["Sydney"],
            "count": 0,
            "confidence": 0.0,
            "raw_confidence": 0.0,
            "given": True,
        },
    ],
    "free_form": {
        "samples_taken": 10,
        "samples_usable": 10,
        "judge_prompts": 4,
        "judge_rounds": 2,
        "judge_skipped": 0,
        "dropped_groups": 0,
        "dropped_samples": 0,
        "largest_group_share": 0.7,
        "semantic_entropy": 0.61,
        "semantic_entropy_normalized": 0.27,
        "abstention": None,
    },
}


class ScoreResponse(BaseModel):
    """The answer, its calibrated confidence and every part behind it."""

    model_config = ConfigDict(json_schema_extra={"examples": [_FREEFORM_EXAMPLE]})

    id: str
    task: Task = Field(
        description="multiple_choice (options given) or free_form. Free-form: the options "
        "UF ran over are the groups (`groups`, largest first), then `free_form.abstention` "
        "if one was added; `answer`, `distribution`, `fidelity` and `chains` refer to them."
    )
    answer: AnswerOut = Field(
        description="The model's answer: UF's chosen option (free-form: a group's "
        "representative, or the abstention)."
    )
    confidence: float = Field(
        ge=0,
        le=1,
        description="The confidence to trust: the active calibrator's P(correct) of the raw "
        "score when one is active for this (model, method, mode), else the raw score.",
    )
    raw_confidence: float = Field(
        ge=0, le=1, description="The method's own score, e.g. (1 - uncertainty) x fidelity."
    )
    calibrator: CalibratorOut | None = Field(
        description="The calibrator applied to raw_confidence; null: none is active."
    )
    uncertainty: float = Field(ge=0, le=1, description="Normalised entropy of the answers.")
    distribution: dict[str, float] = Field(description="P(option) by label.")
    fidelity: dict[str, float] = Field(description="F(option) by label.")
    chains: dict[str, list[str]] = Field(description="The fidelity chain of each start option.")
    method: str
    mode: Literal["logprobs", "sampling"]
    model: str
    usage: UsageOut = Field(description="The whole question (free-form: samples, judge, UF).")
    latency_ms: float
    given: GivenOut | None = Field(
        default=None, description="The request's `answer` with its confidence; null: none."
    )
    groups: list[GroupOut] | None = Field(
        default=None, description="Free-form: the groups, in option order; null otherwise."
    )
    free_form: FreeformUsageOut | None = Field(
        default=None, description="Free-form: samples and grouping; null otherwise."
    )


def freeform_options(response: ScoreResponse) -> list[str]:
    """The options UF ran over for a free-form reply: the groups' representatives, then
    the abstention when one was added (empty for a multiple-choice reply)."""
    options = [g.representative for g in response.groups or []]
    if response.free_form is not None and response.free_form.abstention is not None:
        options.append(response.free_form.abstention)
    return options


class BatchScoreRequest(BaseModel):
    """Many questions in one request; each is scored as by ``POST /score``."""

    model_config = ConfigDict(extra="forbid")

    items: list[ScoreRequest] = Field(
        min_length=1,
        description="The questions, each a /score request body (multiple choice and "
        "free-form may be mixed).",
    )


class BatchItemError(BaseModel):
    status: int = Field(description="The HTTP status /score would have answered.")
    detail: str


class BatchItem(BaseModel):
    """One item's outcome: ``result`` on success, else ``error``."""

    index: int = Field(description="Position of the item in the request.")
    result: ScoreResponse | None = None
    error: BatchItemError | None = None


class BatchScoreResponse(BaseModel):
    """Results in the order of the request's items (per-item errors, not all-or-nothing)."""

    results: list[BatchItem]
    succeeded: int
    failed: int
