"""PostgreSQL time partitions of ``executions`` and ``step_runs`` (migration 0013).

Both tables are partitioned ``BY RANGE`` on the execution id (``executions.id``,
``step_runs.execution_id``). Ids are time-ordered (:func:`~conveyor.store._types.new_id`: the
first 12 hex digits are the creation instant in ms), so a day of executions is one id range,
``[day_bound(day), day_bound(day + 1))``, and a day's executions and their step runs live in
two partitions with the same bounds: ``executions_pYYYYMMDD`` and ``step_runs_pYYYYMMDD``.
The primary keys stay ``(id)`` and ``(execution_id, seq)`` and a lookup by id reads one
partition. A ``DEFAULT`` partition of each table takes any id no daily partition covers (an
id that is not 32 hex digits, a day nobody created): nothing is ever refused.

* :meth:`PartitionService.ensure` creates the partitions of today and :data:`DAYS_AHEAD`
  days ahead (each retention pass: the leading scheduler's loop and ``conveyor prune``). If the
  default partition already holds ids of that day (nobody created it in time), the day's
  partition starts just above the highest of them: those rows stay in the default partition
  (row retention deletes them), and the day's later rows go to its partition.
* :meth:`PartitionService.drop_if_due` drops a day's two partitions once every execution in it
  is finished and past its tenant's retention (a tenant that keeps its executions longer
  keeps the partition) and no worker holds a lease on it: its timers, events, event waits,
  schedule ticks and idempotency keys are deleted by id range, the step runs partition is
  detached and dropped, then the executions partition. A partition still holding an
  unfinished execution (a month-long delay) is kept; the rows of it that are due are deleted
  in batches by row retention (:mod:`conveyor.store.retention`), and the partition goes once
  what is left is due.

Idempotency keys: a unique index of a partitioned table must contain the partition key, so
``UNIQUE (tenant_id, idempotency_key)`` cannot hold across partitions. On PostgreSQL the keys
live in ``execution_keys`` (primary key ``(tenant_id, idempotency_key)``) and a ``BEFORE
INSERT`` trigger on ``executions`` claims the key: an insert whose key is taken by an existing
execution is skipped (what ``ON CONFLICT DO NOTHING`` did), so ``INSERT ... RETURNING`` returns
no row for it. SQLite keeps plain tables, its unique index and batched deletes.
"""

from __future__ import annotations

import asyncio
import builtins
import logging
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from functools import partial
from typing import TYPE_CHECKING, TypeVar, cast

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from conveyor.errors import StoreError
from conveyor.store._base import ServiceBase
from conveyor.store.schema import ACTIVE_STATUSES, TERMINAL_STATUSES

if TYPE_CHECKING:
    from conveyor.settings import Settings
    from conveyor.store.statements import Statements

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = [
    "DAYS_AHEAD",
    "PARTITIONED",
    "DroppedPartition",
    "Partition",
    "PartitionService",
    "day_bound",
    "day_of",
    "include_name",
    "include_object",
    "is_partition",
    "partition_bounds",
    "partition_name",
    "read_partitions",
]

DAYS_AHEAD = 3
"""Days after today whose partitions each retention pass makes sure exist."""
EPOCH = date(1970, 1, 1)
DAY_MS = 86_400_000
PARTITIONED = {"executions": "id", "step_runs": "execution_id"}
"""Partitioned table -> its partition key (the execution id)."""
_HEX_ID = re.compile(r"^[0-9a-f]{32}$")
_NAME = re.compile(r"^(executions|step_runs)_(?:p(\d{8})|default)$")
_BOUNDS = re.compile(r"FROM \('([^']*)'\) TO \('([^']*)'\)")
LOCK_ATTEMPTS = 40
LOCK_RETRY_S = 0.05
"""Creating or dropping a partition takes ACCESS EXCLUSIVE locks: on ``executions`` and
``step_runs`` (ATTACH/DETACH) and on the tables their partitions' foreign keys point at,
``tenants`` and ``workflows`` (adding or dropping a partition adds or drops its foreign keys).
It takes them all at the start of its transaction, in that order, with ``NOWAIT``: it never
waits while holding a lock others need (no deadlock with triggers or workers, which lock
``workflows`` or ``tenants`` before ``executions``) nor queues every query behind it; refused,
it tries again after :data:`LOCK_RETRY_S`, at most :data:`LOCK_ATTEMPTS` times, then leaves it
to the next pass (a day not dropped loses its due rows by batched deletes meanwhile). Held for
a few milliseconds."""
_LOCK = "LOCK TABLE tenants, workflows, executions, step_runs IN ACCESS EXCLUSIVE MODE NOWAIT"
_LOCK_NOT_AVAILABLE = "55P03"


