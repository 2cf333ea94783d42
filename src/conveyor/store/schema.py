"""The tables. Alembic migrations (``conveyor/store/migrations``) create exactly this schema;
``tests/store/test_migrations.py`` checks that they agree.

Every row that belongs to a tenant carries ``tenant_id``, and every service query that reads
tenant data filters on it in SQL. Indexes serve the hot queries:

* executions: list per tenant (newest first, optionally by status or workflow), the
  operators' search across tenants (newest first, optionally by status), idempotency
  (``UNIQUE (tenant_id, idempotency_key)``), the reconciler's scan of active executions;
* timers: pending timers by due time (partial index);
* schedules: enabled schedules by next fire time (partial index);
* schedule ticks: ``PRIMARY KEY (schedule_id, fire_time)`` makes each tick fire once;
* retention (:mod:`conveyor.store.retention`): a tenant's finished executions oldest first
  (partial, finished only) and a tick by its execution.

PostgreSQL (migration 0013, :mod:`conveyor.store.partitions`): ``executions`` and
``step_runs`` are partitioned by day of the execution id (``PARTITION BY RANGE``); their
partitions are not declared here. ``uq_executions_idempotency`` is then a plain index of
each partition, and ``execution_keys`` (filled by a trigger) keeps keys unique.
"""

from __future__ import annotations

