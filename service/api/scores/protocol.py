"""The wire contract of ``GET /scores``."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

DEFAULT_LIMIT = 20
MAX_LIMIT = 500


class FeedbackOut(BaseModel):
    """The feedback a score got."""

    correct: bool = Field(description="Whether the returned answer was right.")
    gold_index: int | None = Field(description="The gold index given, if any.")
    received_at: float = Field(description="Unix time the feedback was recorded.")


class RecentScore(BaseModel):
    """One stored score; ``question`` and ``options`` only with UFCAL_LOG_TEXT on."""

    id: str
    created_at: float = Field(description="Unix time of the score.")
    model: str
    method: str
    mode: str
    task: Literal["multiple_choice", "free_form"] = Field(
        default="multiple_choice",
        description="free_form: the options are the answer groups (then the abstention).",
    )
    answer_index: int = Field(description="0-based index of the returned answer.")
    answer_label: str = Field(description="Its letter.")
    confidence: float = Field(description="The confidence /score returned.")
    uncertainty: float
    n_options: int
    question: str | None = Field(default=None, description="Null unless UFCAL_LOG_TEXT is on.")
    options: list[str] | None = Field(default=None, description="Null unless UFCAL_LOG_TEXT.")
    feedback: FeedbackOut | None = Field(description="Null until /feedback for this id.")


class RecentScoresResponse(BaseModel):
    """The last ``limit`` scores of this instance's store, newest first."""

    scores: list[RecentScore]
    limit: int
    text_logged: bool = Field(description="UFCAL_LOG_TEXT: whether questions are kept.")
