"""Step runs without a foreign key to ``executions``.

Every step run is written by a statement that has just updated (and so locked) its
execution's row: the engine's fenced write inserts the step runs of the rows its ``UPDATE``
returned (``conveyor.store.pg.runs``, ``conveyor.store.sql.runs``), and a retry copies the
original's step runs in the transaction that inserts the new execution. A step run is deleted
before its execution, in the same transaction (retention's batches) or partition (a day's
``step_runs`` partition is dropped before the ``executions`` one). The key therefore never
refused anything, but on PostgreSQL it cost a referential-integrity query per inserted row
against the partitioned ``executions`` — more than the insert itself: ~0.1 ms of database CPU
per step run on this project's benchmark machine, the largest share of a run of pure steps
(see docs/benchmarks.md). Its ``ON DELETE CASCADE`` was never relied on.

Compatible with the previous release (which deletes step runs itself too). Downgrade deletes
step runs whose execution is gone (none, unless rows were deleted by hand) and adds the key
back.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FK = "fk_step_runs_execution_id_executions"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"ALTER TABLE step_runs DROP CONSTRAINT IF EXISTS {FK}")
        return
    with op.batch_alter_table("step_runs") as batch:  # SQLite: the table is rebuilt
        batch.drop_constraint(FK, type_="foreignkey")


def downgrade() -> None:
    op.execute(
        sa.text(
            "DELETE FROM step_runs WHERE NOT EXISTS "
            "(SELECT 1 FROM executions e WHERE e.id = step_runs.execution_id)"
        )
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(
            f"ALTER TABLE step_runs ADD CONSTRAINT {FK} FOREIGN KEY (execution_id) "
            "REFERENCES executions (id) ON DELETE CASCADE"
        )
        return
    with op.batch_alter_table("step_runs") as batch:
        batch.create_foreign_key(FK, "executions", ["execution_id"], ["id"], ondelete="CASCADE")
