"""Resume from the failed step: ``step_runs.reused_from``.

* ``step_runs.reused_from`` (nullable): on an execution created by ``POST
  /api/executions/{id}/retry`` with ``{"from": "failed"}``, the steps before the failed one are
  not run again: their step runs are copied from the original execution with the same ``seq``,
  and ``reused_from`` is that execution's id — ``(reused_from, seq)`` is the step run the copy
  was made from. NULL for a step that ran.

Expand-only: the previous release ignores the column (and reads the copies as ordinary step
runs). Adding a nullable column without a default is a catalogue change on PostgreSQL and
SQLite: no table rewrite, existing rows are kept as they are.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("step_runs", sa.Column("reused_from", sa.String(32), nullable=True))


def downgrade() -> None:
    # A plain ALTER TABLE ... DROP COLUMN (SQLite >= 3.35), never a batch copy.
    op.drop_column("step_runs", "reused_from")