from sqlalchemy import (
    Boolean,
    Column,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

from conveyor.store._types import JSONType, UTCDateTime

__all__ = [
    "ACTIVE_STATUSES",
    "EXECUTION_STATUSES",
    "TERMINAL_STATUSES",
    "api_keys",
    "event_waits",
    "events",
    "execution_keys",
    "executions",
    "metadata",
    "schedule_ticks",
    "schedules",
    "secrets",
    "step_runs",
    "tenant_limits",
    "tenants",
    "timers",
    "workflow_versions",
    "workflows",
]

EXECUTION_STATUSES = ("queued", "running", "waiting", "succeeded", "failed", "cancelled")
ACTIVE_STATUSES = ("queued", "running", "waiting")
TERMINAL_STATUSES = ("succeeded", "failed", "cancelled")

ID = String(32)

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

tenants = Table(
    "tenants",
    metadata,
    Column("id", ID, primary_key=True),
    Column("name", String(200), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    # Per-tenant retention overrides (migration 0005); NULL: the settings apply.
    Column("retention_s", Integer, nullable=True),
    Column("retention_max_executions", Integer, nullable=True),
)

# Per-tenant execution limits (migration 0008): one row per tenant that overrides a setting;
# a NULL column (or no row): EXECUTION_TENANT_CONCURRENCY / _START_RATE / _START_BURST apply.
tenant_limits = Table(
    "tenant_limits",
    metadata,
    Column("tenant_id", ID, ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True),
    Column("concurrency", Integer, nullable=True),
    Column("start_rate", Float, nullable=True),
    Column("start_burst", Integer, nullable=True),
    Column("updated_at", UTCDateTime, nullable=False),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", ID, primary_key=True),
    Column("tenant_id", ID, ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(200), nullable=False),
    Column("prefix", String(24), nullable=False, unique=True),
    Column("key_hash", String(64), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("revoked_at", UTCDateTime, nullable=True),
    Index("ix_api_keys_tenant_id", "tenant_id"),
)

# Tenants' named secrets (migration 0007), encrypted with SECRETS_KEY (conveyor.store.secrets):
# ``ciphertext`` is base64 of nonce + AEAD ciphertext, ``key_id`` names the key that made it.
secrets = Table(
    "secrets",
    metadata,
    Column("id", ID, primary_key=True),
    Column("tenant_id", ID, ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(64), nullable=False),
    Column("ciphertext", Text, nullable=False),
    Column("key_id", String(16), nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    UniqueConstraint("tenant_id", "name", name="uq_secrets_tenant_name"),
)

workflows = Table(
    "workflows",
    metadata,
    Column("id", ID, primary_key=True),
    Column("tenant_id", ID, ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(200), nullable=False),
    Column("region", String(32), nullable=False),
    Column("current_version", Integer, nullable=False),
    Column("enabled", Boolean, nullable=False, server_default=text("true")),
    Column("webhook_secret_hash", String(64), nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Column("deleted_at", UTCDateTime, nullable=True),
    Index("ix_workflows_tenant_created", "tenant_id", "created_at", "id"),
)

workflow_versions = Table(
    "workflow_versions",
    metadata,
    Column(
        "workflow_id",
        ID,
        ForeignKey("workflows.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("version", Integer, primary_key=True),
    Column("tenant_id", ID, nullable=False),
    Column("definition", JSONType, nullable=False),
    Column("created_at", UTCDateTime, nullable=False),
)

executions = Table(
    "executions",
    metadata,
    Column("id", ID, primary_key=True),
    Column("tenant_id", ID, ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("workflow_id", ID, ForeignKey("workflows.id", ondelete="CASCADE"), nullable=False),
    Column("workflow_version", Integer, nullable=False),
    Column("status", String(16), nullable=False),
    Column("region", String(32), nullable=False),
    Column("triggered_by", String(16), nullable=False),
    Column("input", JSONType, nullable=True),
    Column("output", JSONType, nullable=True),
    Column("error", JSONType, nullable=True),
    Column("next_step", Integer, nullable=False, server_default=text("0")),
    Column("steps_run", Integer, nullable=False, server_default=text("0")),
    Column("lease", Integer, nullable=False, server_default=text("0")),
    Column("lease_expires_at", UTCDateTime, nullable=True),
    Column("attempts", Integer, nullable=False, server_default=text("0")),
    Column("wake_at", UTCDateTime, nullable=True),
    Column("idempotency_key", String(255), nullable=True),
    Column("schedule_id", ID, nullable=True),
    Column("retry_of", ID, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("queued_at", UTCDateTime, nullable=False),
    Column("enqueued_at", UTCDateTime, nullable=True),
    Column("started_at", UTCDateTime, nullable=True),
    Column("finished_at", UTCDateTime, nullable=True),
    Column("updated_at", UTCDateTime, nullable=False),
    # The tick instant of an execution created by a schedule (migration 0002).
    Column("scheduled_for", UTCDateTime, nullable=True),
    # Durable retry backoff (migration 0009): tries of the step at the cursor already made,
    # their errors and when the first started — set while the execution waits for the next try.
    Column("step_attempt", Integer, nullable=False, server_default=text("0")),
    Column("step_errors", JSONType, nullable=True),
    Column("step_started_at", UTCDateTime, nullable=True),
    # Sub-workflows (migration 0011): the parent execution whose ``workflow`` step created this
    # one, that step run's seq, and the nesting depth (0 at the top).
    Column("parent_execution_id", ID, nullable=True),
    Column("parent_seq", Integer, nullable=True),
    Column("depth", Integer, nullable=False, server_default=text("0")),
    # Parallel work (migration 0012): the step list a ``parallel`` branch or ``foreach`` item
    # runs (``None``: the whole workflow) and its index in the parent's step.
    Column("branch", String(512), nullable=True),
    Column("parent_index", Integer, nullable=True),
    # Partial: executions without a key (most) cost no entry in this index. Unique on SQLite;
    # on PostgreSQL (partitioned) a plain index, and execution_keys keeps keys unique.
    Index(
        "uq_executions_idempotency",
        "tenant_id",
        "idempotency_key",
        unique=True,
        postgresql_where=text("idempotency_key IS NOT NULL"),
        sqlite_where=text("idempotency_key IS NOT NULL"),
    ),
    Index("ix_executions_tenant_created", "tenant_id", "created_at", "id"),
    Index("ix_executions_tenant_status_created", "tenant_id", "status", "created_at", "id"),
    Index("ix_executions_tenant_workflow_created", "tenant_id", "workflow_id", "created_at", "id"),
    # The console's search across tenants, newest first, optionally by status (migration 0004).
    Index("ix_executions_created", "created_at", "id"),
    Index("ix_executions_status_created", "status", "created_at", "id"),
    # Retention (migration 0005): a tenant's finished executions, oldest first.
    Index(
        "ix_executions_tenant_finished",
        "tenant_id",
        "finished_at",
        "id",
        postgresql_where=text("finished_at IS NOT NULL"),
        sqlite_where=text("finished_at IS NOT NULL"),
    ),
    Index(
        "ix_executions_active",
        "status",
        "queued_at",
        postgresql_where=text("status IN ('queued', 'running', 'waiting')"),
        sqlite_where=text("status IN ('queued', 'running', 'waiting')"),
    ),
    Index(
        "ix_executions_parent",
        "parent_execution_id",
        postgresql_where=text("parent_execution_id IS NOT NULL"),
        sqlite_where=text("parent_execution_id IS NOT NULL"),
    ),
    postgresql_partition_by="RANGE (id)",
)

# The idempotency keys of executions on PostgreSQL (migration 0013): claimed by a BEFORE
# INSERT trigger on executions (an insert whose key is taken is skipped), released by an AFTER
# DELETE trigger and with a dropped partition. Empty on SQLite (its unique index suffices).
execution_keys = Table(
    "execution_keys",
    metadata,
    Column("tenant_id", ID, primary_key=True),
    Column("idempotency_key", String(255), primary_key=True),
    Column("execution_id", ID, nullable=False),
    Index("ix_execution_keys_execution_id", "execution_id"),
)

# No foreign key to executions (migration 0014): each step run is inserted by the statement
# that updated its execution's row, and deleted before it (retention, partition drops).
step_runs = Table(
    "step_runs",
    metadata,
    Column("execution_id", ID, primary_key=True),
    Column("seq", Integer, primary_key=True),
    Column("tenant_id", ID, nullable=False),
    Column("step_id", String(64), nullable=False),
    Column("step_type", String(16), nullable=False),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("input", JSONType, nullable=True),
    Column("output", JSONType, nullable=True),
    Column("output_truncated", Boolean, nullable=False, server_default=text("false")),
    Column("error", JSONType, nullable=True),
    Column("started_at", UTCDateTime, nullable=False),
    Column("finished_at", UTCDateTime, nullable=False),
    # A copy made by a retry from the failed step (migration 0006): the execution whose step
    # run with the same seq this one reuses; NULL for a step that ran.
    Column("reused_from", ID, nullable=True),
    postgresql_partition_by="RANGE (execution_id)",
)

timers = Table(
    "timers",
    metadata,
    Column("id", ID, primary_key=True),
    Column("tenant_id", ID, nullable=False),
    Column(
        "execution_id",
        ID,
        ForeignKey("executions.id", ondelete="CASCADE"),
        nullable=False,
    ),
    Column("workflow_id", ID, nullable=False),
    Column("region", String(32), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("due_at", UTCDateTime, nullable=False),
    Column("status", String(16), nullable=False),
    Column("claimed_by", String(128), nullable=True),
    Column("claimed_until", UTCDateTime, nullable=True),
    Column("fired_at", UTCDateTime, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    UniqueConstraint("execution_id", "seq", name="uq_timers_execution_seq"),
    Index(
        "ix_timers_pending_due",
        "due_at",
        postgresql_where=text("status = 'pending'"),
        sqlite_where=text("status = 'pending'"),
    ),
)

# Events for ``wait`` steps (migration 0010; conveyor.store.events). An event addressed to an
# execution has ``execution_id``; a webhook event kept for the first execution that waits on
# its (workflow, name, correlation) has none. ``consumed_at``/``consumed_by``/``consumed_seq``:
# the wait step run that received it (set in that step's fenced write, exactly once).
events = Table(
    "events",
    metadata,
    Column("id", ID, primary_key=True),
    Column("tenant_id", ID, ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("workflow_id", ID, ForeignKey("workflows.id", ondelete="CASCADE"), nullable=False),
    Column("execution_id", ID, ForeignKey("executions.id", ondelete="CASCADE"), nullable=True),
    Column("name", String(128), nullable=False),
    Column("correlation", String(512), nullable=True),
    Column("payload", JSONType, nullable=True),
    Column("source", String(16), nullable=False),
    Column("received_at", UTCDateTime, nullable=False),
    Column("consumed_at", UTCDateTime, nullable=True),
    Column("consumed_by", ID, nullable=True),
    Column("consumed_seq", Integer, nullable=True),
    # ``Idempotency-Key`` of the request that sent it: the same key (per tenant) → this event
    Column("idempotency_key", String(255), nullable=True),
    Index("ix_events_execution_name", "execution_id", "name", "received_at"),
    Index(
        "uq_events_idempotency",
        "tenant_id",
        "idempotency_key",
        unique=True,
        postgresql_where=text("idempotency_key IS NOT NULL"),
        sqlite_where=text("idempotency_key IS NOT NULL"),
    ),
    Index(
        "ix_events_correlation",
        "tenant_id",
        "workflow_id",
        "name",
        "correlation",
        "received_at",
    ),
)

# The wait step an execution is parked on (at most one per execution; migration 0010):
# what an arriving event is matched against, and the wait's deadline across wake-ups.
event_waits = Table(
    "event_waits",
    metadata,
    Column(
        "execution_id",
        ID,
        ForeignKey("executions.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("tenant_id", ID, nullable=False),
    Column("workflow_id", ID, nullable=False),
    Column("name", String(128), nullable=False),
    Column("correlation", String(512), nullable=True),
    Column("seq", Integer, nullable=False),
    Column("deadline", UTCDateTime, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Index("ix_event_waits_correlation", "tenant_id", "workflow_id", "name", "correlation"),
)

schedules = Table(
    "schedules",
    metadata,
    Column("id", ID, primary_key=True),
    Column("tenant_id", ID, ForeignKey("tenants.id", ondelete="CASCADE"), nullable=False),
    Column("workflow_id", ID, ForeignKey("workflows.id", ondelete="CASCADE"), nullable=False),
    Column("name", String(200), nullable=True),
    Column("cron", String(200), nullable=False),
    Column("timezone", String(64), nullable=False),
    Column("enabled", Boolean, nullable=False, server_default=text("true")),
    Column("input", JSONType, nullable=True),
    Column("misfire_policy", String(16), nullable=True),
    Column("next_fire_at", UTCDateTime, nullable=True),
    Column("last_fired_at", UTCDateTime, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Column("updated_at", UTCDateTime, nullable=False),
    Index("ix_schedules_tenant_created", "tenant_id", "created_at", "id"),
    Index(
        "ix_schedules_due",
        "next_fire_at",
        postgresql_where=text("enabled"),
        sqlite_where=text("enabled"),
    ),
)

schedule_ticks = Table(
    "schedule_ticks",
    metadata,
    Column(
        "schedule_id",
        ID,
        ForeignKey("schedules.id", ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("fire_time", UTCDateTime, primary_key=True),
    Column("tenant_id", ID, nullable=False),
    Column("execution_id", ID, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    # What became of the tick (migration 0003): fired, collapsed, skipped, cancelled, disabled.
    Column("outcome", String(16), nullable=False, server_default=text("'fired'")),
    Index("ix_schedule_ticks_fire_time", "fire_time"),
    # Retention (migration 0005): a pruned execution's tick goes with it.
    Index("ix_schedule_ticks_execution_id", "execution_id"),
)
