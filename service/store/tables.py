"""The store's tables as SQLAlchemy Core definitions: one schema that SQLAlchemy renders for
SQLite and for PostgreSQL. The migrations (``migrations/versions``) create exactly this."""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    Table,
    Text,
    UniqueConstraint,
)

metadata = MetaData()

#: The unique constraint on a calibrator key's version numbers (revision 0002 names it).
CALIBRATOR_VERSION_KEY = "uq_calibrators_key_version"

#: SQLite wants exactly ``INTEGER PRIMARY KEY`` for a rowid alias; PostgreSQL gets a bigint.
SEQ_TYPE = BigInteger().with_variant(Integer(), "sqlite")

scores = Table(
    "scores",
    metadata,
    Column("id", Text, primary_key=True),
    Column("created_at", Float, nullable=False),
    Column("model", Text, nullable=False),
    Column("method", Text, nullable=False),
    Column("mode", Text, nullable=False),
    Column("answer_index", Integer, nullable=False),
    Column("confidence", Float, nullable=False),
    Column("uncertainty", Float, nullable=False),
    Column("n_options", Integer, nullable=False),
    Column("question", Text),
    Column("options", Text),  # JSON list, only with UFCAL_LOG_TEXT
    Column("raw_confidence", Float),  # before a fitted calibrator (issue 10)
    Column("calibrator_version", Integer),
    # multiple_choice | free_form; rows from before revision 0002 are multiple_choice
    Column("task", Text, nullable=False, server_default="multiple_choice"),
)

feedback = Table(
    "feedback",
    metadata,
    # The arrival order of labels: the live window is the last ``window`` of them.
    Column("seq", SEQ_TYPE, primary_key=True, autoincrement=True),
    Column("id", Text, ForeignKey("scores.id"), nullable=False, unique=True),
    Column("correct", Boolean, nullable=False),
    Column("gold_index", Integer),
    Column("received_at", Float, nullable=False),
    Column("source", Text),  # a hash of the API key that sent it
    # The judged score's task, copied so that each task's live window is one index range.
    Column("task", Text, nullable=False, server_default="multiple_choice"),
    Index("ix_feedback_task_seq", "task", "seq"),
    sqlite_autoincrement=True,
)

calibrators = Table(
    "calibrators",
    metadata,
    Column("id", SEQ_TYPE, primary_key=True, autoincrement=True),
    Column("model", Text, nullable=False),
    Column("method", Text, nullable=False),
    Column("mode", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("kind", Text, nullable=False),
    Column("params", Text, nullable=False),  # JSON
    Column("labels", Integer, nullable=False),
    Column("positives", Integer, nullable=False),
    Column("negatives", Integer, nullable=False),
    Column("window_json", Text),
    Column("metrics_json", Text),
    Column("fitted_at", Float, nullable=False),
    Column("status", Text, nullable=False),  # active | retired | rejected
    Column("task", Text, nullable=False, server_default="multiple_choice"),
    UniqueConstraint("model", "method", "mode", "task", "version", name=CALIBRATOR_VERSION_KEY),
)
