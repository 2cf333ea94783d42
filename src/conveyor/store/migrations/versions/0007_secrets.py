"""Secrets: tenants' named secrets, encrypted at rest (``SECRETS_KEY``).

* ``secrets (id, tenant_id → tenants ON DELETE CASCADE, name, ciphertext, key_id, created_at,
  updated_at)`` with ``UNIQUE (tenant_id, name)``. ``ciphertext`` is base64 of a 12-byte nonce
  and the AES-256-GCM ciphertext (the tenant id and name are its associated data); ``key_id``
  names the key that encrypted it (``conveyor secrets reencrypt`` moves rows to the first key).

Expand-only: a new table the previous release ignores.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from conveyor.store._types import UTCDateTime

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "secrets",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("tenant_id", sa.String(32), nullable=False),
        sa.Column("name", sa.String(64), nullable=False),
        sa.Column("ciphertext", sa.Text(), nullable=False),
        sa.Column("key_id", sa.String(16), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("updated_at", UTCDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_secrets"),
        sa.ForeignKeyConstraint(
            ["tenant_id"], ["tenants.id"], name="fk_secrets_tenant_id_tenants", ondelete="CASCADE"
        ),
        sa.UniqueConstraint("tenant_id", "name", name="uq_secrets_tenant_name"),
    )


def downgrade() -> None:
    op.drop_table("secrets")
