"""The engine's hot path on Postgres: raw asyncpg prepared statements.

Per execution of a one-step workflow this is two statements: the claim (``UPDATE …
RETURNING``) and the step write, in which the step run insert, the execution update (fenced by
``lease``) and, for a ``delay`` step, the timer insert are ONE statement (data-modifying CTEs
are atomic); pure steps run before it ride along in the same statement (``unnest`` of one
array per column). Connections come from a dedicated asyncpg pool whose release costs no round
trip. Statements run in autocommit mode: each is its own transaction.

An execution of a workflow of pure steps only is not claimed: it is peeked (a ``SELECT`` of
the claim's columns, batched as claims are), and its one write claims it (``WHERE lease =
:read AND status = 'queued'``; see :mod:`conveyor.store.runs`).

**Group commit.** The worker runs many executions at once in one event loop, and most of
them claim and write at about the same moments. Claims and writes go through a
:class:`~conveyor.store._group_commit.GroupCommit` each: those made in the same loop turn (or
while the previous batch is on its way) share ONE statement and ONE commit —
``UPDATE … FROM unnest(ids, nows, …) … RETURNING`` for claims, and for writes one statement
whose execution update joins ``unnest`` of one array per column, each row fenced by its OWN
``lease``, and whose step run / timer inserts join the rows that update returned (by id AND
lease). The statement says which rows it changed: an execution whose row is not among them
was fenced out (a racer holds a newer lease) — only it raises ``LeaseLost``; the others are
committed. A lone claim or write is sent at once, on its own (the single-row statements
above): nothing waits for a batch to fill. A batch the database refuses for a reason of its
own (a value one execution cannot store, a deadlock with another process's batch) is sent
again row by row, so that error reaches only its own execution; a lost connection fails the
batch (each engine then retries its write, asking first whether it committed).

A batch whose executions are all of one day is sent on that day's partitions of
``executions`` and ``step_runs`` rather than on the parent tables (:class:`PartitionMap`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from bisect import bisect_right
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from conveyor.errors import ConveyorError, DatabaseUnavailable, LeaseLost
from conveyor.store._errors import is_row_error, never_sent, translate_errors
from conveyor.store._group_commit import GroupCommit, each_alone
from conveyor.store.partitions import PARTITIONED, partition_bounds
from conveyor.store.pg._conn import call, discard
from conveyor.store.runs import (
    Claim,
    ExecutionWrite,
    StepWrite,
    TimerWrite,
    Unclaimed,
    unleased_claim,
)

__all__ = ["PartitionMap", "PgRunStore"]

log = logging.getLogger(__name__)

_CLAIMED = """tenant_id, workflow_id, workflow_version, region, input, next_step, steps_run,
          lease, attempts, queued_at, started_at, step_attempt, step_errors, step_started_at,
          parent_execution_id, depth, parent_seq, branch"""


def _numbered(sql: str) -> tuple[str, tuple[str, ...]]:
    """``:name`` placeholders → ``$n`` (same name, same number); returns the argument order."""
    order: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in order:
            order.append(name)
        return f"${order.index(name) + 1}"

    return re.sub(r"(?<!:):([a-z_]+)", number, sql), tuple(order)


def _claimable(e: str, now: str) -> str:
    """The claim's condition on a row (columns prefixed ``e``; ``now`` the claim's clock):
    queued, running with its lease expired, or waiting and due.

    A ``CASE`` on purpose: written as ``status = 'queued' OR …`` it implies the predicate of
    the partial index of active executions (``ix_executions_active``), and where the
    planner's statistics lag behind a backlog (a new day's partition, a burst of triggers
    before autovacuum's next ``ANALYZE``) it chose that index and hash-joined every active row
    of the partition with the batch: 9.3 ms for a batch of 10 claims with 20,000 executions
    queued, against 1.3 ms for ten primary-key lookups. The ``CASE`` leaves the primary key as
    the only index the claim can use."""
    return (
        f"CASE {e}status WHEN 'queued' THEN true"
        f" WHEN 'running' THEN ({e}lease_expires_at IS NULL OR {e}lease_expires_at <= {now})"
        f" WHEN 'waiting' THEN {e}wake_at <= {now} ELSE false END"
    )


_CLAIM = (
    """
UPDATE executions
   SET lease = lease + 1, status = 'running',
       -- a delivery that runs work is an attempt; resuming when a delay timer is due is not
       attempts = attempts + CASE WHEN status = 'waiting' THEN 0 ELSE 1 END,
       started_at = COALESCE(started_at, $2), lease_expires_at = $3, wake_at = NULL,
       updated_at = $2
 WHERE id = $1
   AND """
    + _claimable("", "$2")
    + """
RETURNING """
    + _CLAIMED
)

_CLAIM_MANY = (
    """
UPDATE executions e
   SET lease = e.lease + 1, status = 'running',
       attempts = e.attempts + CASE WHEN e.status = 'waiting' THEN 0 ELSE 1 END,
       started_at = COALESCE(e.started_at, x.now), lease_expires_at = x.lease_until,
       wake_at = NULL, updated_at = x.now
  FROM unnest($1::text[], $2::timestamptz[], $3::timestamptz[]) AS x(id, now, lease_until)
 WHERE e.id = x.id AND """
    + _claimable("e.", "x.now")
    + """
