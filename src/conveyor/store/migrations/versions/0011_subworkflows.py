"""Sub-workflows: an execution started by a parent's ``workflow`` step knows its parent.

* ``executions.parent_execution_id`` (nullable): the execution whose ``workflow`` step created
  this one (``triggered_by = 'workflow'``); indexed, so cancelling a parent finds its children.
* ``executions.parent_seq`` (nullable): that step run's ``seq`` in the parent.
* ``executions.depth`` (NOT NULL, default 0): 0 for a top-level execution, the parent's + 1 for
  a child (bounded by ``WORKFLOW_MAX_DEPTH``).

The child is created exactly once per parent step run: its idempotency key is derived from the
parent's id and the step's seq (``UNIQUE (tenant_id, idempotency_key)`` already exists).

Expand-only: the previous release ignores the columns (and knows no ``workflow`` step).

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("executions", sa.Column("parent_execution_id", sa.String(32), nullable=True))
    op.add_column("executions", sa.Column("parent_seq", sa.Integer(), nullable=True))
    op.add_column(
        "executions",
        sa.Column("depth", sa.Integer(), nullable=False, server_default=sa.text("0")),
    )
    op.create_index(
        "ix_executions_parent",
        "executions",
        ["parent_execution_id"],
        postgresql_where=sa.text("parent_execution_id IS NOT NULL"),
        sqlite_where=sa.text("parent_execution_id IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_executions_parent", table_name="executions")
    op.drop_column("executions", "depth")
    op.drop_column("executions", "parent_seq")
    op.drop_column("executions", "parent_execution_id")
