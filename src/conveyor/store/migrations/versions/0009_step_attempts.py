"""Durable retry backoff: the attempt state of the step at the cursor, on the execution.

* ``executions.step_attempt`` (NOT NULL, default 0): tries of the step at the cursor
  (``next_step``) already made. Non-zero only while the execution waits (``waiting``) on a
  timer for that step's next try; every step write resets it.
* ``executions.step_errors`` (JSON, nullable): those tries' errors (``[{"attempt": n, ...}]``),
  restored when the step runs again so its final step run lists every attempt.
* ``executions.step_started_at`` (nullable): when the step's first try started (its step run's
  ``started_at``).

The retry's timer is an ordinary ``timers`` row for the step's ``seq``: a later wait of the
same step reuses that row (new id, due time, ``pending``), so ``UNIQUE (execution_id, seq)``
stays as it is.

Expand-only: the previous release ignores the columns (an execution it resumes from a retry
wait starts the step's tries again). Adding columns is a catalogue change on PostgreSQL and
SQLite (a constant default is not a table rewrite): no batch copy.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from conveyor.store._types import JSONType, UTCDateTime

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "executions",
        sa.Column("step_attempt", sa.Integer(), nullable=False, server_default=sa.text("0")),
    )
    op.add_column("executions", sa.Column("step_errors", JSONType, nullable=True))
    op.add_column("executions", sa.Column("step_started_at", UTCDateTime(), nullable=True))


def downgrade() -> None:
    # Plain ALTER TABLE ... DROP COLUMN (SQLite >= 3.35), never a batch copy.
    op.drop_column("executions", "step_started_at")
    op.drop_column("executions", "step_errors")
    op.drop_column("executions", "step_attempt")