RETURNING e.id, """
    + ", ".join(f"e.{c.strip()}" for c in _CLAIMED.split(","))
)
"""Many claims in one statement (each row with its own condition; one commit): a nested loop
of primary-key lookups, whatever the backlog (see :func:`_claimable`)."""

_PEEK = "SELECT status, " + _CLAIMED + " FROM executions WHERE id = $1"
_PEEK_MANY = "SELECT id, status, " + _CLAIMED + " FROM executions WHERE id = ANY($1::text[])"
"""An unleased run's read (no write, no commit): see :func:`conveyor.store.runs.unleased_claim`."""

_UNCLAIMED = "SELECT status, lease_expires_at, wake_at FROM executions WHERE id = $1"

_OUTPUTS = """
SELECT step_id, output FROM step_runs
 WHERE tenant_id = $1 AND execution_id = $2 AND status = 'succeeded' ORDER BY seq
"""

_WRITTEN = """
SELECT e.status FROM executions e
  JOIN step_runs s ON s.execution_id = e.id AND s.seq = $2
 WHERE e.id = $1 AND e.lease = $3
"""
_RENEW = "UPDATE executions SET lease_expires_at = $3 WHERE id = $1 AND lease = $2 RETURNING 1"
_RELEASE = """
UPDATE executions SET lease_expires_at = $3
 WHERE id = $1 AND lease = $2 AND status = 'running'
"""

_UPDATE = """
u AS (
  UPDATE executions SET{claims}
    status = CASE WHEN status = 'cancelled' THEN status ELSE :status::text END,
    next_step = :next_step::int, steps_run = :steps_run::int,
    output = CASE WHEN status = 'cancelled' THEN output ELSE :output::jsonb END,
    error = CASE WHEN status = 'cancelled' THEN error ELSE :error::jsonb END,
    finished_at = CASE WHEN status = 'cancelled' THEN finished_at
                       ELSE :finished_at::timestamptz END,
    wake_at = CASE WHEN status = 'cancelled' THEN NULL ELSE :wake_at::timestamptz END,
    lease_expires_at = :lease_expires_at::timestamptz, step_attempt = :cursor_attempt::int,
    step_errors = :cursor_errors::jsonb, step_started_at = :cursor_started::timestamptz,
    updated_at = :now::timestamptz
  WHERE id = :id::text AND {fence}
  RETURNING tenant_id, status
)"""

_FENCE = "lease = :lease::int"
_CLAIMING = """
    lease = :lease::int, attempts = attempts + 1,
    started_at = COALESCE(started_at, :started::timestamptz),"""
_CLAIMING_FENCE = "lease = :lease::int - 1 AND status = 'queued'"
"""An unleased run's write claims the execution: still queued under the lease it read."""

_STEP = """
s AS (
  INSERT INTO step_runs (execution_id, seq, tenant_id, step_id, step_type, status, attempts,
                         input, output, output_truncated, error, started_at, finished_at)
  SELECT :id::text, :seq::int, u.tenant_id, :step_id::text, :step_type::text,
         :step_status::text, :step_attempts::int, :step_input::jsonb, :step_output::jsonb,
         :step_truncated::bool, :step_error::jsonb, :step_started::timestamptz,
         :step_finished::timestamptz
    FROM u
)"""

_TIMER = """
t AS (
  INSERT INTO timers (id, tenant_id, execution_id, workflow_id, region, seq, due_at, status,
                      created_at)
  SELECT :timer_id::text, u.tenant_id, :id::text, :timer_workflow::text, :timer_region::text,
         :timer_seq::int, :timer_due::timestamptz, 'pending', :now::timestamptz
    FROM u WHERE u.status = 'waiting'
  ON CONFLICT (execution_id, seq) DO UPDATE
     SET id = EXCLUDED.id, due_at = EXCLUDED.due_at, status = 'pending', claimed_by = NULL,
         claimed_until = NULL, fired_at = NULL, created_at = EXCLUDED.created_at
)"""
"""The timer; a later wait of the same step (its next retry) takes the step's row over."""


_STEPS = """
s AS (
  INSERT INTO step_runs (execution_id, seq, tenant_id, step_id, step_type, status, attempts,
                         input, output, output_truncated, error, started_at, finished_at)
  SELECT :id::text, r.seq, u.tenant_id, r.step_id, r.step_type, r.status, r.attempts,
         r.input::jsonb, r.output::jsonb, r.truncated, r.error::jsonb, r.started, r.finished
    FROM u, unnest(:seqs::int[], :step_ids::text[], :step_types::text[],
                   :step_statuses::text[], :steps_attempts::int[], :step_inputs::text[],
                   :step_outputs::text[], :steps_truncated::bool[], :step_errors::text[],
                   :steps_started::timestamptz[], :steps_finished::timestamptz[])
         AS r(seq, step_id, step_type, status, attempts, input, output, truncated, error,
              started, finished)
)"""
"""Several step runs in the write: pure steps recorded with the durable step after them."""


