"""Indexes for the operations console's search of executions across tenants.

* ``ix_executions_created`` (created_at, id): every execution, newest first, and the last
  hour's activity (an index range on ``created_at``).
* ``ix_executions_status_created`` (status, created_at, id): executions of one status, newest
  first.

Per-tenant searches keep using the per-tenant indexes. Expand-only: the previous release
ignores them. Building them blocks writes to ``executions`` for as long as it takes (seconds
per million rows); on a large table create them first with ``CREATE INDEX CONCURRENTLY``
(docs/operations.md, "Upgrades and migrations"): this migration then keeps them
(``IF NOT EXISTS``).

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


INDEXES = {
    "ix_executions_created": ["created_at", "id"],
    "ix_executions_status_created": ["status", "created_at", "id"],
}


def upgrade() -> None:
    for name, columns in INDEXES.items():
        op.create_index(name, "executions", columns, if_not_exists=True)


def downgrade() -> None:
    for name in reversed(INDEXES):
        op.drop_index(name, table_name="executions")
