"""The hot per-request statements on Postgres, on the raw asyncpg pool (no SQLAlchemy overhead).

Triggering an execution is the API's hottest path (≥ 1,000/s per process is the target):
verifying the API key is one prepared statement here, and so is the trigger itself —
:data:`_TRIGGER` checks the workflow (tenant-scoped, live, enabled, still at the version the
input was validated against) and inserts the execution (idempotency key honoured) in ONE round
trip. The contract is :class:`conveyor.store.statements.Statements`; on SQLite the same
statements run on SQLAlchemy Core (:mod:`conveyor.store.sql`).

Idempotency keys: ``executions`` is partitioned (migration 0013), so no unique index can back
``ON CONFLICT (tenant_id, idempotency_key)``; the ``BEFORE INSERT`` trigger that claims the
key in ``execution_keys`` skips an insert whose key is taken (``RETURNING`` gives no row), as
``ON CONFLICT DO NOTHING`` did — also for a second request with the same key in one batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from pydantic_core import from_json

from conveyor.errors import DatabaseUnavailable
from conveyor.store._errors import translate_errors
from conveyor.store._types import dumps
from conveyor.store.partitions import day_bound
from conveyor.store.pg._conn import call, discard
from conveyor.store.records import EXECUTION_COLUMNS, STEP_RUN_COLUMNS, Execution, StepRun
from conveyor.store.statements import TriggerRequest

__all__ = ["PgStatements", "execution_from_record"]

_EXECUTION_COLUMNS = EXECUTION_COLUMNS
_JSON = ("input", "output", "error", "step_errors")
_SELECT_EXECUTION = f"SELECT {', '.join(_EXECUTION_COLUMNS)} FROM executions"

_KEY = """
SELECT id, tenant_id, name, prefix, created_at, revoked_at, key_hash
  FROM api_keys WHERE prefix = $1
"""
_WORKFLOW = """
SELECT current_version, region, enabled FROM workflows
 WHERE tenant_id = $1 AND id = $2 AND deleted_at IS NULL
"""
_INSERT = """
INSERT INTO executions (id, tenant_id, workflow_id, workflow_version, status, region,
                        triggered_by, input, idempotency_key, schedule_id, retry_of,
                        created_at, queued_at, updated_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9, $10, $11, $12, $13, $14)
RETURNING id
"""
# One round trip for a trigger whose input was validated against version $4: the execution is
# inserted only if the tenant's workflow is live, enabled and still at version $4 (the key
# trigger: idempotency key already used → nothing inserted). The workflow row comes back in every case
# (no row: no such workflow for this tenant), so the caller can tell why nothing was inserted.
# Data-modifying CTEs always run to completion, whether or not the outer query reads them.
_TRIGGER = """
WITH wf AS (
    SELECT current_version, region, enabled FROM workflows
     WHERE tenant_id = $2 AND id = $3 AND deleted_at IS NULL
), ins AS (
    INSERT INTO executions (id, tenant_id, workflow_id, workflow_version, status, region,
                            triggered_by, input, idempotency_key, created_at, queued_at,
                            updated_at)
    SELECT $1, $2, $3, wf.current_version, 'queued', wf.region, $5, $6::jsonb, $7,
           $8::timestamptz, $8::timestamptz, $8::timestamptz
      FROM wf
     WHERE wf.enabled AND wf.current_version = $4::integer
    RETURNING id
)
SELECT current_version, region, enabled, EXISTS (SELECT 1 FROM ins) AS inserted FROM wf
"""
# The group commit of :data:`_TRIGGER`: the requests of a batch, as arrays, go in ONE statement
# (one round trip, one commit). Each request gets its own workflow row and ``inserted`` flag,
# in order (``ord``); requests that share an idempotency key insert one row (the key trigger
# also skips a row whose key a row inserted earlier by the same statement claimed).
_TRIGGER_MANY = """
WITH req AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::integer[], $5::text[],
                         $6::text[], $7::text[], $8::timestamptz[])
           WITH ORDINALITY AS r(id, tenant_id, workflow_id, version, triggered_by, input,
                                idempotency_key, now, ord)
), wf AS (
    SELECT req.*, w.current_version, w.region, w.enabled
      FROM req LEFT JOIN workflows w
        ON w.tenant_id = req.tenant_id AND w.id = req.workflow_id AND w.deleted_at IS NULL
), ins AS (
    INSERT INTO executions (id, tenant_id, workflow_id, workflow_version, status, region,
                            triggered_by, input, idempotency_key, created_at, queued_at,
                            updated_at)
    SELECT id, tenant_id, workflow_id, current_version, 'queued', region, triggered_by,
           input::jsonb, idempotency_key, now, now, now
      FROM wf
     WHERE enabled AND current_version = version
     ORDER BY ord
    RETURNING id
)
SELECT ord, current_version, region, enabled, id IN (SELECT id FROM ins) AS inserted
  FROM wf ORDER BY ord