def _write_sql(steps: int, with_timer: bool, claiming: bool) -> tuple[str, tuple[str, ...]]:
    update = _UPDATE.format(
        claims=_CLAIMING if claiming else "", fence=_CLAIMING_FENCE if claiming else _FENCE
    )
    parts = [update] + [[], [_STEP], [_STEPS]][steps] + ([_TIMER] if with_timer else [])
    return _numbered("WITH " + ",".join(parts) + "\nSELECT status FROM u")


_WRITES = {
    (s, t, c): _write_sql(s, t, c) for s in (0, 1, 2) for t in (False, True) for c in (False, True)
}
"""By (number of step runs: none, one, several; with a timer; claiming: an unleased run's)."""

_WRITE_MANY, _WRITE_MANY_ORDER = _numbered("""
WITH x AS (
  SELECT * FROM unnest(:ids::text[], :leases::int[], :statuses::text[], :next_steps::int[],
                       :steps_runs::int[], :outputs::text[], :errors::text[],
                       :finished::timestamptz[], :wakes::timestamptz[],
                       :lease_untils::timestamptz[], :cursor_attempts::int[],
                       :cursor_errors::text[], :cursor_started::timestamptz[],
                       :nows::timestamptz[], :claims::int[], :started::timestamptz[])
    AS x(id, lease, status, next_step, steps_run, output, error, finished_at, wake_at,
         lease_expires_at, cursor_attempt, cursor_errors, cursor_started, now, claims, started)
),
u AS (
  UPDATE executions e SET
    -- claims = 1: an unleased run's write, which claims the execution as it writes
    lease = x.lease, attempts = e.attempts + x.claims,
    started_at = COALESCE(e.started_at, x.started),
    status = CASE WHEN e.status = 'cancelled' THEN e.status ELSE x.status END,
    next_step = x.next_step, steps_run = x.steps_run,
    output = CASE WHEN e.status = 'cancelled' THEN e.output ELSE x.output::jsonb END,
    error = CASE WHEN e.status = 'cancelled' THEN e.error ELSE x.error::jsonb END,
    finished_at = CASE WHEN e.status = 'cancelled' THEN e.finished_at ELSE x.finished_at END,
    wake_at = CASE WHEN e.status = 'cancelled' THEN NULL ELSE x.wake_at END,
    lease_expires_at = x.lease_expires_at, step_attempt = x.cursor_attempt,
    step_errors = x.cursor_errors::jsonb, step_started_at = x.cursor_started,
    updated_at = x.now
  FROM x
  WHERE e.id = x.id AND e.lease = x.lease - x.claims AND (x.claims = 0 OR e.status = 'queued')
  RETURNING e.id, e.lease, e.tenant_id, e.status
),
s AS (
  INSERT INTO step_runs (execution_id, seq, tenant_id, step_id, step_type, status, attempts,
                         input, output, output_truncated, error, started_at, finished_at)
  SELECT u.id, r.seq, u.tenant_id, r.step_id, r.step_type, r.status, r.attempts,
         r.input::jsonb, r.output::jsonb, r.truncated, r.error::jsonb, r.started, r.finished
    FROM unnest(:step_execs::text[], :step_leases::int[], :seqs::int[], :step_ids::text[],
                :step_types::text[], :step_statuses::text[], :steps_attempts::int[],
                :step_inputs::text[], :step_outputs::text[], :steps_truncated::bool[],
                :step_errors::text[], :steps_started::timestamptz[],
                :steps_finished::timestamptz[])
         AS r(execution_id, lease, seq, step_id, step_type, status, attempts, input, output,
              truncated, error, started, finished)
    JOIN u ON u.id = r.execution_id AND u.lease = r.lease
),
t AS (
  INSERT INTO timers (id, tenant_id, execution_id, workflow_id, region, seq, due_at, status,
                      created_at)
  SELECT tm.id, u.tenant_id, u.id, tm.workflow_id, tm.region, tm.seq, tm.due_at, 'pending',
         tm.now
    FROM unnest(:timer_execs::text[], :timer_leases::int[], :timer_ids::text[],
                :timer_workflows::text[], :timer_regions::text[], :timer_seqs::int[],
                :timer_dues::timestamptz[], :timer_nows::timestamptz[])
         AS tm(execution_id, lease, id, workflow_id, region, seq, due_at, now)
    JOIN u ON u.id = tm.execution_id AND u.lease = tm.lease
   WHERE u.status = 'waiting'
  ON CONFLICT (execution_id, seq) DO UPDATE
     SET id = EXCLUDED.id, due_at = EXCLUDED.due_at, status = 'pending', claimed_by = NULL,
         claimed_until = NULL, fired_at = NULL, created_at = EXCLUDED.created_at
)
SELECT id, lease, status FROM u
""")
"""Many executions' writes in one statement: each row fenced by its own lease (an unleased
run's: claimed by it, see :data:`_CLAIMING_FENCE`); the step runs and timers of the rows the
update returned (by id and lease) inserted with them. The rows returned are the writes that
happened."""


