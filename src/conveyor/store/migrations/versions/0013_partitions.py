"""PostgreSQL: executions and step runs partitioned by day (``conveyor.store.partitions``).

* ``execution_keys (tenant_id, idempotency_key) PRIMARY KEY, execution_id``: the idempotency
  keys. A unique index of a partitioned table must contain the partition key, so ``UNIQUE
  (tenant_id, idempotency_key)`` moves here; a ``BEFORE INSERT`` trigger on ``executions``
  claims the key (an insert whose key is taken is skipped: what ``ON CONFLICT DO NOTHING``
  did) and an ``AFTER DELETE`` trigger releases it. Created on SQLite too, where it stays
  empty (SQLite keeps its unique index).
* ``executions`` becomes ``PARTITION BY RANGE (id)`` and ``step_runs`` ``PARTITION BY RANGE
  (execution_id)``, with one partition per UTC day of ids (``executions_pYYYYMMDD``,
  ``step_runs_pYYYYMMDD``, same bounds), a ``DEFAULT`` partition each, and the days from
  today to 3 days ahead. The primary keys, indexes (per partition; ``uq_executions_idempotency``
  is no longer unique on PostgreSQL) and foreign keys (timers, events, event waits and step
  runs → executions) are the same as before.

In place: the tables are renamed, the partitioned ones created with their partitions (every
day that has an execution), every row copied, the old tables dropped. The migration runs in
one transaction, and copying holds both tables for as long as it takes (22 s for 200,000
executions with 400,000 step runs on a shared 2-core machine): plan a maintenance window, or
prune first (``conveyor prune``). Not compatible with the previous release (its trigger
statements use ``ON CONFLICT`` on the former unique index): stop it before migrating. SQLite: only the empty
``execution_keys``. Downgrade turns the tables back into plain ones (every row kept).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, date, datetime, timedelta

import sqlalchemy as sa
from alembic import op
from sqlalchemy.engine import Connection

from conveyor.store.partitions import day_bound, partition_name

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DAYS_AHEAD = 3
ACTIVE = "status IN ('queued', 'running', 'waiting')"
# (name, columns, WHERE) of the executions indexes as of 0012 (uq_executions_idempotency is
# unique only on a plain table)
_EXECUTION_INDEXES = [
    ("uq_executions_idempotency", "tenant_id, idempotency_key", "idempotency_key IS NOT NULL"),
    ("ix_executions_tenant_created", "tenant_id, created_at, id", None),
    ("ix_executions_tenant_status_created", "tenant_id, status, created_at, id", None),
    ("ix_executions_tenant_workflow_created", "tenant_id, workflow_id, created_at, id", None),
    ("ix_executions_created", "created_at, id", None),
    ("ix_executions_status_created", "status, created_at, id", None),
    ("ix_executions_tenant_finished", "tenant_id, finished_at, id", "finished_at IS NOT NULL"),
    ("ix_executions_active", "status, queued_at", ACTIVE),
    ("ix_executions_parent", "parent_execution_id", "parent_execution_id IS NOT NULL"),
]
# (table, constraint) of the foreign keys to executions(id), all ON DELETE CASCADE
_REFERENCING = [
    ("timers", "fk_timers_execution_id_executions"),
    ("events", "fk_events_execution_id_executions"),
    ("event_waits", "fk_event_waits_execution_id_executions"),
]

_CLAIM = """
CREATE FUNCTION conveyor_claim_execution_key() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO execution_keys (tenant_id, idempotency_key, execution_id)
    VALUES (NEW.tenant_id, NEW.idempotency_key, NEW.id)
    ON CONFLICT (tenant_id, idempotency_key) DO NOTHING;
    IF FOUND THEN
        RETURN NEW;
    END IF;
    RETURN NULL;  -- the key is taken: the execution is not inserted
END $$
"""
_RELEASE = """
CREATE FUNCTION conveyor_release_execution_key() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM execution_keys
     WHERE tenant_id = OLD.tenant_id AND idempotency_key = OLD.idempotency_key
       AND execution_id = OLD.id;
    RETURN NULL;
