"""Indexes for the operations console's search of executions across tenants.

* ``ix_executions_created`` (created_at, id): every execution, newest first, and the last
  hour's activity (an index range on ``created_at``).
* ``ix_executions_status_created`` (status, created_at, id): executions of one status, newest
  first.

Per-tenant searches keep using the per-tenant indexes. Expand-only: the previous release
ignores them.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_executions_created", "executions", ["created_at", "id"])
    op.create_index("ix_executions_status_created", "executions", ["status", "created_at", "id"])


def downgrade() -> None:
    op.drop_index("ix_executions_status_created", table_name="executions")
    op.drop_index("ix_executions_created", table_name="executions")
