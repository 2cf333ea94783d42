"""Per-tenant execution limits: the ``tenant_limits`` table.

One row per tenant that overrides a limit (``PUT /api/admin/tenants/{id}/limits``); a NULL
column, or no row, means the setting applies:

* ``concurrency``: executions of the tenant running at once across all workers
  (``EXECUTION_TENANT_CONCURRENCY``);
* ``start_rate``: executions started per second (``EXECUTION_TENANT_START_RATE``);
* ``start_burst``: starts allowed at once after an idle period (``EXECUTION_TENANT_START_BURST``).

Expand-only: a new table that the previous release ignores. Deleting a tenant deletes its row.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from conveyor.store._types import UTCDateTime

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "tenant_limits",
        sa.Column("tenant_id", sa.String(32), nullable=False),
        sa.Column("concurrency", sa.Integer(), nullable=True),
        sa.Column("start_rate", sa.Float(), nullable=True),
        sa.Column("start_burst", sa.Integer(), nullable=True),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name="fk_tenant_limits_tenant_id_tenants",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("tenant_id", name="pk_tenant_limits"),
    )


def downgrade() -> None:
    op.drop_table("tenant_limits")
