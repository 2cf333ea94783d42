"""Retention: per-tenant overrides and the indexes pruning reads.

* ``tenants.retention_s`` (nullable): seconds this tenant's finished executions are kept;
  NULL: ``EXECUTION_RETENTION``.
* ``tenants.retention_max_executions`` (nullable): most finished executions this tenant keeps;
  NULL: ``EXECUTION_RETENTION_MAX_PER_TENANT``.
* ``ix_executions_tenant_finished (tenant_id, finished_at, id) WHERE finished_at IS NOT NULL``:
  a tenant's finished executions, oldest first (unfinished ones cost no entry).
* ``ix_schedule_ticks_execution_id``: the tick of a pruned execution is deleted with it.

Expand-only: the previous release ignores the columns and the indexes. Like every migration it
runs in one transaction, so building the executions index holds writes to ``executions`` for
as long as the build takes (seconds per million rows). On a large PostgreSQL table, build it
first without that lock — ``CREATE INDEX CONCURRENTLY ix_executions_tenant_finished ON
executions (tenant_id, finished_at, id) WHERE finished_at IS NOT NULL`` — the migration then
skips it (``IF NOT EXISTS``); the same for ``ix_schedule_ticks_execution_id``.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_FINISHED = "finished_at IS NOT NULL"


def upgrade() -> None:
    op.add_column("tenants", sa.Column("retention_s", sa.Integer(), nullable=True))
    op.add_column("tenants", sa.Column("retention_max_executions", sa.Integer(), nullable=True))
    op.create_index(
        "ix_executions_tenant_finished",
        "executions",
        ["tenant_id", "finished_at", "id"],
        postgresql_where=sa.text(_FINISHED),
        sqlite_where=sa.text(_FINISHED),
        if_not_exists=True,
    )
    op.create_index(
        "ix_schedule_ticks_execution_id", "schedule_ticks", ["execution_id"], if_not_exists=True
    )


def downgrade() -> None:
    op.drop_index("ix_schedule_ticks_execution_id", table_name="schedule_ticks")
    op.drop_index("ix_executions_tenant_finished", table_name="executions")
    # A plain ALTER TABLE ... DROP COLUMN (SQLite >= 3.35), never a batch copy.
    op.drop_column("tenants", "retention_max_executions")
    op.drop_column("tenants", "retention_s")
