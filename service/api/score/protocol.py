"""The wire contract of ``POST /score``: request and response models."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator
from pydantic_core import PydanticCustomError

from service.calibration.prompts import MAX_OPTIONS

NonEmptyText = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class ScoreRequest(BaseModel):
    """One multiple-choice question to answer with a calibrated confidence."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "question": "Which gas do plants take from the air for photosynthesis?",
                    "options": ["Oxygen", "Carbon dioxide", "Nitrogen", "Helium"],
                }
            ]
        },
    )

    question: NonEmptyText = Field(description="The question text.")
    options: list[NonEmptyText] = Field(
        min_length=2,
        max_length=MAX_OPTIONS,
        description="Option texts in order; they are labelled A, B, C, ...",
    )

    @field_validator("options")
    @classmethod
    def _distinct_options(cls, options: list[str]) -> list[str]:
        """Options identical after trimming whitespace cannot be told apart by the model
        (the answer's index would be arbitrary): refuse them, naming their indexes."""
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


class AnswerOut(BaseModel):
    index: int = Field(description="0-based position of the option.")
    label: str = Field(description="Its letter.")
    text: str = Field(description="Its text.")


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

    version: int = Field(description="Its version for this (model, method, mode).")
    kind: Literal["platt", "beta", "isotonic"]
    labels: int = Field(description="Labels it was fitted on.")


class ScoreResponse(BaseModel):
    """The answer, its calibrated confidence and every part behind it."""

    id: str
    answer: AnswerOut
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
    usage: UsageOut
    latency_ms: float


class BatchScoreRequest(BaseModel):
    """Many questions in one request; each is scored as by ``POST /score``."""

    model_config = ConfigDict(extra="forbid")

    items: list[ScoreRequest] = Field(
        min_length=1, description="The questions, each a /score request body."
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
