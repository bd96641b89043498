"""Scores, feedback and fitted calibrators.

Also adopts a SQLite file written before the store had migrations (its ``scores`` and
``feedback`` tables exist, without the newer columns): missing tables are created and
missing columns added, existing rows kept.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _scores_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("method", sa.Text, nullable=False),
        sa.Column("mode", sa.Text, nullable=False),
        sa.Column("answer_index", sa.Integer, nullable=False),
        sa.Column("confidence", sa.Float, nullable=False),
        sa.Column("uncertainty", sa.Float, nullable=False),
        sa.Column("n_options", sa.Integer, nullable=False),
        sa.Column("question", sa.Text),
        sa.Column("options", sa.Text),
        sa.Column("raw_confidence", sa.Float),
        sa.Column("calibrator_version", sa.Integer),
    ]


def _feedback_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("seq", _SEQ, primary_key=True, autoincrement=True),
        sa.Column("id", sa.Text, sa.ForeignKey("scores.id"), nullable=False, unique=True),
        sa.Column("correct", sa.Boolean, nullable=False),
        sa.Column("gold_index", sa.Integer),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.Column("source", sa.Text),
    ]


def _calibrators_columns() -> list[sa.Column[object]]:
    return [
        sa.Column("id", _SEQ, primary_key=True, autoincrement=True),
        sa.Column("model", sa.Text, nullable=False),
        sa.Column("method", sa.Text, nullable=False),
        sa.Column("mode", sa.Text, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("kind", sa.Text, nullable=False),
        sa.Column("params", sa.Text, nullable=False),
        sa.Column("labels", sa.Integer, nullable=False),
        sa.Column("positives", sa.Integer, nullable=False),
        sa.Column("negatives", sa.Integer, nullable=False),
        sa.Column("window_json", sa.Text),
        sa.Column("metrics_json", sa.Text),
        sa.Column("fitted_at", sa.Float, nullable=False),
        sa.Column("status", sa.Text, nullable=False),
    ]


def _create_or_complete(name: str, columns: list[sa.Column[object]], **kwargs: object) -> None:
    inspector = sa.inspect(op.get_bind())
    if not inspector.has_table(name):
        op.create_table(name, *columns, **kwargs)  # type: ignore[arg-type]
        return
    present = {c["name"] for c in inspector.get_columns(name)}
    for column in columns:
        if column.name not in present:
            op.add_column(name, column)


def upgrade() -> None:
    _create_or_complete("scores", _scores_columns())
    _create_or_complete("feedback", _feedback_columns(), sqlite_autoincrement=True)
    if not sa.inspect(op.get_bind()).has_table("calibrators"):
        op.create_table(
            "calibrators",
            *_calibrators_columns(),
            sa.UniqueConstraint("model", "method", "mode", "version"),
        )


def downgrade() -> None:
    op.drop_table("calibrators")
    op.drop_table("feedback")
    op.drop_table("scores")