"""
_BY_ID = _SELECT_EXECUTION + " WHERE tenant_id = $1 AND id = $2"
_BY_KEY = _SELECT_EXECUTION + " WHERE tenant_id = $1 AND idempotency_key = $2"
_BY_KEYS = (
    f"SELECT {', '.join('e.' + c for c in _EXECUTION_COLUMNS)} FROM executions e"
    " JOIN unnest($1::text[], $2::text[]) AS k(tenant_id, idempotency_key)"
    " ON e.tenant_id = k.tenant_id AND e.idempotency_key = k.idempotency_key"
)


# A child's end told to its parent (after the lock, in the same transaction): the event is
# stored only for a live parent and a new key; the parent is woken only when the event was
# stored and it is parked on that name — and then comes back whole (to enqueue it).
_CHILD_END = f"""
WITH parent AS (
    SELECT id, tenant_id, workflow_id FROM executions
     WHERE tenant_id = $1 AND id = $2 AND status NOT IN ('succeeded', 'failed', 'cancelled')
), stored AS (
    INSERT INTO events (id, tenant_id, workflow_id, execution_id, name, payload, source,
                        received_at, idempotency_key)
    SELECT $3, p.tenant_id, p.workflow_id, p.id, $4, $5::jsonb, 'workflow', $6, $7 FROM parent p
    ON CONFLICT DO NOTHING
    RETURNING id
), woken AS (
    UPDATE executions e SET wake_at = $6
     WHERE e.tenant_id = $1 AND e.id = $2 AND e.status = 'waiting'
       AND EXISTS (SELECT 1 FROM event_waits w WHERE w.execution_id = $2 AND w.name = $4)
       AND EXISTS (SELECT 1 FROM stored)
    RETURNING {", ".join("e." + c for c in _EXECUTION_COLUMNS)}
)
SELECT (SELECT count(*) FROM stored) AS stored, woken.* FROM (SELECT 1) AS one
  LEFT JOIN woken ON true
