"""Parallel work: the child executions of ``parallel`` and ``foreach`` steps.

* ``executions.branch`` (nullable): which step list of its workflow version a child runs —
  ``None`` for a top-level execution or a sub-workflow (the whole workflow); for a branch of a
  ``parallel`` step ``"<step id>.<branch index>"``, for an item of a ``foreach`` step
  ``"<step id>"``; nested lists are joined with ``/`` (``"fan.0/each"``).
* ``executions.parent_index`` (nullable): the branch's or the item's index in the parent's
  step (results are collected in this order).

The children are created exactly once per (parent step run, index): their idempotency key is
derived from the parent's id, the step's seq and the index (``UNIQUE (tenant_id,
idempotency_key)`` already exists), and they are found by ``ix_executions_parent``.

Expand-only: the previous release ignores the columns (and knows no parallel step).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("executions", sa.Column("branch", sa.String(512), nullable=True))
    op.add_column("executions", sa.Column("parent_index", sa.Integer(), nullable=True))


def downgrade() -> None:
    op.drop_column("executions", "parent_index")
    op.drop_column("executions", "branch")
