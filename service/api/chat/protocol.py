"""The wire contract of ``POST /v1/chat/completions``: the ``ufcal`` controls a client adds to
an OpenAI chat request (the OpenAI client's ``extra_body``) and the ``ufcal`` object added to
the reply. The chat body itself is the client's and the engine's: it passes through as JSON,
read only where scoring needs it (``messages``, ``stream``)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.api.score.protocol import AnswerOut, CalibratorOut, UsageOut

CONFIDENCE_HEADER = "x-ufcal-confidence"


class ChatControls(BaseModel):
    """What to score and how; every field is optional. The ranges are /score's (a value out
    of range is a 422 at ``body.ufcal.<field>``)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"options": ["Mars", "Jupiter", "Venus"]}]},
    )

    score: bool = Field(
        default=True,
        description="false: pass the request through to the engine unscored (no ufcal "
        "object, no header).",
    )
    options: list[str] | None = Field(
        default=None,
        description="The options of a multiple-choice turn, in order (labelled A, B, ...); "
        "the reply is matched to one. Absent: the turn is a free-form question.",
    )
    samples: int | None = Field(default=None, description="K, samples in sampling mode.")
    mode: str | None = Field(default=None, description="auto, logprobs or sampling.")
    max_prompts: int | None = Field(
        default=None, description="Work budget: the most prompts scoring may send."
    )
    id: str | None = Field(
        default=None, description="Your id for this score (for /feedback); default: a new one."
    )


class ChatGiven(BaseModel):
    """What the chatbot answered, and its confidence."""

    text: str = Field(description="The reply's text (the first choice).")
    index: int | None = Field(default=None, description="Multiple choice: the option named.")
    label: str | None = Field(default=None, description="Multiple choice: its letter.")
    match: Literal["label", "text", "free_form"] = Field(
        description="How the reply was read: by its leading letter label, by the option's "
        "exact text, or as free text."
    )
    confidence: float | None = Field(
        default=None, ge=0, le=1, description="The given answer's calibrated confidence."
    )
    raw_confidence: float | None = Field(default=None, ge=0, le=1)


class OptionScore(BaseModel):
    """One option of a multiple-choice turn as the scorer saw it."""

    label: str
    text: str
    probability: float = Field(description="P(option) read from the model.")
    fidelity: float = Field(description="F(option).")


class ChatScore(BaseModel):
    """The ``ufcal`` object: the scored turn's calibrated confidence and what is behind it."""

    id: str = Field(description="The score's id: send it to POST /feedback.")
    task: Literal["multiple_choice", "free_form"]
    confidence: float = Field(
        ge=0,
        le=1,
        description="The given answer's confidence when the reply names one, else the "
        "model's own answer's.",
    )
    raw_confidence: float = Field(ge=0, le=1)
    calibrator: CalibratorOut | None
    uncertainty: float = Field(ge=0, le=1)
    given: ChatGiven | None = Field(
        description="The reply read as an answer; null: it names none of the options (the "
        "confidence is then the model's own answer's)."
    )
    answer: AnswerOut | None = Field(
        default=None, description="Multiple choice: the model's own answer."
    )
    options: list[OptionScore] | None = Field(default=None, description="Multiple choice.")
    groups: list[dict[str, Any]] | None = Field(
        default=None, description="Free form: the sampled answers grouped by meaning."
    )
    context_turns: int = Field(
        description="Earlier turns put before the question as context (see the README)."
    )
    method: str
    mode: Literal["logprobs", "sampling"]
    model: str
    usage: UsageOut
    latency_ms: float


class ChatScoreFailure(BaseModel):
    """Streaming only: the tokens went out but scoring failed; the status /score would have
    answered and its detail."""

    status: int
    detail: Any
