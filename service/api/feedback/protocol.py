"""The wire contract of ``POST /feedback`` and ``GET /calibration``."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError, ValidationError

StrictIndex = Annotated[int, Field(strict=True, ge=0)]


Task = Literal["multiple_choice", "free_form"]


class FeedbackRequest(BaseModel):
    """The truth for an earlier ``/score`` answer: exactly one of ``correct``, ``gold_index``.

    ``correct`` judges the returned answer: the given one when /score scored a given
    answer, else the model's (for a free-form question, the natural form)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"id": "q-17", "correct": True}, {"id": "q-18", "gold_index": 2}]
        },
    )

    id: str = Field(min_length=1, max_length=128, description="The id the /score reply carried.")
    correct: StrictBool | None = Field(
        default=None,
        description="Whether the returned answer was right: the given answer when /score "
        "scored one, else the model's. The natural form for a free-form question.",
    )
    gold_index: StrictIndex | None = Field(
        default=None,
        description="0-based index of the right option; must be one of the question's options "
        "(for a free-form question: of its groups, then the abstention).",
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> FeedbackRequest:
        if (self.correct is None) == (self.gold_index is None):
            # Name the field: ``correct`` when neither came, ``gold_index`` when both did.
            field = "correct" if self.correct is None else "gold_index"
            issue = PydanticCustomError(
                "exactly_one", "give exactly one of 'correct' and 'gold_index'"
            )
            raise ValidationError.from_exception_data(
                "FeedbackRequest",
                [InitErrorDetails(type=issue, loc=(field,), input=getattr(self, field))],
            )
        return self


class FeedbackResponse(BaseModel):
    """The recorded feedback (durable when this reply is sent)."""

    id: str
    correct: bool = Field(description="Whether the scored answer was right.")
    gold_index: int | None = Field(description="The given gold index, if any.")
    answer_index: int = Field(description="The answer /score returned for this id.")
    confidence: float = Field(description="The confidence /score returned for it.")
    window_size: int = Field(
        description="Scores with feedback in the live window of this score's task now."
    )
    task: Task = Field(
        default="multiple_choice", description="The scored question's task (from /score)."
    )


class ReliabilityBinOut(BaseModel):
    """One reliability bin: confidences in (lower, upper]."""

    lower: float
    upper: float
    count: int
    accuracy: float | None = Field(description="Share correct in the bin; null when empty.")
    confidence: float | None = Field(description="Mean confidence in the bin; null when empty.")


class ConfidenceCalibration(BaseModel):
    """The live window's calibration of one confidence (raw or returned)."""

    accuracy: float | None
    ece: float | None
    ipr: float | None
    ce: float | None
    brier: float | None
    auroc: float | None
    bins: list[ReliabilityBinOut]


class CalibrationResponse(BaseModel):
    """Calibration over one task's last ``window`` scores with feedback; metrics are null
    when n = 0. Free-form and multiple-choice scores never share a window.

    The top-level metrics describe the returned confidence (as ``returned``); ``raw`` the
    methods' own scores for the same answers, before any calibrator."""

    task: Task = Field(
        default="multiple_choice",
        description="The task whose window this is (GET /calibration?task=...).",
    )
    n: int = Field(description="Scores with feedback in the window.")
    window: int = Field(description="Window size (UFCAL_CALIBRATION_WINDOW).")
    n_bins: int = Field(description="Number of bins (UFCAL_CALIBRATION_BINS).")
    accuracy: float | None
    ece: float | None = Field(description="Expected calibration error.")
    ipr: float | None = Field(description="Inverse pair ratio of the bins' accuracies.")
    ce: float | None = Field(description="Confidence evenness (normalised bin entropy).")
    brier: float | None
    auroc: float | None = Field(description="Null also when all answers are right or all wrong.")
    bins: list[ReliabilityBinOut]
    raw: ConfidenceCalibration = Field(description="The methods' raw scores.")
    returned: ConfidenceCalibration = Field(description="The returned confidences.")