_PARTITIONS = """
SELECT p.relname AS parent, c.relname AS name, pg_get_expr(c.relpartbound, c.oid) AS bound
  FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
  JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n ON n.oid = p.relnamespace
 WHERE n.nspname = current_schema() AND p.relname = ANY($1::text[])
   AND c.relnamespace = p.relnamespace
"""
_PARTITION_NAME = re.compile(r"(executions|step_runs)_p[0-9]{8}", re.ASCII)
_CANONICAL_ID = re.compile(r"[0-9a-f]{32}", re.ASCII)
"""An id as :func:`~conveyor.store.new_id` makes them: the only ids whose order here (Python's)
is the partition key's order under any collation the database may use."""


class PartitionMap:
    """Which daily partition of ``executions`` / ``step_runs`` holds an execution id, read
    from the catalog (see :mod:`conveyor.store.partitions`) at most every
    :attr:`refresh_s` seconds.

    Why: a batch's statement joins ``unnest`` of its ids, which leaves PostgreSQL nothing to
    prune partitions with when it plans, so on the parent table it plans and opens every
    partition, for every batch (custom plans: the batch's size changes the best plan). Named
    partitions, measured with five partitions (a retention of 30 days keeps 34): the write of
    20 one-step executions planned in 0.25 ms instead of 0.52-0.81 ms and ran in 0.65 ms
    instead of 0.75-1.09 ms; the writing backend's CPU per statement went from ~1.7 ms to
    ~1.1 ms (20 executions), ~1.2 to ~0.7 ms (5), ~1.0 to ~0.6 ms (1). And with statistics
    behind a burst (20,000 executions inserted, not analyzed yet), the parent's plan for 50
    hash-joined a sequential scan of the whole day (7.9 ms) where the partition's kept its
    primary key lookups (2.0 ms).

    What it answers is a hint, never trusted for correctness (:meth:`PgRunStore._statement`):
    only ids as :func:`~conveyor.store.new_id` makes them are mapped (32 lowercase hex digits:
    in that alphabet Python's order is the key's order under any collation); an id no
    partition known here covers (a day created since the last read, the default partition)
    gets ``None`` — the parent table; the statement on a partition checks that it is still
    attached to its parent, and the executions it did not find are asked again on the parent
    (a partition detached, or dropped and created again with other bounds, since the last
    read); one that fails (a partition dropped since, no privilege on partitions) is sent
    again on the parent, and the map answers ``None`` for :attr:`refresh_s` (:meth:`refused`).
    """

    refresh_s = 60.0
    retry_s = 5.0
    """After a failed read of the catalog: the parent tables until then."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self._ranges: dict[str, list[tuple[str, str, str]]] = {}
        """Table -> its daily partitions' ``(lower, upper, name)``, by lower bound."""
        self._lowers: dict[str, list[str]] = {}
        self._due = 0.0
        """``time.monotonic()`` from which the catalog is read again."""
        self._refusals = 0
        """:meth:`refused` calls so far: a read that started before one keeps nothing."""
        self._lock = asyncio.Lock()

    async def holding(self, table: str, first: str, last: str) -> str | None:
        """The daily partition of ``table`` holding every id from ``first`` to ``last`` (in
        Python's order: canonical ids only, see :meth:`PgRunStore._statement`); ``None`` when
        none known here does (use the parent table)."""
        if time.monotonic() >= self._due:
            await self._read()
        lowers = self._lowers.get(table)
        if not lowers:
            return None
        i = bisect_right(lowers, first) - 1
        if i < 0:
            return None
        lower, upper, name = self._ranges[table][i]
        return name if lower <= first and last < upper else None

    def refused(self) -> None:
        """A statement naming partitions failed for the tables it names (not for its rows:
        :func:`~conveyor.store._errors.is_row_error`): the parent tables for :attr:`refresh_s`
        (one failure a minute, not one a batch, when partitions cannot be named), then the
        catalog is read again."""
        self._refusals += 1
        self._ranges, self._lowers = {}, {}
        self._due = time.monotonic() + self.refresh_s

    async def _read(self) -> None:
        async with self._lock:
            if time.monotonic() < self._due:
                return  # read (or refused) meanwhile
            refusals = self._refusals
            try:
                rows = await call(self._pool, "fetch", _PARTITIONS, list(PARTITIONED))
            except ConveyorError as exc:
                log.warning("store.partitions_unread", extra={"error": repr(exc)})
                self._ranges, self._lowers = {}, {}
                self._due = time.monotonic() + self.retry_s
                return
            if refusals != self._refusals:
                return  # refused while reading: what was read may predate it
            ranges: dict[str, list[tuple[str, str, str]]] = {}
            for row in rows:
                bounds = partition_bounds(row["bound"])
                name = _PARTITION_NAME.fullmatch(row["name"])
                if bounds is not None and name is not None and name.group(1) == row["parent"]:
                    ranges.setdefault(row["parent"], []).append((*bounds, row["name"]))
            for parts in ranges.values():
                parts.sort()
            self._ranges = ranges
            self._lowers = {table: [p[0] for p in parts] for table, parts in ranges.items()}
            self._due = time.monotonic() + self.refresh_s


