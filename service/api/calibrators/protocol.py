"""The wire contract of ``GET /calibrators``."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


class CalibratorMetrics(BaseModel):
    """Cross-validated metrics of the raw score (before) and the calibrated one (after)."""

    before: dict[str, float | None] = Field(
        default_factory=dict, description="ece, brier, log_loss, auroc (empty if unknown)."
    )
    after: dict[str, float | None] = Field(
        default_factory=dict, description="ece, brier, log_loss, auroc (empty if unknown)."
    )
    holdout: dict[str, Any] | None = Field(
        default=None,
        description="Online refits: log-loss of the candidate and of the active calibrator "
        "on the newest 20% of the window (n), which decided the promotion.",
    )


class CalibratorVersion(BaseModel):
    """One version of the calibrator of a (model, method, mode, task)."""

    model: str
    method: str
    mode: str
    task: Literal["multiple_choice", "free_form"] = Field(
        default="multiple_choice",
        description="The scores it recalibrates: a free-form score only by a free_form one.",
    )
    version: int
    kind: Literal["platt", "beta", "isotonic"]
    params: dict[str, Any] = Field(description="The map's parameters (JSON, see the README).")
    labels: int = Field(description="Labels it was fitted on.")
    positives: int
    negatives: int
    window: dict[str, Any] = Field(
        description="What it was fitted on: first and last label time, n, labels left out "
        "for a source over its share (capped), labels of the key in all (total)."
    )
    metrics: CalibratorMetrics
    fitted_at: float = Field(description="Unix time of the fit.")
    status: Literal["active", "retired", "rejected"]


class CalibratorsResponse(BaseModel):
    """Every stored version, active and past, by key and version."""

    calibrators: list[CalibratorVersion]
