"""The score store: one interface (:class:`Store`) over SQLite or PostgreSQL.

``records`` holds the plain data and errors, ``tables`` the SQLAlchemy Core schema,
``backends`` the two database configurations, ``migrate`` and ``migrations/`` the Alembic
schema versions, and ``store`` the operations and the live calibration window.
"""

from service.store.records import (
    DEFAULT_TASK,
    TASKS,
    CalibratorKey,
    CalibratorRecord,
    FeedbackExists,
    FeedbackRecord,
    GoldIndexOutOfRange,
    LabelRow,
    LiveCalibration,
    ScoreConflict,
    ScoreRecord,
    StoredScore,
    StoreError,
    StoreUnavailable,
    Task,
    UnknownScore,
    live_calibration,
)
from service.store.store import MAX_BATCH, Store, StoreObserver

__all__ = [
    "DEFAULT_TASK",
    "MAX_BATCH",
    "TASKS",
    "CalibratorKey",
    "CalibratorRecord",
    "FeedbackExists",
    "FeedbackRecord",
    "GoldIndexOutOfRange",
    "LabelRow",
    "LiveCalibration",
    "ScoreConflict",
    "ScoreRecord",
    "Store",
    "StoreError",
    "StoreObserver",
    "StoreUnavailable",
    "StoredScore",
    "Task",
    "UnknownScore",
    "live_calibration",
]