def _on_partitions(sql: str, executions: str, step_runs: str | None) -> str:
    """``sql`` (:data:`_CLAIM_MANY` / :data:`_WRITE_MANY`) on the named partitions rather
    than on their parent tables, its update matching no row unless each is still attached
    to its parent (an uncorrelated ``EXISTS``: one catalog lookup per statement)."""
    named = {"executions": executions}
    targets = [("UPDATE executions e", f'UPDATE "{executions}" e')]
    if step_runs is not None:
        named["step_runs"] = step_runs
        targets.append(("INSERT INTO step_runs ", f'INSERT INTO "{step_runs}" '))
    attached = " AND ".join(
        f"EXISTS (SELECT FROM pg_inherits WHERE inhrelid = '\"{name}\"'::regclass"
        f" AND inhparent = '{parent}'::regclass)"
        for parent, name in named.items()
    )
    targets.append(("WHERE e.id = x.id AND ", f"WHERE e.id = x.id AND {attached} AND "))
    for parent, partition in targets:
        assert sql.count(parent) == 1, parent
        sql = sql.replace(parent, partition)
    return sql


@dataclass(frozen=True, slots=True)
class _ClaimRequest:
    execution_id: str
    now: datetime
    lease_until: datetime


@dataclass(frozen=True, slots=True)
class _WriteRequest:
    claim: Claim
    execution: ExecutionWrite
    steps: Sequence[StepWrite]
    timer: TimerWrite | None


_Claimed = Claim | None | ConveyorError
"""A claim's answer in a batch: the claim, ``None`` when the execution was not claimable, or the
error the database gave for it alone."""

_Written = str | None | ConveyorError
"""A write's answer in a batch: the execution's status, ``None`` when it was fenced out, or the
error the database gave for it alone."""


