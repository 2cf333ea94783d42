"""Schedule ticks record their outcome; ticks are materialised ahead by fire time.

* ``schedule_ticks.outcome`` (not null, default ``'fired'``): what became of the tick —
  ``fired`` (an execution was created), ``collapsed`` (a missed tick folded into a later one by
  the ``fire_once`` misfire policy), ``skipped`` (missed, policy ``skip``), ``cancelled`` (the
  schedule was edited, disabled or deleted after the tick was materialised ahead and before
  its instant), ``disabled`` (the workflow was disabled or deleted). Existing ticks are
  ``fired``.
* ``ix_schedule_ticks_fire_time``: the scheduler's look-up of materialised ticks by instant
  (a new leader re-stages what the previous one recorded but may not have enqueued).

Expand-only: the previous release ignores the column (its inserts get the default).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "schedule_ticks",
        sa.Column("outcome", sa.String(16), nullable=False, server_default=sa.text("'fired'")),
    )
    op.create_index("ix_schedule_ticks_fire_time", "schedule_ticks", ["fire_time"])


def downgrade() -> None:
    op.drop_index("ix_schedule_ticks_fire_time", table_name="schedule_ticks")
    # A plain ALTER TABLE ... DROP COLUMN (SQLite >= 3.35), never a batch copy.
    op.drop_column("schedule_ticks", "outcome")
