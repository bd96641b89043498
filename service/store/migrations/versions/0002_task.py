"""The task of a score and of a calibrator: multiple_choice or free_form.

Existing rows were all scored with options, so they become ``multiple_choice`` (the
column's server default) and an old database upgrades in place. A feedback row carries its
score's task too, indexed with its arrival order, so that each task's live window is read
as one index range. A calibrator's versions are numbered per (model, method, mode, task):
the unique constraint gains the task.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_KEY_VERSION = "uq_calibrators_key_version"
_OLD_KEY_COLUMNS = ["model", "method", "mode", "version"]
#: How batch mode names 0001's unnamed constraint when it rebuilds a SQLite table.
_NAMING = {"uq": "uq_%(table_name)s_%(column_0_N_name)s"}


def _task_column() -> sa.Column[str]:
    return sa.Column("task", sa.Text, nullable=False, server_default="multiple_choice")


def _old_key_constraint() -> str:
    """The name of 0001's unique (model, method, mode, version): PostgreSQL's own name for
    it, or the one ``_NAMING`` gives it on SQLite (where it has none)."""
    for unique in sa.inspect(op.get_bind()).get_unique_constraints("calibrators"):
        if list(unique["column_names"]) == _OLD_KEY_COLUMNS and unique.get("name"):
            return str(unique["name"])
    return "uq_calibrators_model_method_mode_version"


def upgrade() -> None:
    op.add_column("scores", _task_column())
    op.add_column("feedback", _task_column())
    op.create_index("ix_feedback_task_seq", "feedback", ["task", "seq"])
    old_key = _old_key_constraint()
    with op.batch_alter_table("calibrators", naming_convention=_NAMING) as batch:
        batch.add_column(_task_column())
        batch.drop_constraint(old_key, type_="unique")
        batch.create_unique_constraint(_KEY_VERSION, ["model", "method", "mode", "task", "version"])


def downgrade() -> None:
    with op.batch_alter_table("calibrators", naming_convention=_NAMING) as batch:
        batch.drop_constraint(_KEY_VERSION, type_="unique")
        batch.drop_column("task")
        batch.create_unique_constraint("uq_calibrators_model_method_mode_version", _OLD_KEY_COLUMNS)
    op.drop_index("ix_feedback_task_seq", table_name="feedback")
    op.drop_column("feedback", "task")
    op.drop_column("scores", "task")