class PgRunStore:
    """:class:`~conveyor.store.runs.RunStore` on a raw asyncpg pool.

    :meth:`session` binds one pooled connection to a run (acquired on first use, given back
    by :meth:`_PgSession.idle` before a step waits on I/O), saving a pool round per statement.
    Claims and writes go through the group commits :attr:`claims` and :attr:`writes` (see the
    module docstring), on connections of their own.
    """

    def __init__(self, pool: Any) -> None:
        self._pool = pool
        self.partitions = PartitionMap(pool)
        self._targeted: dict[tuple[str, str, str | None], str] = {}
        self.claims: GroupCommit[_ClaimRequest, _Claimed] = GroupCommit(
            self._claim_one, self._claim_many, name="store.claim_batch", orphaned=self._unwanted
        )
        self.writes: GroupCommit[_WriteRequest, _Written] = GroupCommit(
            self._write_one, self._write_many, name="store.write_batch", orphaned=self._unheard
        )
        self._releases: set[asyncio.Task[None]] = set()
        self.peeks: GroupCommit[tuple[str, datetime], Claim | None] = GroupCommit(
            self._peek_one, self._peek_many, name="store.peek_batch"
        )

    @asynccontextmanager
    async def session(self) -> AsyncIterator[_PgSession]:
        session = _PgSession(self)
        try:
            yield session
        finally:
            await session.idle()

    async def idle(self) -> None:
        return None

    async def claim(self, execution_id: str, now: datetime, lease_until: datetime) -> Claim | None:
        claimed = await self.claims.submit(_ClaimRequest(execution_id, now, lease_until))
        if isinstance(claimed, ConveyorError):
            raise claimed
        return claimed

    async def peek(self, execution_id: str, now: datetime) -> Claim | None:
        return await self.peeks.submit((execution_id, now))

    async def unclaimed(self, execution_id: str) -> Unclaimed:
        async with self.session() as session:
            return await session.unclaimed(execution_id)

    async def completed_outputs(self, tenant_id: str, execution_id: str) -> dict[str, Any]:
        async with self.session() as session:
            return await session.completed_outputs(tenant_id, execution_id)

    async def write(
        self,
        claim: Claim,
        execution: ExecutionWrite,
        steps: Sequence[StepWrite],
        timer: TimerWrite | None = None,
    ) -> str:
        written = await self.writes.submit(_WriteRequest(claim, execution, steps, timer))
        if isinstance(written, ConveyorError):
            raise written
        if written is None:
            raise LeaseLost(execution_id=claim.execution_id, lease=claim.lease)
        return written

    async def renew(self, claim: Claim, lease_until: datetime) -> None:
        async with self.session() as session:
            await session.renew(claim, lease_until)

    async def release(self, claim: Claim, now: datetime) -> None:
        async with self.session() as session:
            await session.release(claim, now)

    async def written(self, claim: Claim, seq: int) -> str | None:
        async with self.session() as session:
            return await session.written(claim, seq)

    # --- what a cancelled caller left ---------------------------------------------------------

    def _unwanted(self, r: _ClaimRequest, claimed: _Claimed) -> None:
        """A claim made for a caller that was cancelled meanwhile (a worker stopping, a job cut
        off): nobody runs it — give the lease back at once, not when it expires."""
        if isinstance(claimed, Claim):
            self._release_later(claimed, r.now)

    def _unheard(self, r: _WriteRequest, written: _Written) -> None:
        """A write that landed after its runner was cancelled: a run cancelled mid-write
        releases its lease at once, and this write, landing after the release, set the lease's
        expiry again — give it back again."""
        if written == "running":
            self._release_later(r.claim, r.execution.now)

    def _release_later(self, claim: Claim, now: datetime) -> None:
        task = asyncio.get_running_loop().create_task(
            self._release_quietly(claim, now), name="store.release_unwanted"
        )
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release_quietly(self, claim: Claim, now: datetime) -> None:
        try:
            async with asyncio.timeout(5.0):
                await call(self._pool, "execute", _RELEASE, claim.execution_id, claim.lease, now)
        except Exception as exc:  # the lease then expires by itself
            log.warning(
                "store.release_failed",
                extra={"execution_id": claim.execution_id, "error": repr(exc)[:300]},
            )

    # --- the group commits' senders ---------------------------------------------------------

    async def _claim_one(self, r: _ClaimRequest) -> Claim | None:
        row = await call(self._pool, "fetchrow", _CLAIM, r.execution_id, r.now, r.lease_until)
        return None if row is None else _claim_of(r.execution_id, row)

    async def _claim_many(
        self, requests: Sequence[_ClaimRequest], *, parent: bool = False
    ) -> list[_Claimed]:
        first: dict[str, _ClaimRequest] = {}
        for r in requests:  # the same execution twice: the first asks, the others find it BUSY
            first.setdefault(r.execution_id, r)
        # in id order: two processes' batches lock their common rows in the same order
        unique = sorted(first.values(), key=lambda r: r.execution_id)
        ids = [r.execution_id for r in unique]
        sql = _CLAIM_MANY if parent else await self._statement(_CLAIM_MANY, ids)
        try:
            rows = await call(
                self._pool,
                "fetch",
                sql,
                ids,
                [r.now for r in unique],
                [r.lease_until for r in unique],
            )
        except DatabaseUnavailable:
            raise
        except ConveyorError as exc:  # e.g. a deadlock with another process's batch: one by one
            if sql is not _CLAIM_MANY and not is_row_error(exc):  # or the partitions could not
                self.partitions.refused()  # be named: the parent
                return await self._claim_many(requests, parent=True)
            # one by one, each answered alone (see each_alone); a repeat finds it BUSY
            alone = iter(await each_alone([r for r in requests if first[r.execution_id] is r],
                                          self._claim_one))  # fmt: skip
            return [next(alone) if first[r.execution_id] is r else None for r in requests]
        claims: dict[str, _Claimed] = {row["id"]: _claim_of(row["id"], row) for row in rows}
        if sql is not _CLAIM_MANY:  # what the partition did not have, the parent may
            missed = [r for r in unique if r.execution_id not in claims]
            if missed:
                again = await self._claim_many(missed, parent=True)
                claims.update(zip([r.execution_id for r in missed], again, strict=True))
        return [
            claims.get(r.execution_id) if first[r.execution_id] is r else None for r in requests
        ]

    async def _statement(self, sql: str, ids: Sequence[str]) -> str:
        """``sql`` (a batch's: :data:`_CLAIM_MANY`, :data:`_WRITE_MANY`) on the daily
        partitions that hold ``ids`` (sorted) when one of each table does, else ``sql`` itself
        (see :class:`PartitionMap`: a hint; the callers ask the parent for what it missed)."""
        first, last = ids[0], ids[-1]
        executions = await self.partitions.holding("executions", first, last)
        if executions is None or not all(map(_CANONICAL_ID.fullmatch, ids)):
            return sql
        step_runs = None
        if sql is _WRITE_MANY:
            step_runs = await self.partitions.holding("step_runs", first, last)
            if step_runs is None:
                return sql
        key = (sql, executions, step_runs)
        targeted = self._targeted.get(key)
        if targeted is None:
            if len(self._targeted) >= 64:  # a few days' worth; the statement cache's share
                self._targeted.clear()
            targeted = self._targeted[key] = _on_partitions(sql, executions, step_runs)
        return targeted

    async def _peek_one(self, r: tuple[str, datetime]) -> Claim | None:
        row = await call(self._pool, "fetchrow", _PEEK, r[0])
        return _peeked(r[0], row, r[1])

    async def _peek_many(self, requests: Sequence[tuple[str, datetime]]) -> list[Claim | None]:
        rows = await call(
            self._pool, "fetch", _PEEK_MANY, list(dict.fromkeys(eid for eid, _now in requests))
        )
        read = {row["id"]: row for row in rows}
        return [_peeked(eid, read.get(eid), now) for eid, now in requests]

    async def _write_one(self, r: _WriteRequest) -> _Written:
        sql, order = _WRITES[(min(len(r.steps), 2), r.timer is not None, r.claim.unleased)]
        values = _write_values(r.claim, r.execution, r.steps, r.timer)
        try:
            status = await call(self._pool, "fetchval", sql, *[values[n] for n in order])
        except DatabaseUnavailable:
            raise
        except ConveyorError as exc:
            return exc
        return None if status is None else str(status)

    async def _write_many(
        self, requests: Sequence[_WriteRequest], *, parent: bool = False
    ) -> list[_Written]:
        # one row per (execution, lease): two unleased runs of one execution in this process
        # read the same lease — the first is sent, the other is told it lost (it wrote
        # nothing); an unleased run and the claim made since its read have the same number —
        # the claim's write is sent (the read is stale: its write could only be fenced out)
        keys = [(r.claim.execution_id, r.claim.lease) for r in requests]
        first: dict[tuple[str, int], _WriteRequest] = {}
        for r, key in zip(requests, keys, strict=True):
            kept = first.get(key)
            if kept is None or (kept.claim.unleased and not r.claim.unleased):
                first[key] = r
        unique = sorted(first.values(), key=lambda r: r.claim.execution_id)
        values = _write_many_values(unique)
        sql = _WRITE_MANY if parent else await self._statement(_WRITE_MANY, values["ids"])
        try:
            rows = await call(self._pool, "fetch", sql, *[values[n] for n in _WRITE_MANY_ORDER])
        except DatabaseUnavailable:
            raise
        except ConveyorError as exc:  # refused for one execution's sake (or a deadlock): one
            if sql is not _WRITE_MANY and not is_row_error(exc):  # by one; or the partitions
                self.partitions.refused()  # could not be named: the parent
                return await self._write_many(requests, parent=True)
            return [await self._write_one(r) for r in requests]
        written: dict[tuple[str, int], _Written] = {
            (row["id"], row["lease"]): str(row["status"]) for row in rows
        }
        if sql is not _WRITE_MANY:  # what the partition did not have, the parent may
            missed = [r for r in unique if (r.claim.execution_id, r.claim.lease) not in written]
            if missed:
                again = await self._write_many(missed, parent=True)
                written.update(
                    zip([(r.claim.execution_id, r.claim.lease) for r in missed], again, strict=True)
                )
        return [
            written.get(k) if first[k] is r else None for r, k in zip(requests, keys, strict=True)
        ]


