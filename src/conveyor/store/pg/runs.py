"""The engine's hot path on Postgres: raw asyncpg prepared statements.

Per execution of a one-step workflow this is two round trips and two commits: the claim
(``UPDATE … RETURNING``) and the step write, in which the step run insert, the execution
update (fenced by ``lease``) and, for a ``delay`` step, the timer insert are ONE statement
(data-modifying CTEs are atomic); pure steps run before it ride along in the same statement
(``unnest`` of one array per column). Connections come from a dedicated asyncpg pool whose release
costs no round trip. Statements run in autocommit mode: each is its own transaction.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from conveyor.errors import DatabaseUnavailable, LeaseLost
from conveyor.store._errors import never_sent, translate_errors
from conveyor.store.pg._conn import discard
from conveyor.store.runs import Claim, ExecutionWrite, StepWrite, TimerWrite, Unclaimed

__all__ = ["PgRunStore"]


def _numbered(sql: str) -> tuple[str, tuple[str, ...]]:
    """``:name`` placeholders → ``$n`` (same name, same number); returns the argument order."""
    order: list[str] = []

    def number(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in order:
            order.append(name)
        return f"${order.index(name) + 1}"

    return re.sub(r"(?<!:):([a-z_]+)", number, sql), tuple(order)


_CLAIM = """
UPDATE executions
   SET lease = lease + 1, status = 'running',
       -- a delivery that runs work is an attempt; resuming when a delay timer is due is not
       attempts = attempts + CASE WHEN status = 'waiting' THEN 0 ELSE 1 END,
       started_at = COALESCE(started_at, $2), lease_expires_at = $3, wake_at = NULL,
       updated_at = $2
 WHERE id = $1
   AND (status = 'queued'
        OR (status = 'running' AND (lease_expires_at IS NULL OR lease_expires_at <= $2))
        OR (status = 'waiting' AND wake_at <= $2))
RETURNING tenant_id, workflow_id, workflow_version, region, input, next_step, steps_run,
          lease, attempts, queued_at, started_at, step_attempt, step_errors, step_started_at,
          parent_execution_id, depth
"""

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
  UPDATE executions SET
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
  WHERE id = :id::text AND lease = :lease::int
  RETURNING tenant_id, status
)"""

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


def _write_sql(steps: int, with_timer: bool) -> tuple[str, tuple[str, ...]]:
    parts = [_UPDATE] + [[], [_STEP], [_STEPS]][steps] + ([_TIMER] if with_timer else [])
    return _numbered("WITH " + ",".join(parts) + "\nSELECT status FROM u")


_WRITES = {(s, t): _write_sql(s, t) for s in (0, 1, 2) for t in (False, True)}
"""By (number of step runs: none, one, several; with a timer)."""


class PgRunStore:
    """:class:`~conveyor.store.runs.RunStore` on a raw asyncpg pool.

    :meth:`session` binds one pooled connection to a run (acquired on first use, given back
    by :meth:`_PgSession.idle` before a step waits on I/O), saving a pool round per statement.
    """

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    @asynccontextmanager
    async def session(self) -> AsyncIterator[_PgSession]:
        session = _PgSession(self._pool)
        try:
            yield session
        finally:
            await session.idle()

    async def idle(self) -> None:
        return None

    async def claim(self, execution_id: str, now: datetime, lease_until: datetime) -> Claim | None:
        async with self.session() as session:
            return await session.claim(execution_id, now, lease_until)

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
        async with self.session() as session:
            return await session.write(claim, execution, steps, timer)

    async def renew(self, claim: Claim, lease_until: datetime) -> None:
        async with self.session() as session:
            await session.renew(claim, lease_until)

    async def release(self, claim: Claim, now: datetime) -> None:
        async with self.session() as session:
            await session.release(claim, now)

    async def written(self, claim: Claim, seq: int) -> str | None:
        async with self.session() as session:
            return await session.written(claim, seq)


class _PgSession:
    """The statements, on one connection held between calls until :meth:`idle`."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool
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
        row = await self._call("fetchrow", _CLAIM, execution_id, now, lease_until)
        if row is None:
            return None
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
        )

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
        sql, order = _WRITES[(min(len(steps), 2), timer is not None)]
        x = execution
        values: dict[str, Any] = {
            "id": claim.execution_id,
            "lease": claim.lease,
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
            values.update(
                seqs=[st.seq for st in steps],
                step_ids=[st.step_id for st in steps],
                step_types=[st.step_type for st in steps],
                step_statuses=[st.status for st in steps],
                steps_attempts=[st.attempts for st in steps],
                step_inputs=[st.input_json for st in steps],
                step_outputs=[st.output_json for st in steps],
                steps_truncated=[st.output_truncated for st in steps],
                step_errors=[st.error_json for st in steps],
                steps_started=[st.started_at for st in steps],
                steps_finished=[st.finished_at for st in steps],
            )
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
        status = await self._call("fetchval", sql, *[values[name] for name in order])
        if status is None:
            raise LeaseLost(execution_id=claim.execution_id, lease=claim.lease)
        return str(status)

    async def renew(self, claim: Claim, lease_until: datetime) -> None:
        found = await self._call("fetchval", _RENEW, claim.execution_id, claim.lease, lease_until)
        if found is None:
            raise LeaseLost(execution_id=claim.execution_id, lease=claim.lease)

    async def release(self, claim: Claim, now: datetime) -> None:
        await self._call("execute", _RELEASE, claim.execution_id, claim.lease, now)

    async def written(self, claim: Claim, seq: int) -> str | None:
        status = await self._call("fetchval", _WRITTEN, claim.execution_id, seq, claim.lease)
        return None if status is None else str(status)