END $$
"""
_TRIGGERS = [
    _CLAIM,
    "CREATE TRIGGER executions_claim_key BEFORE INSERT ON executions FOR EACH ROW "
    "WHEN (NEW.idempotency_key IS NOT NULL) EXECUTE FUNCTION conveyor_claim_execution_key()",
    _RELEASE,
    "CREATE TRIGGER executions_release_key AFTER DELETE ON executions FOR EACH ROW "
    "WHEN (OLD.idempotency_key IS NOT NULL) EXECUTE FUNCTION conveyor_release_execution_key()",
]
_DROP_TRIGGERS = [
    "DROP TRIGGER executions_claim_key ON executions",
    "DROP TRIGGER executions_release_key ON executions",
    "DROP FUNCTION conveyor_claim_execution_key()",
    "DROP FUNCTION conveyor_release_execution_key()",
]


def upgrade() -> None:
    op.create_table(
        "execution_keys",
        sa.Column("tenant_id", sa.String(32), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=False),
        sa.Column("execution_id", sa.String(32), nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "idempotency_key", name="pk_execution_keys"),
    )
    op.create_index("ix_execution_keys_execution_id", "execution_keys", ["execution_id"])
    conn = op.get_bind()
    if conn.dialect.name != "postgresql":
        return
    _rebuild(conn, partitioned=True)
    conn.execute(
        sa.text(
            "INSERT INTO execution_keys (tenant_id, idempotency_key, execution_id) "
            "SELECT tenant_id, idempotency_key, id FROM executions "
            "WHERE idempotency_key IS NOT NULL"
        )
    )
    for statement in _TRIGGERS:
        conn.execute(sa.text(statement))


def downgrade() -> None:
    conn = op.get_bind()
    if conn.dialect.name == "postgresql":
        for statement in _DROP_TRIGGERS:
            conn.execute(sa.text(statement))
        _rebuild(conn, partitioned=False)
    op.drop_index("ix_execution_keys_execution_id", table_name="execution_keys")
    op.drop_table("execution_keys")


def _rebuild(conn: Connection, *, partitioned: bool) -> None:
    """Replace ``executions`` and ``step_runs`` by partitioned (or plain) tables with the same
    columns, indexes, keys and rows."""

    def run(sql: str) -> None:
        conn.execute(sa.text(sql))

    run("ALTER TABLE step_runs DROP CONSTRAINT fk_step_runs_execution_id_executions")
    for table, fk in _REFERENCING:
        run(f"ALTER TABLE {table} DROP CONSTRAINT {fk}")
    for table in ("executions", "step_runs"):
        run(f"ALTER TABLE {table} RENAME TO {table}_old")
        indexes = conn.execute(
            sa.text("SELECT indexname FROM pg_indexes WHERE tablename = :t"), {"t": f"{table}_old"}
        ).scalars()
        for index in list(indexes):
            run(f"ALTER INDEX {index} RENAME TO {index[:59]}_old")
        by = {"executions": " PARTITION BY RANGE (id)", "step_runs": " PARTITION BY RANGE "
              "(execution_id)"}[table] if partitioned else ""  # fmt: skip
        run(
            f"CREATE TABLE {table} (LIKE {table}_old INCLUDING DEFAULTS INCLUDING CONSTRAINTS "
            f"INCLUDING STORAGE){by}"
        )
    if partitioned:
        for day in _days(conn):
            lower, upper = day_bound(day), day_bound(day + timedelta(days=1))
            for table in ("executions", "step_runs"):
                run(
                    f"CREATE TABLE {partition_name(table, day)} PARTITION OF {table} "
                    f"FOR VALUES FROM ('{lower}') TO ('{upper}')"
                )
        run("CREATE TABLE executions_default PARTITION OF executions DEFAULT")
        run("CREATE TABLE step_runs_default PARTITION OF step_runs DEFAULT")
    for table in ("executions", "step_runs"):
        columns = ", ".join(
            conn.execute(
                sa.text(
                    "SELECT column_name FROM information_schema.columns "
                    "WHERE table_schema = current_schema() AND table_name = :t "
                    "ORDER BY ordinal_position"
                ),
                {"t": f"{table}_old"},
            ).scalars()
        )
        run(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {table}_old")
    run("ALTER TABLE executions ADD CONSTRAINT pk_executions PRIMARY KEY (id)")
    for name, columns, where in _EXECUTION_INDEXES:
        unique = "UNIQUE " if name.startswith("uq_") and not partitioned else ""
        run(
            f"CREATE {unique}INDEX {name} ON executions ({columns})"
            + (f" WHERE {where}" if where else "")
        )
    run(
        "ALTER TABLE executions ADD CONSTRAINT fk_executions_tenant_id_tenants "
        "FOREIGN KEY (tenant_id) REFERENCES tenants (id) ON DELETE CASCADE"
    )
    run(
        "ALTER TABLE executions ADD CONSTRAINT fk_executions_workflow_id_workflows "
        "FOREIGN KEY (workflow_id) REFERENCES workflows (id) ON DELETE CASCADE"
    )
    run("ALTER TABLE step_runs ADD CONSTRAINT pk_step_runs PRIMARY KEY (execution_id, seq)")
    run("DROP TABLE step_runs_old")
    run("DROP TABLE executions_old")
    for table, fk in [*_REFERENCING, ("step_runs", "fk_step_runs_execution_id_executions")]:
        run(
            f"ALTER TABLE {table} ADD CONSTRAINT {fk} FOREIGN KEY (execution_id) "
            "REFERENCES executions (id) ON DELETE CASCADE"
        )


def _days(conn: Connection) -> list[date]:
    """Every UTC day that has an execution (ids of 32 hex digits), and today to
    ``DAYS_AHEAD`` days ahead."""
    found = conn.execute(
        sa.text(
            "SELECT DISTINCT ('x' || lpad(substr(id, 1, 12), 16, '0'))::bit(64)::bigint "
            "/ 86400000 FROM executions_old WHERE id ~ '^[0-9a-f]{32}$'"
        )
    ).scalars()
    days = {date(1970, 1, 1) + timedelta(days=int(n)) for n in found}
    today = datetime.now(UTC).date()
    days |= {today + timedelta(days=i) for i in range(DAYS_AHEAD + 1)}
    return sorted(days)