def _peeked(execution_id: str, row: Any, now: datetime) -> Claim | None:
    """A peek's answer: the unleased claim of a queued execution, else ``None``."""
    if row is None or row["status"] != "queued":
        return None
    return unleased_claim(_claim_of(execution_id, row), now)


def _claim_of(execution_id: str, row: Any) -> Claim:
    raw_input = row["input"]
    return Claim(
        execution_id=execution_id,
        tenant_id=row["tenant_id"],
        workflow_id=row["workflow_id"],
        workflow_version=row["workflow_version"],
        region=row["region"],
        input=None if raw_input is None else json.loads(raw_input),
        next_step=row["next_step"],
        steps_run=row["steps_run"],
        lease=row["lease"],
        attempts=row["attempts"],
        queued_at=row["queued_at"],
        started_at=row["started_at"],
        step_attempt=row["step_attempt"],
        step_errors=None if row["step_errors"] is None else json.loads(row["step_errors"]),
        step_started_at=row["step_started_at"],
        parent_execution_id=row["parent_execution_id"],
        depth=row["depth"],
        parent_seq=row["parent_seq"],
        branch=row["branch"],
    )


def _write_values(
    claim: Claim, x: ExecutionWrite, steps: Sequence[StepWrite], timer: TimerWrite | None
) -> dict[str, Any]:
    """The arguments of one execution's write (:data:`_WRITES`), by name."""
    values: dict[str, Any] = {
        "id": claim.execution_id,
        "lease": claim.lease,
        "started": claim.started_at,
        "status": x.status,
        "next_step": x.next_step,
        "steps_run": x.steps_run,
        "output": x.output_json,
        "error": x.error_json,
        "finished_at": x.finished_at,
        "wake_at": x.wake_at,
        "lease_expires_at": x.lease_expires_at,
        "cursor_attempt": x.step_attempt,
        "cursor_errors": x.step_errors_json,
        "cursor_started": x.step_started_at,
        "now": x.now,
    }
    if len(steps) > 1:
        values.update(_step_columns(steps))
    elif steps:
        step = steps[0]
        values.update(
            seq=step.seq,
            step_id=step.step_id,
            step_type=step.step_type,
            step_status=step.status,
            step_attempts=step.attempts,
            step_input=step.input_json,
            step_output=step.output_json,
            step_truncated=step.output_truncated,
            step_error=step.error_json,
            step_started=step.started_at,
            step_finished=step.finished_at,
        )
    if timer is not None:
        values.update(
            timer_id=timer.id,
            timer_workflow=timer.workflow_id,
            timer_region=timer.region,
            timer_seq=timer.seq,
            timer_due=timer.due_at,
        )
    return values


def _step_columns(steps: Sequence[StepWrite]) -> dict[str, list[Any]]:
    """Step runs as one array per column (the ``unnest`` of :data:`_STEPS`)."""
    return {
        "seqs": [st.seq for st in steps],
        "step_ids": [st.step_id for st in steps],
        "step_types": [st.step_type for st in steps],
        "step_statuses": [st.status for st in steps],
        "steps_attempts": [st.attempts for st in steps],
        "step_inputs": [st.input_json for st in steps],
        "step_outputs": [st.output_json for st in steps],
        "steps_truncated": [st.output_truncated for st in steps],
        "step_errors": [st.error_json for st in steps],
        "steps_started": [st.started_at for st in steps],
        "steps_finished": [st.finished_at for st in steps],
    }


