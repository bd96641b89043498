"""What the store keeps and answers: score and feedback records, the errors it refuses
work with, and the live calibration of a window of labels (plain data, no I/O)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

from service.calibration.metrics import ReliabilityBin, calibration_report

#: What was scored: a question with options, or a free-form one (``ScoreResponse.task``).
Task = Literal["multiple_choice", "free_form"]
TASKS: tuple[Task, ...] = get_args(Task)
#: The task of rows and calibrator files from before the store knew the task.
DEFAULT_TASK: Task = "multiple_choice"


class StoreError(Exception):
    """A request the store refuses (the HTTP layer maps each kind to a status)."""


class StoreUnavailable(StoreError):
    """The database cannot be reached (or did not answer in time); nothing was recorded."""


class UnknownScore(StoreError):
    """No score with this id."""


class FeedbackExists(StoreError):
    """The score already has feedback."""


class ScoreConflict(StoreError):
    """A score with this id already has feedback, so it cannot be replaced."""


class GoldIndexOutOfRange(StoreError):
    """``gold_index`` is not an option of the scored question."""

    def __init__(self, gold_index: int, n_options: int) -> None:
        super().__init__(
            f"gold_index {gold_index} is out of range: the question had {n_options} options "
            f"(0..{n_options - 1})"
        )
        self.gold_index = gold_index
        self.n_options = n_options


@dataclass(frozen=True)
class ScoreRecord:
    """What is kept of one successful score (texts only when UFCAL_LOG_TEXT is set)."""

    id: str
    model: str
    method: str
    mode: str
    answer_index: int
    confidence: float
    uncertainty: float
    n_options: int
    created_at: float
    question: str | None = None
    options: Sequence[str] | None = None
    #: The method's own score (``confidence`` is what was returned); None = the same.
    raw_confidence: float | None = None
    calibrator_version: int | None = None
    task: Task = DEFAULT_TASK


@dataclass(frozen=True)
class FeedbackRecord:
    """A recorded feedback, with the score it judges."""

    id: str
    correct: bool
    gold_index: int | None
    answer_index: int
    confidence: float
    received_at: float
    raw_confidence: float = 0.0
    model: str = ""
    method: str = ""
    mode: str = ""
    source: str | None = None
    task: Task = DEFAULT_TASK

    @property
    def key(self) -> CalibratorKey:
        """The calibrator key of the judged score."""
        return (self.model, self.method, self.mode, self.task)


#: The key of a calibrator: (model, method, mode, task). A score is recalibrated, and its
#: label counted, only under the key of its own task.
CalibratorKey = tuple[str, str, str, Task]


@dataclass(frozen=True)
class CalibratorRecord:
    """One stored calibrator version (the ``calibrators`` table; JSON columns decoded)."""

    model: str
    method: str
    mode: str
    version: int
    kind: str
    params: dict[str, Any]
    labels: int
    positives: int
    negatives: int
    window: dict[str, Any]
    metrics: dict[str, Any]
    fitted_at: float
    status: str
    task: Task = DEFAULT_TASK

    @property
    def key(self) -> CalibratorKey:
        return (self.model, self.method, self.mode, self.task)


@dataclass(frozen=True)
class LabelRow:
    """One label of a key's window: the raw score, the truth, who sent it, when."""

    raw_confidence: float
    correct: bool
    source: str | None
    received_at: float


@dataclass(frozen=True)
class StoredScore:
    """A stored score with its feedback, if any (``correct`` is ``None`` without)."""

    score: ScoreRecord
    correct: bool | None = None
    gold_index: int | None = None
    feedback_at: float | None = None


@dataclass(frozen=True)
class LiveCalibration:
    """Calibration of the live window; every metric is ``None`` when ``n == 0``."""

    n: int
    window: int
    n_bins: int
    accuracy: float | None
    ece: float | None
    ipr: float | None
    ce: float | None
    brier: float | None
    auroc: float | None
    bins: tuple[ReliabilityBin, ...]


def live_calibration(
    confidences: Sequence[float], correct: Sequence[bool], window: int, n_bins: int
) -> LiveCalibration:
    """The metrics of ``calibration_report`` over a window, or nulls (and empty bins) if empty."""
    if not confidences:
        empty = tuple(
            ReliabilityBin(i / n_bins, (i + 1) / n_bins, 0, None, None) for i in range(n_bins)
        )
        return LiveCalibration(0, window, n_bins, None, None, None, None, None, None, empty)
    r = calibration_report(confidences, correct, n_bins)
    # ``+ 0.0`` turns a -0.0 (float noise of a clamp) into 0.0 in the JSON and the gauges.
    return LiveCalibration(
        r.n,
        window,
        n_bins,
        r.accuracy + 0.0,
        r.ece + 0.0,
        r.ipr + 0.0,
        r.ce + 0.0,
        r.brier + 0.0,
        None if r.auroc is None else r.auroc + 0.0,
        r.bins,
    )