"""
_LOCK = "SELECT pg_advisory_xact_lock(hashtext($1))"


_JSON_AT = tuple(_EXECUTION_COLUMNS.index(name) for name in _JSON)
_STEP_JSON_AT = tuple(STEP_RUN_COLUMNS.index(name) for name in ("input", "output", "error"))
_STEPS = (
    f"SELECT {', '.join(STEP_RUN_COLUMNS)} FROM step_runs"
    " WHERE tenant_id = $1 AND execution_id = $2 ORDER BY seq"
)


def _decoded(row: Any, json_at: tuple[int, ...]) -> list[Any]:
    """``row``'s values with the JSON columns at ``json_at`` (text) parsed by pydantic-core's
    parser: the same values as ``json.loads`` — ints of any size, floats to the last bit — at
    a sixth of its CPU."""
    values = list(row)
    for i in json_at:
        raw = values[i]
        if raw is not None:
            values[i] = from_json(raw)
    return values


def execution_from_record(row: Any, steps: tuple[StepRun, ...] = ()) -> Execution:
    """An :class:`Execution` from a row of :data:`_EXECUTION_COLUMNS` (positional: the
    columns are in field order)."""
    values = _decoded(row, _JSON_AT)
    values.append(steps)  # the last field
    return Execution(*values)


def step_run_from_record(row: Any) -> StepRun:
    return StepRun(*_decoded(row, _STEP_JSON_AT))


# --- newest-first pages over daily partitions --------------------------------------------
# ``executions`` is partitioned by id range, one partition a day (migration 0013); a list is
# ordered by ``created_at``. A plain ``ORDER BY created_at DESC, id DESC LIMIT n`` therefore
# reads every partition's index (a ``Merge Append`` of one index scan per day kept). A page
# instead first reads only the partitions from a few days before its start on (``id >= lo``:
# the older daily partitions are pruned when the statement is planned) plus the whole DEFAULT
# partition, and reads more days, then every partition, only when that did not provably fill
# the page.
#
# Why that is exact: an execution's id is made by ``new_id()`` when it is created, after the
# creation instant ``created_at`` was read, so its id's instant (the first 12 hex digits, ms)
# is never much earlier than its ``created_at``: ``created_at < id instant + MARGIN``. A row of
# a daily partition left out has ``id < lo = day_bound(D)``, so an id instant before D and
# ``created_at < D + MARGIN``. So when the rows read hold ``limit`` rows with ``created_at >=
# D + MARGIN`` and one more, no row left out can come before any of them: they are the page,
# and more follow. Rows of the DEFAULT partition (ids of a day nobody created a partition for,
# ids that are not time-ordered) are always read. The cursor is a row comparison, ``(created_at,
# id) < (at, id)`` (the same rows as ``created_at <= at AND (created_at < at OR id < id)``):
# the planner estimates it better and keeps ordered index scans on every partition.
MARGIN = timedelta(days=1)
"""How much later than its id's instant an execution's ``created_at`` may be (see above);
``new_id()`` is called after ``now`` is read, so in practice it is never later at all."""
WALK = (3, 15, None)
"""How many days before the page's start (the cursor's ``created_at``, or now) each try reads
from: ``D = day of start - days``, exact down to ``D + MARGIN`` (2 and 14 days of rows at the
least); ``None``: every partition (the plain statement)."""
_ORDER = "ORDER BY created_at DESC, id DESC"
_PAGE_SQL: dict[tuple[int, bool, bool, bool], str] = {}


def _page_sql(statuses: int, workflow: bool, cursor: bool, bounded: bool) -> str:
    """The page statement for a filter shape. Parameters: $1 tenant, then the status (one:
    text; several: text[]), the workflow, the cursor's created_at and id, the limit, and,
    ``bounded``, the lowest id read from the daily partitions."""
    key = (statuses, workflow, cursor, bounded)
    sql = _PAGE_SQL.get(key)
    if sql is not None:
        return sql
    where, n = ["tenant_id = $1"], 1
    if statuses == 1:
        n += 1
        where.append(f"status = ${n}")
    elif statuses > 1:
        n += 1
        where.append(f"status = ANY(${n}::text[])")
    if workflow:
        n += 1
        where.append(f"workflow_id = ${n}")
    if cursor:
        where.append(f"(created_at, id) < (${n + 1}, ${n + 2})")
        n += 2
    limit = f"${n + 1}"
    cols = ", ".join(_EXECUTION_COLUMNS)
    cond = " AND ".join(where)
    if not bounded:
        sql = f"SELECT {cols} FROM executions WHERE {cond} {_ORDER} LIMIT {limit}"
    else:
        lo = f"${n + 2}"
        sql = (
            f"(SELECT {cols} FROM executions WHERE {cond} AND id >= {lo} {_ORDER} LIMIT {limit})"
            f" UNION ALL (SELECT {cols} FROM executions_default WHERE {cond} AND id < {lo}"
            f" {_ORDER} LIMIT {limit}) {_ORDER} LIMIT {limit}"
        )
    _PAGE_SQL[key] = sql
    return sql


def walk_from(start: datetime, days: int) -> tuple[str, datetime]:
    """The lowest id a try ``days`` before ``start`` reads from the daily partitions, and the
    ``created_at`` down to which its rows are exact."""
    day = start.astimezone(UTC).date() - timedelta(days=days)
    return day_bound(day), datetime(day.year, day.month, day.day, tzinfo=UTC) + MARGIN


class PgStatements:
    """:class:`~conveyor.store.statements.Statements` on the raw asyncpg pool."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    async def _fetchrow(self, sql: str, *args: Any) -> Any:
        return await call(self._pool, "fetchrow", sql, *args)

    async def api_key(self, prefix: str) -> Any:
        return await self._fetchrow(_KEY, prefix)

    async def trigger_target(self, tenant_id: str, workflow_id: str) -> Any:
        return await self._fetchrow(_WORKFLOW, tenant_id, workflow_id)

    async def trigger(
        self,
        execution_id: str,
        tenant_id: str,
        workflow_id: str,
        version: int,
        *,
        triggered_by: str,
        input: Any,
        input_json: str | None,
        idempotency_key: str | None,
        now: datetime,
    ) -> Any:
        """Insert a ``queued`` execution of ``version`` if it is still the workflow's current
        one (see :data:`_TRIGGER`). The workflow's ``(current_version, region, enabled,
        inserted)``, or ``None`` when the tenant has no such live workflow. (``input`` is
        sent as ``input_json``, already serialised and checked.)"""
        return await self._fetchrow(
            _TRIGGER,
            execution_id,
            tenant_id,
            workflow_id,
            version,
            triggered_by,
            input_json,
            idempotency_key,
            now,
        )

    async def trigger_many(self, requests: Sequence[TriggerRequest]) -> list[Any]:
        """:meth:`trigger` for each of ``requests`` in ONE statement (see
        :data:`_TRIGGER_MANY`): one answer per request, in order."""
        rows = await call(
            self._pool,
            "fetch",
            _TRIGGER_MANY,
            [r.execution_id for r in requests],
            [r.tenant_id for r in requests],
            [r.workflow_id for r in requests],
            [r.version for r in requests],
            [r.triggered_by for r in requests],
            [r.input_json for r in requests],
            [r.idempotency_key for r in requests],
            [r.now for r in requests],
        )
        return [None if row["current_version"] is None else row for row in rows]

    async def insert_execution(self, e: Execution) -> bool:
        """Insert; False when the idempotency key was already used (nothing inserted)."""
        row = await self._fetchrow(
            _INSERT,
            e.id,
            e.tenant_id,
            e.workflow_id,
            e.workflow_version,
            e.status,
            e.region,
            e.triggered_by,
            None if e.input is None else dumps(e.input),
            e.idempotency_key,
            e.schedule_id,
            e.retry_of,
            e.created_at,
            e.queued_at,
            e.updated_at,
        )
        return row is not None

    async def child_end(
        self,
        tenant_id: str,
        execution_id: str,
        *,
        event_id: str,
        name: str,
        payload: Any,
        now: datetime,
        idempotency_key: str,
        lock_key: str,
    ) -> tuple[bool, Execution | None]:
        """The lock, then :data:`_CHILD_END`, in one transaction (four round trips with
        ``BEGIN`` and ``COMMIT``). A broken connection is discarded, never reused; the caller
        (best effort: the child's job redelivery tells again) sees ``DatabaseUnavailable``."""
        with translate_errors():
            con = await self._pool.acquire()
        try:
            with translate_errors():
                async with con.transaction():
                    await con.execute(_LOCK, lock_key)
                    row = await con.fetchrow(
                        _CHILD_END, tenant_id, execution_id, event_id, name, dumps(payload),
                        now, idempotency_key,
                    )  # fmt: skip
        except DatabaseUnavailable:
            await discard(self._pool, con)
            raise
        except BaseException:
            await self._pool.release(con)
            raise
        await self._pool.release(con)
        if not row["stored"]:
            return False, None
        if row["id"] is None:
            return True, None
        return True, execution_from_record(tuple(row)[1:])

    async def execution(self, tenant_id: str, execution_id: str) -> Execution | None:
        row = await self._fetchrow(_BY_ID, tenant_id, execution_id)
        return None if row is None else execution_from_record(row)

    async def execution_with_steps(self, tenant_id: str, execution_id: str) -> Execution | None:
        row = await self._fetchrow(_BY_ID, tenant_id, execution_id)
        if row is None:
            return None
        steps = await call(self._pool, "fetch", _STEPS, tenant_id, execution_id)
        return execution_from_record(row, tuple(step_run_from_record(r) for r in steps))

    async def execution_page(
        self,
        tenant_id: str,
        *,
        statuses: Sequence[str] | None,
        workflow_id: str | None,
        limit: int,
        after: tuple[datetime, str] | None,
    ) -> tuple[list[Execution], bool]:
        """See :class:`~conveyor.store.statements.Statements`; newest partitions first (see
        :data:`MARGIN`): one statement reading the last few days' partitions for a page whose
        rows are that recent, at most three statements for any page."""
        args: list[Any] = [tenant_id]
        if statuses:
            args.append(statuses[0] if len(statuses) == 1 else list(statuses))
        if workflow_id is not None:
            args.append(workflow_id)
        if after is not None:
            args.extend(after)
        args.append(limit + 1)
        shape = (len(statuses or ()), workflow_id is not None, after is not None)
        start = after[0] if after is not None else datetime.now(UTC)
        for days in WALK:
            if days is None:
                rows = await call(self._pool, "fetch", _page_sql(*shape, False), *args)
                break
            lo, exact = walk_from(start, days)
            rows = await call(self._pool, "fetch", _page_sql(*shape, True), *args, lo)
            if len(rows) > limit and rows[limit - 1]["created_at"] >= exact:
                break
        items = [execution_from_record(r) for r in rows[:limit]]
        return items, len(rows) > limit

    async def execution_by_key(self, tenant_id: str, key: str) -> Execution | None:
        row = await self._fetchrow(_BY_KEY, tenant_id, key)
        return None if row is None else execution_from_record(row)

    async def executions_by_keys(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], Execution]:
        rows = await call(self._pool, "fetch", _BY_KEYS, [t for t, _ in keys], [k for _, k in keys])
        found = (execution_from_record(row) for row in rows)
        return {(e.tenant_id, str(e.idempotency_key)): e for e in found}
