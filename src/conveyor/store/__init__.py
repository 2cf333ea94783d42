"""Conveyor's persistence layer: the database is the source of truth.

``async with Store(settings) as store:`` opens the engine (``DATABASE_URL``: Postgres via
asyncpg, or SQLite via aiosqlite) and exposes the services::

    store.tenants       create / get / list tenants
    store.api_keys      issue / list / revoke / verify API keys (hashed at rest)
    store.workflows     create / update (new version) / get / list / enable-disable / delete,
                        webhook secrets, cached parsed versions
    store.executions    create (idempotency keys) / get (+ step runs) / list (filters, cursor
                        pagination) / cancel / retry; reconciler queries
    store.schedules     CRUD, due schedules, exactly-once ticks
    store.timers        claim / mark fired / release timers (timer dispatcher)
    store.insights      operators' cross-tenant reads (the console): execution search,
                        activity of the last hour, next due timers, workflow versions
    store.retention     per-tenant retention overrides; pruning finished executions in batches
    store.limits        per-tenant execution limits (concurrency, start rate) overrides
    store.storage       rows, bytes and the oldest row per table
    store.secrets       tenants' named secrets, encrypted with SECRETS_KEY (values never listed)
    store.runs          the engine's hot path (claim with a lease, fenced step writes):
                        the :class:`RunStore` contract in :mod:`conveyor.store.runs`

The drivers are chosen once when the store opens: SQLAlchemy Core everywhere
(:mod:`conveyor.store.sql`), and on Postgres the hot paths on a raw asyncpg pool
(:mod:`conveyor.store.pg`).

Every tenant-data query takes ``tenant_id`` and filters on it in SQL; another tenant's object
is :class:`~conveyor.errors.NotFound`. ``conveyor migrate`` applies the Alembic migrations
shipped in ``conveyor/store/migrations``; ``await store.check_schema()`` raises
:class:`~conveyor.errors.SchemaOutOfDate` otherwise.
"""

from conveyor.store._db import asyncpg_dsn, sqlalchemy_url, sqlite_path
from conveyor.store._errors import ASYNCPG_CONNECTION_ERRORS
from conveyor.store._migrate import head_revisions
from conveyor.store._store import Store, migrate
from conveyor.store._types import (
    dumps,
    has_nul,
    new_id,
    storable_text,
    utcnow,
    without_nul,
    without_surrogates,
)
from conveyor.store.events import Event, EventWait, Sent
from conveyor.store.executions import RetryFrom
from conveyor.store.insights import Activity, ExecutionFilter, VersionInfo
from conveyor.store.limits import TenantLimits
from conveyor.store.partitions import DAYS_AHEAD, DroppedPartition, Partition
from conveyor.store.records import (
    ApiKey,
    Execution,
    FiredTick,
    IssuedApiKey,
    Page,
    Schedule,
    ScheduleTick,
    StepRun,
    Tenant,
    Timer,
    Workflow,
    WorkflowVersion,
)
from conveyor.store.retention import Cutoff, Pruned, RetentionOverride, RetentionPolicy
from conveyor.store.runs import Claim, ExecutionWrite, RunStore, StepWrite, TimerWrite, Unclaimed
from conveyor.store.schedules import (
    MISFIRE_POLICIES,
    PlannedTicks,
    next_fire_time,
    validate_schedule,
)
from conveyor.store.schema import ACTIVE_STATUSES, EXECUTION_STATUSES, TERMINAL_STATUSES
from conveyor.store.secrets import (
    MAX_SECRET_BYTES,
    MIN_SECRET_CHARS,
    SECRET_NAME_PATTERN,
    SecretInfo,
)
from conveyor.store.statements import Statements
from conveyor.store.usage import DatabaseUsage, TableUsage

__all__ = [
    "ACTIVE_STATUSES",
    "ASYNCPG_CONNECTION_ERRORS",
    "DAYS_AHEAD",
    "EXECUTION_STATUSES",
    "MAX_SECRET_BYTES",
    "MIN_SECRET_CHARS",
    "MISFIRE_POLICIES",
    "SECRET_NAME_PATTERN",
    "TERMINAL_STATUSES",
    "Activity",
    "ApiKey",
    "Claim",
    "Cutoff",
    "DatabaseUsage",
    "DroppedPartition",
    "Event",
    "EventWait",
    "Execution",
    "ExecutionFilter",
    "ExecutionWrite",
    "FiredTick",
    "IssuedApiKey",
    "Page",
    "Partition",
    "PlannedTicks",
    "Pruned",
    "RetentionOverride",
    "RetentionPolicy",
    "RetryFrom",
    "RunStore",
    "Schedule",
    "ScheduleTick",
    "SecretInfo",
    "Sent",
    "Statements",
    "StepRun",
    "StepWrite",
    "Store",
    "TableUsage",
    "Tenant",
    "TenantLimits",
    "Timer",
    "TimerWrite",
    "Unclaimed",
    "VersionInfo",
    "Workflow",
    "WorkflowVersion",
    "asyncpg_dsn",
    "dumps",
    "has_nul",
    "head_revisions",
    "migrate",
    "new_id",
    "next_fire_time",
    "sqlalchemy_url",
    "sqlite_path",
    "storable_text",
    "utcnow",
    "validate_schedule",
    "without_nul",
    "without_surrogates",
]