class _Busy(Exception):
    """The tables' locks were not granted (someone is using them): try again."""


# Tables whose rows name an execution (no FK from schedule ticks and keys; FKs from the rest):
# deleted by id range before a day's executions partition is detached.
_REFERENCING = ("timers", "events", "event_waits", "schedule_ticks", "execution_keys")


def day_bound(day: date) -> str:
    """The smallest id of ``day`` (UTC): its first millisecond, the random bits zero."""
    ms = (day - EPOCH).days * DAY_MS
    return f"{ms << 80:032x}"


def day_of(execution_id: str) -> date | None:
    """The UTC day of a time-ordered id; ``None`` for an id that is not 32 hex digits."""
    if not _HEX_ID.match(execution_id):
        return None
    return EPOCH + timedelta(days=int(execution_id[:12], 16) // DAY_MS)


def partition_bounds(bound: str | None) -> tuple[str, str] | None:
    """A daily partition's ``[lower, upper)`` id range from its bound expression
    (``pg_get_expr(relpartbound, oid)``); ``None`` for the default partition."""
    match = _BOUNDS.search(bound or "")
    return None if match is None else (match.group(1), match.group(2))


def partition_name(table: str, day: date) -> str:
    return f"{table}_p{day:%Y%m%d}"


def is_partition(name: str) -> bool:
    """Whether ``name`` is a partition of ``executions`` or ``step_runs`` (not in the declared
    schema: created and dropped at run time)."""
    return _NAME.match(name) is not None


def include_name(name: str | None, type_: str, parent_names: object) -> bool:
    """Alembic's ``include_name`` hook: the partitions are not part of the declared schema."""
    return not (type_ == "table" and name is not None and is_partition(name))


def include_object(
    obj: object, name: str | None, type_: str, reflected: bool, compare_to: object
) -> bool:
    """Alembic's ``include_object`` hook: nor are the foreign keys PostgreSQL keeps from each
    referencing table to each partition of ``executions``."""
    referred = getattr(obj, "referred_table", None)
    return not (type_ == "foreign_key_constraint" and is_partition(getattr(referred, "name", "")))


def _next_id(execution_id: str) -> str:
    return f"{int(execution_id, 16) + 1:032x}"


@dataclass(frozen=True, slots=True)
class Partition:
    table: str
    name: str
    day: date | None
    """``None``: the default partition."""
    lower: str | None
    upper: str | None
    rows: int
    """The planner's estimate (``pg_class.reltuples``; 0 before the first analyze)."""
    bytes: int


@dataclass(slots=True)
class DroppedPartition:
    """A day whose partitions were dropped, with the rows that went."""

    day: date
    executions: int = 0
    step_runs: int = 0
    timers: int = 0
    schedule_ticks: int = 0
    tenants: dict[str, int] = field(default_factory=dict)
    """Executions per tenant."""


class PartitionService(ServiceBase):
    """Lists, creates and drops the daily partitions (PostgreSQL; no-ops on SQLite)."""

    def __init__(self, engine: AsyncEngine, settings: Settings, statements: Statements) -> None:
        super().__init__(engine, settings, statements)
        self._kept_until: dict[str, datetime] = {}
        """Partition -> the instant its last finished execution is due (its tenant's
        retention, a lease): not read again before then. An unfinished execution is looked
        for on every pass (an index read); the rest costs a scan of the day, so once."""

    @property
    def enabled(self) -> bool:
        return self._dialect == "postgresql"

    async def list(self) -> builtins.list[Partition]:
        """Every partition of both tables, by table then lower bound (default last)."""
        if not self.enabled:
            return []
        async with self._auto() as conn:
            return await read_partitions(conn)

    async def ensure(self, now: datetime, days_ahead: int) -> builtins.list[str]:
        """Create the partitions of ``now``'s day and of ``days_ahead`` days after it that do
        not exist yet; returns the names created."""
        if not self.enabled:
            return []
        today = now.astimezone(UTC).date()
        created: builtins.list[str] = []
        async with self._auto() as conn:
            existing = {p.name for p in await read_partitions(conn)}
        for offset in range(days_ahead + 1):
            day = today + timedelta(days=offset)
            names = [partition_name(t, day) for t in PARTITIONED]
            if all(n in existing for n in names):
                continue
            try:
                made = await self._exclusively(partial(_create_day, day=day, existing=existing))
            except StoreError as exc:  # logged; the next pass tries again
                log.warning("partitions.create_failed", extra={"day": day.isoformat(),
                                                               "error": repr(exc)})  # fmt: skip
                continue
            created += made or []
        if created:
            log.info("partitions.created", extra={"partitions": created})
        return created

    async def _exclusively(self, work: Callable[[AsyncConnection], Awaitable[T]]) -> T | None:
        """``work`` in a transaction that first locks the tables (see :data:`LOCK_ATTEMPTS`);
        ``None`` when the locks were never granted."""
        for _ in range(LOCK_ATTEMPTS):
            try:
                async with self._tx() as conn:
                    try:
                        await conn.execute(text(_LOCK))
                    except DBAPIError as exc:
                        if getattr(exc.orig, "sqlstate", None) == _LOCK_NOT_AVAILABLE:
                            raise _Busy from exc
                        raise
                    return await work(conn)
            except _Busy:
                await asyncio.sleep(LOCK_RETRY_S)
        log.warning("partitions.busy", extra={"attempts": LOCK_ATTEMPTS})
        return None

    async def due(self, now: datetime, min_retention_s: int) -> builtins.list[date]:
        """Days whose executions partition ended more than ``min_retention_s`` (the shortest
        retention of any tenant) before ``now``: the candidates :meth:`drop_if_due` checks."""
        if not self.enabled:
            return []
        horizon = now - timedelta(seconds=min_retention_s)
        async with self._auto() as conn:
            parts = await read_partitions(conn)
        return sorted(
            p.day
            for p in parts
            if p.table == "executions"
            and p.day is not None
            and datetime(p.day.year, p.day.month, p.day.day, tzinfo=UTC) + timedelta(days=1)
            <= horizon
        )

    async def is_due(self, day: date, now: datetime, retention_s: int) -> bool:
        """Whether :meth:`drop_if_due` would drop ``day``'s partitions at ``now`` (the dry
        run of ``conveyor prune``; nothing is cached or changed)."""
        exe = partition_name("executions", day)
        async with self._auto() as conn:
            if not any(p.name == exe for p in await read_partitions(conn)):
                return False
            if await _active(conn, exe):
                return False
            params = {"now": now, "default": retention_s}
            kept_until = await _kept_until(conn, exe, params)
        return kept_until is None or kept_until < now

    async def drop_if_due(
        self, day: date, now: datetime, retention_s: int
    ) -> DroppedPartition | None:
        """Drop ``day``'s partitions if every execution in it is finished, past its tenant's
        retention (``tenants.retention_s``, else ``retention_s``) and not leased at ``now``;
        ``None`` when it is kept (or its locks were not granted in time)."""
        if not self.enabled:
            return None
        exe, steps = (partition_name(t, day) for t in PARTITIONED)
        params = {"now": now, "default": retention_s}
        async with self._auto() as conn:  # the checks and the counting, without locks
            parts = {p.name: p for p in await read_partitions(conn)}
            if exe not in parts or await _active(conn, exe):
                return None
            if now < self._kept_until.get(exe, now):  # a tenant keeps it: known until then
                return None
            kept_until = await _kept_until(conn, exe, params)
            if kept_until is not None and kept_until >= now:
                self._kept_until[exe] = kept_until
                return None
            # The day's step runs go with their own partition when it has the same bounds.
            # Otherwise (none, or other bounds: made by hand) they are elsewhere, in the default
            # partition mostly, and are deleted by id range: no foreign key cascades to them
            # (migration 0014), and a partition of other bounds is not this day's to drop.
            own_steps = steps in parts and (parts[steps].lower, parts[steps].upper) == (
                parts[exe].lower,
                parts[exe].upper,
            )
            report = await _count_day(conn, day, exe, steps if own_steps else None)
        bounds = {"lo": parts[exe].lower, "hi": parts[exe].upper}
        tables = _REFERENCING if own_steps else (*_REFERENCING, "step_runs")
        async with self._tx() as conn:  # rows naming its (finished) executions go first
            deleted = await _delete_referencing(conn, bounds, tables, finished_in=exe)
        report.timers, report.schedule_ticks = deleted["timers"], deleted["schedule_ticks"]
        report.step_runs += deleted.get("step_runs", 0)

        async def drop(conn: AsyncConnection) -> bool:
            if await _active(conn, exe):  # the one change that matters since the check
                return False
            since = await _delete_referencing(conn, bounds, tables)  # none, mostly
            report.step_runs += since.get("step_runs", 0)
            if own_steps:
                await conn.execute(text(f"ALTER TABLE step_runs DETACH PARTITION {steps}"))
                await conn.execute(text(f"DROP TABLE {steps}"))
            await conn.execute(text(f"ALTER TABLE executions DETACH PARTITION {exe}"))
            await conn.execute(text(f"DROP TABLE {exe}"))
            return True

        try:
            dropped = await self._exclusively(drop)
        except StoreError as exc:
            log.warning("partitions.drop_failed", extra={"day": day.isoformat(),
                                                         "error": repr(exc)})  # fmt: skip
            return None
        return report if dropped else None


async def read_partitions(conn: AsyncConnection) -> builtins.list[Partition]:
    """The partitions of ``executions`` and ``step_runs`` (PostgreSQL), by table then lower
    bound, each table's default partition last."""
    rows = (
        await conn.execute(
            text(
                "SELECT c.relname AS name, p.relname AS parent, "
                "pg_get_expr(c.relpartbound, c.oid) AS bound, "
                "greatest(c.reltuples, 0)::bigint AS rows, "
                "pg_total_relation_size(c.oid) AS bytes "
                "FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                "JOIN pg_class p ON p.oid = i.inhparent "
                "JOIN pg_namespace n ON n.oid = p.relnamespace "
                "WHERE n.nspname = current_schema() AND p.relname = ANY(:parents)"
            ),
            {"parents": builtins.list(PARTITIONED)},
        )
    ).all()
    out = []
    for r in rows:
        match = _NAME.match(r.name)
        day = None
        if match is not None and match.group(2) is not None:
            day = datetime.strptime(match.group(2), "%Y%m%d").date()
        lower, upper = partition_bounds(r.bound) or (None, None)
        out.append(Partition(r.parent, r.name, day, lower, upper, int(r.rows), int(r.bytes)))
    out.sort(key=lambda p: (p.table, p.lower is None, p.lower or ""))
    return out


async def _create_day(conn: AsyncConnection, day: date, existing: set[str]) -> builtins.list[str]:
    """Create ``day``'s partitions (both tables, same bounds). Rows of that day already in a
    default partition stay there: the partitions start above the highest of them."""
    lower, upper = day_bound(day), day_bound(day + timedelta(days=1))
    highest = (
        await conn.execute(
            text(
                "SELECT max(k) FROM (SELECT max(id) AS k FROM executions_default "
                "WHERE id >= :lo AND id < :hi UNION ALL SELECT max(execution_id) "
                "FROM step_runs_default WHERE execution_id >= :lo AND execution_id < :hi) m"
            ),
            {"lo": lower, "hi": upper},
        )
    ).scalar()
    if highest is not None:
        lower = _next_id(str(highest))
        log.warning("partitions.late", extra={"day": day.isoformat(), "from": lower})
    created = []
    for table in PARTITIONED:
        name = partition_name(table, day)
        if name in existing or lower >= upper:
            continue
        await conn.execute(
            text(
                f"CREATE TABLE {name} PARTITION OF {table} "
                f"FOR VALUES FROM ('{lower}') TO ('{upper}')"
            )
        )
        created.append(name)
    return created


_ACTIVE = ", ".join(f"'{s}'" for s in ACTIVE_STATUSES)
_TERMINAL = ", ".join(f"'{s}'" for s in TERMINAL_STATUSES)


async def _active(conn: AsyncConnection, partition: str) -> bool:
    """Whether ``partition`` holds an unfinished execution (an index read), or a child
    (sub-workflow, branch, item) whose parent has not ended: the parent reads it when it joins
    (one probe by id per child of the day)."""
    found = await conn.execute(
        text(f"SELECT 1 FROM {partition} WHERE status IN ({_ACTIVE}) LIMIT 1")
    )
    if found.first() is not None:
        return True
    found = await conn.execute(
        text(
            f"SELECT 1 FROM {partition} c WHERE c.parent_execution_id IS NOT NULL AND EXISTS"
            " (SELECT 1 FROM executions p WHERE p.id = c.parent_execution_id"
            f" AND p.status IN ({_ACTIVE})) LIMIT 1"
        )
    )
    return found.first() is not None


async def _kept_until(
    conn: AsyncConnection, partition: str, params: dict[str, object]
) -> datetime | None:
    """When the last execution of ``partition`` is due: the latest of its executions'
    ``finished_at`` + their tenant's retention and of their leases (one scan of the day);
    ``None`` for an empty partition. (Only finished executions: look for unfinished ones
    first.)"""
    found = await conn.execute(
        text(
            "SELECT greatest(max(e.finished_at + make_interval(secs => coalesce("
            "t.retention_s, CAST(:default AS integer)))), max(e.lease_expires_at)) "
            f"FROM {partition} e LEFT JOIN tenants t ON t.id = e.tenant_id "
            f"WHERE e.status IN ({_TERMINAL})"
        ),
        {"default": params["default"]},
    )
    value = found.scalar()
    return None if value is None else cast(datetime, value)


async def _count_day(
    conn: AsyncConnection, day: date, exe: str, steps: str | None
) -> DroppedPartition:
    report = DroppedPartition(day)
    per_tenant = await conn.execute(
        text(f"SELECT tenant_id, count(*) AS n FROM {exe} GROUP BY tenant_id")
    )
    report.tenants = {r.tenant_id: int(r.n) for r in per_tenant}
    report.executions = sum(report.tenants.values())
    if steps is not None:
        counted = await conn.execute(text(f"SELECT count(*) FROM {steps}"))
        report.step_runs = int(counted.scalar_one())
    return report


async def _delete_referencing(
    conn: AsyncConnection,
    bounds: Mapping[str, object],
    tables: Sequence[str] = _REFERENCING,
    *,
    finished_in: str | None = None,
) -> dict[str, int]:
    """Delete the rows of ``tables`` (:data:`_REFERENCING`, and ``step_runs`` when the day has
    no partition of its own there) naming an execution id in ``bounds`` (only those of a
    finished execution of ``finished_in``, when given: before the lock)."""
    only = (
        ""
        if finished_in is None
        else f" AND execution_id IN (SELECT id FROM {finished_in} WHERE status IN ({_TERMINAL}))"
    )
    deleted = {}
    for table in tables:
        result = await conn.execute(
            text(f"DELETE FROM {table} WHERE execution_id >= :lo AND execution_id < :hi{only}"),
            bounds,
        )
        deleted[table] = int(result.rowcount or 0)
    return deleted
