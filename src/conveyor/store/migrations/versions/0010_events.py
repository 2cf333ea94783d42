"""Events for ``wait`` steps.

* ``events (id, tenant_id → tenants, workflow_id → workflows, execution_id → executions
  (nullable), name, correlation, payload, source, received_at, consumed_at, consumed_by,
  consumed_seq, idempotency_key)``, all ``ON DELETE CASCADE``; indexes by (execution, name,
  received_at), by (tenant, workflow, name, correlation, received_at), and unique (tenant,
  idempotency_key) where a key was given.
* ``event_waits (execution_id → executions ON DELETE CASCADE, tenant_id, workflow_id, name,
  correlation, seq, deadline, created_at)``: the wait step an execution is parked on.

Expand-only: new tables the previous release ignores.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from conveyor.store._types import JSONType, UTCDateTime

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "events",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("tenant_id", sa.String(32), nullable=False),
        sa.Column("workflow_id", sa.String(32), nullable=False),
        sa.Column("execution_id", sa.String(32), nullable=True),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("correlation", sa.String(512), nullable=True),
        sa.Column("payload", JSONType, nullable=True),
        sa.Column("source", sa.String(16), nullable=False),
        sa.Column("received_at", UTCDateTime(), nullable=False),
        sa.Column("consumed_at", UTCDateTime(), nullable=True),
        sa.Column("consumed_by", sa.String(32), nullable=True),
        sa.Column("consumed_seq", sa.Integer(), nullable=True),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_events"),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name="fk_events_tenant_id_tenants", ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["workflow_id"],
            ["workflows.id"],
            name="fk_events_workflow_id_workflows",
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["execution_id"],
            ["executions.id"],
            name="fk_events_execution_id_executions",
            ondelete="CASCADE",
        ),
    )
    op.create_index("ix_events_execution_name", "events", ["execution_id", "name", "received_at"])
    op.create_index(
        "uq_events_idempotency",
        "events",
        ["tenant_id", "idempotency_key"],
        unique=True,
        postgresql_where=sa.text("idempotency_key IS NOT NULL"),
        sqlite_where=sa.text("idempotency_key IS NOT NULL"),
    )
    op.create_index(
        "ix_events_correlation",
        "events",
        ["tenant_id", "workflow_id", "name", "correlation", "received_at"],
    )
    op.create_table(
        "event_waits",
        sa.Column("execution_id", sa.String(32), nullable=False),
        sa.Column("tenant_id", sa.String(32), nullable=False),
        sa.Column("workflow_id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(128), nullable=False),
        sa.Column("correlation", sa.String(512), nullable=True),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("deadline", UTCDateTime(), nullable=True),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("execution_id", name="pk_event_waits"),
        sa.ForeignKeyConstraint(
            ["execution_id"],
            ["executions.id"],
            name="fk_event_waits_execution_id_executions",
            ondelete="CASCADE",
        ),
    )
    op.create_index(
        "ix_event_waits_correlation",
        "event_waits",
        ["tenant_id", "workflow_id", "name", "correlation"],
    )


def downgrade() -> None:
    op.drop_index("ix_event_waits_correlation", table_name="event_waits")
    op.drop_table("event_waits")
    op.drop_index("ix_events_correlation", table_name="events")
    op.drop_index("uq_events_idempotency", table_name="events")
    op.drop_index("ix_events_execution_name", table_name="events")
    op.drop_table("events")