def _write_many_values(requests: Sequence[_WriteRequest]) -> dict[str, list[Any]]:
    """The arguments of :data:`_WRITE_MANY`, by name: one array per column."""
    steps = [(r.claim, st) for r in requests for st in r.steps]
    timers = [(r.claim, r.execution.now, r.timer) for r in requests if r.timer is not None]
    return {
        "ids": [r.claim.execution_id for r in requests],
        "leases": [r.claim.lease for r in requests],
        "statuses": [r.execution.status for r in requests],
        "next_steps": [r.execution.next_step for r in requests],
        "steps_runs": [r.execution.steps_run for r in requests],
        "outputs": [r.execution.output_json for r in requests],
        "errors": [r.execution.error_json for r in requests],
        "finished": [r.execution.finished_at for r in requests],
        "wakes": [r.execution.wake_at for r in requests],
        "lease_untils": [r.execution.lease_expires_at for r in requests],
        "cursor_attempts": [r.execution.step_attempt for r in requests],
        "cursor_errors": [r.execution.step_errors_json for r in requests],
        "cursor_started": [r.execution.step_started_at for r in requests],
        "nows": [r.execution.now for r in requests],
        "claims": [1 if r.claim.unleased else 0 for r in requests],
        "started": [r.claim.started_at if r.claim.unleased else None for r in requests],
        "step_execs": [claim.execution_id for claim, _st in steps],
        "step_leases": [claim.lease for claim, _st in steps],
        **_step_columns([st for _claim, st in steps]),
        "timer_execs": [claim.execution_id for claim, _now, _t in timers],
        "timer_leases": [claim.lease for claim, _now, _t in timers],
        "timer_ids": [t.id for _c, _now, t in timers],
        "timer_workflows": [t.workflow_id for _c, _now, t in timers],
        "timer_regions": [t.region for _c, _now, t in timers],
        "timer_seqs": [t.seq for _c, _now, t in timers],
        "timer_dues": [t.due_at for _c, _now, t in timers],
        "timer_nows": [now for _c, now, _t in timers],
    }


class _PgSession:
    """The statements, on one connection held between calls until :meth:`idle`; claims and
    writes go to the store's group commits (the held connection is given back first: a batch
    needs a connection of its own, and runs holding the pool's connections while they wait for
    it would starve it)."""

    def __init__(self, store: PgRunStore) -> None:
        self._store = store
        self._pool = store._pool
        self._con: Any = None

    async def _connection(self) -> Any:
        if self._con is None:
            with translate_errors():
                self._con = await self._pool.acquire()
        return self._con

    async def idle(self) -> None:
        """Give the connection back to the pool (the next call takes one again)."""
        con, self._con = self._con, None
        if con is not None:
            await self._pool.release(con)

    async def _call(self, method: str, sql: str, *args: Any) -> Any:
        """``con.<method>(sql, *args)`` on the held connection. A broken connection is
        discarded (never reused); a statement that provably never reached the server is sent
        once more on a fresh one (see :mod:`conveyor.store.pg._conn`)."""
        retried = False
        while True:
            con = await self._connection()
            try:
                with translate_errors():
                    return await getattr(con, method)(sql, *args)
            except DatabaseUnavailable as exc:
                self._con = None
                await discard(self._pool, con)
                if retried or not never_sent(exc):
                    raise
                await self._pool.expire_connections()
                retried = True

    @asynccontextmanager
    async def session(self) -> AsyncIterator[_PgSession]:
        yield self

    async def claim(self, execution_id: str, now: datetime, lease_until: datetime) -> Claim | None:
        await self.idle()
        return await self._store.claim(execution_id, now, lease_until)

    async def peek(self, execution_id: str, now: datetime) -> Claim | None:
        await self.idle()
        return await self._store.peek(execution_id, now)

    async def unclaimed(self, execution_id: str) -> Unclaimed:
        row = await self._call("fetchrow", _UNCLAIMED, execution_id)
        if row is None:
            return Unclaimed(None)
        return Unclaimed(row["status"], row["lease_expires_at"], row["wake_at"])

    async def completed_outputs(self, tenant_id: str, execution_id: str) -> dict[str, Any]:
        rows = await self._call("fetch", _OUTPUTS, tenant_id, execution_id)
        return {
            r["step_id"]: None if r["output"] is None else json.loads(r["output"]) for r in rows
        }

    async def write(
        self,
        claim: Claim,
        execution: ExecutionWrite,
        steps: Sequence[StepWrite],
        timer: TimerWrite | None = None,
    ) -> str:
        await self.idle()
        return await self._store.write(claim, execution, steps, timer)

    async def renew(self, claim: Claim, lease_until: datetime) -> None:
        found = await self._call("fetchval", _RENEW, claim.execution_id, claim.lease, lease_until)
        if found is None:
            raise LeaseLost(execution_id=claim.execution_id, lease=claim.lease)

    async def release(self, claim: Claim, now: datetime) -> None:
        await self._call("execute", _RELEASE, claim.execution_id, claim.lease, now)

    async def written(self, claim: Claim, seq: int) -> str | None:
        status = await self._call("fetchval", _WRITTEN, claim.execution_id, seq, claim.lease)
        return None if status is None else str(status)
