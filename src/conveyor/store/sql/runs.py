"""The engine's hot path on SQLAlchemy Core (SQLite; any backend): one transaction per write.

See :mod:`conveyor.store.runs` for the contract (fencing by lease number, cancellation kept).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, case, func, null, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from conveyor.errors import LeaseLost
from conveyor.store._db import autocommit
from conveyor.store._errors import translate_errors
from conveyor.store._types import JSONType
from conveyor.store.runs import (
    Claim,
    ExecutionWrite,
    StepWrite,
    TimerWrite,
    Unclaimed,
    unleased_claim,
)
from conveyor.store.schema import executions, step_runs, timers

__all__ = ["SqlRunStore", "write_in"]


_CLAIM_RETURNS = (
    executions.c.tenant_id,
    executions.c.workflow_id,
    executions.c.workflow_version,
    executions.c.region,
    executions.c.input,
    executions.c.next_step,
    executions.c.steps_run,
    executions.c.lease,
    executions.c.attempts,
    executions.c.queued_at,
    executions.c.started_at,
    executions.c.step_attempt,
    executions.c.step_errors,
    executions.c.step_started_at,
    executions.c.parent_execution_id,
    executions.c.depth,
    executions.c.parent_seq,
    executions.c.branch,
)


def _keep_if_cancelled(column: Any, value: Any) -> Any:
    return case((executions.c.status == "cancelled", column), else_=value)


def _build_statements() -> dict[str, Any]:
    """Statements built once with bind parameters (no per-call construction or cache keys)."""
    e = executions.c
    when = e.started_at.type
    now = bindparam("now", type_=when)
    claim = (
        update(executions)
        .where(
            e.id == bindparam("eid"),
            or_(
                e.status == "queued",
                (e.status == "running")
                & (e.lease_expires_at.is_(None) | (e.lease_expires_at <= now)),
                (e.status == "waiting") & (e.wake_at <= now),
            ),
        )
        .values(
            lease=e.lease + 1,
            status="running",
            # a delivery that runs work is an attempt; resuming when a delay timer is due is not
            attempts=e.attempts + case((e.status == "waiting", 0), else_=1),
            started_at=func.coalesce(e.started_at, now),
            lease_expires_at=bindparam("until", type_=when),
            wake_at=None,
            updated_at=now,
        )
        .returning(*_CLAIM_RETURNS)
    )
    written = {
        "status": _keep_if_cancelled(e.status, bindparam("status", type_=e.status.type)),
        "next_step": bindparam("next_step"),
        "steps_run": bindparam("steps_run"),
        "output": _keep_if_cancelled(e.output, bindparam("output", type_=JSONType)),
        "error": _keep_if_cancelled(e.error, bindparam("error", type_=JSONType)),
        "finished_at": _keep_if_cancelled(e.finished_at, bindparam("finished_at", type_=when)),
        "wake_at": _keep_if_cancelled(null(), bindparam("wake_at", type_=when)),
        "lease_expires_at": bindparam("lease_until", type_=when),
        "step_attempt": bindparam("step_attempt"),
        "step_errors": bindparam("step_errors", type_=JSONType),
        "step_started_at": bindparam("step_started_at", type_=when),
        "updated_at": now,
    }
    write = (
        update(executions)
        .where(e.id == bindparam("eid"), e.lease == bindparam("mine"))
        .values(**written)
        .returning(e.status)
    )
    # an unleased run's write claims the execution too: still queued under the lease it read
    claiming_write = (
        update(executions)
        .where(e.id == bindparam("eid"), e.lease == bindparam("mine") - 1, e.status == "queued")
        .values(
            **written,
            lease=bindparam("mine"),
            attempts=e.attempts + 1,
            started_at=func.coalesce(e.started_at, bindparam("started", type_=when)),
        )
        .returning(e.status)
    )
    fence = (e.id == bindparam("eid")) & (e.lease == bindparam("mine"))
    return {
        "claim": claim,
        "write": write,
        "claiming_write": claiming_write,
        "peek": select(e.status, *_CLAIM_RETURNS).where(e.id == bindparam("eid")),
        "unclaimed": select(e.status, e.lease_expires_at, e.wake_at).where(
            e.id == bindparam("eid")
        ),
        "outputs": (
            select(step_runs.c.step_id, step_runs.c.output)
            .where(
                step_runs.c.tenant_id == bindparam("tid"),
                step_runs.c.execution_id == bindparam("eid"),
                step_runs.c.status == "succeeded",
            )
            .order_by(step_runs.c.seq)
        ),
        "step": step_runs.insert(),
        "timer": timers.insert(),
        # a later wait of the same step (its next retry) takes the step's timer row over
        "timer_again": update(timers)
        .where(timers.c.execution_id == bindparam("b_eid"), timers.c.seq == bindparam("b_seq"))
        .values(
            id=bindparam("b_id"),
            due_at=bindparam("b_due", type_=when),
            status="pending",
            claimed_by=None,
            claimed_until=None,
            fired_at=None,
            created_at=bindparam("b_now", type_=when),
        ),
        "renew": update(executions)
        .where(fence)
        .values(lease_expires_at=bindparam("until", type_=when)),
        "release": update(executions)
        .where(fence, e.status == "running")
        .values(lease_expires_at=bindparam("until", type_=when)),
    }


_SQL = _build_statements()


class SqlRunStore:
    """:class:`RunStore` on SQLAlchemy Core (used for SQLite, and as the Postgres baseline)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._single = autocommit(engine)  # for single statements: atomic on their own

    @asynccontextmanager
    async def session(self) -> AsyncIterator[SqlRunStore]:
        yield self

    async def idle(self) -> None:
        return None

    async def claim(self, execution_id: str, now: datetime, lease_until: datetime) -> Claim | None:
        params = {"eid": execution_id, "now": now, "until": lease_until}
        with translate_errors():
            async with self._single.connect() as conn:
                row = (await conn.execute(_SQL["claim"], params)).first()
        if row is None:
            return None
        return Claim(execution_id=execution_id, **row._mapping)

    async def peek(self, execution_id: str, now: datetime) -> Claim | None:
        with translate_errors():
            async with self._single.connect() as conn:
                row = (await conn.execute(_SQL["peek"], {"eid": execution_id})).first()
        if row is None or row.status != "queued":
            return None
        read = {k: v for k, v in row._mapping.items() if k != "status"}
        return unleased_claim(Claim(execution_id=execution_id, **read), now)

    async def unclaimed(self, execution_id: str) -> Unclaimed:
        with translate_errors():
            async with self._single.connect() as conn:
                row = (await conn.execute(_SQL["unclaimed"], {"eid": execution_id})).first()
        return Unclaimed(None) if row is None else Unclaimed(**row._mapping)

    async def completed_outputs(self, tenant_id: str, execution_id: str) -> dict[str, Any]:
        params = {"tid": tenant_id, "eid": execution_id}
        with translate_errors():
            async with self._single.connect() as conn:
                rows = (await conn.execute(_SQL["outputs"], params)).all()
        return {r.step_id: r.output for r in rows}

    async def write(
        self,
        claim: Claim,
        execution: ExecutionWrite,
        steps: Sequence[StepWrite],
        timer: TimerWrite | None = None,
    ) -> str:
        with translate_errors():
            async with self._engine.begin() as conn:
                status = await write_in(conn, claim, execution, steps, timer)
        if status is None:
            raise LeaseLost(execution_id=claim.execution_id, lease=claim.lease)
        return status

    async def renew(self, claim: Claim, lease_until: datetime) -> None:
        params = {"eid": claim.execution_id, "mine": claim.lease, "until": lease_until}
        with translate_errors():
            async with self._single.connect() as conn:
                result = await conn.execute(_SQL["renew"], params)
        if not result.rowcount:
            raise LeaseLost(execution_id=claim.execution_id, lease=claim.lease)

    async def release(self, claim: Claim, now: datetime) -> None:
        params = {"eid": claim.execution_id, "mine": claim.lease, "until": now}
        with translate_errors():
            async with self._single.connect() as conn:
                await conn.execute(_SQL["release"], params)

    async def written(self, claim: Claim, seq: int) -> str | None:
        statement = (
            select(executions.c.status)
            .join(
                step_runs,
                (step_runs.c.execution_id == executions.c.id) & (step_runs.c.seq == seq),
            )
            .where(executions.c.id == claim.execution_id, executions.c.lease == claim.lease)
        )
        with translate_errors():
            async with self._single.connect() as conn:
                status = (await conn.execute(statement)).scalar()
        return None if status is None else str(status)


async def write_in(
    conn: AsyncConnection,
    claim: Claim,
    execution: ExecutionWrite,
    steps: Sequence[StepWrite],
    timer: TimerWrite | None = None,
) -> str | None:
    """:meth:`SqlRunStore.write`'s statements in the caller's transaction; the execution's
    status after them, or ``None`` when the lease is no longer ``claim``'s (nothing written).
    Also used by :mod:`conveyor.store.events` for ``wait`` steps."""
    x = execution
    params = {
        "eid": claim.execution_id,
        "mine": claim.lease,
        "status": x.status,
        "next_step": x.next_step,
        "steps_run": x.steps_run,
        "output": x.output,
        "error": x.error,
        "finished_at": x.finished_at,
        "wake_at": x.wake_at,
        "lease_until": x.lease_expires_at,
        "step_attempt": x.step_attempt,
        "step_errors": x.step_errors,
        "step_started_at": x.step_started_at,
        "now": x.now,
    }
    if claim.unleased:
        params["started"] = claim.started_at
    row = (
        await conn.execute(_SQL["claiming_write" if claim.unleased else "write"], params)
    ).first()
    if row is None:
        return None
    if steps:
        await conn.execute(_SQL["step"], [_step_params(claim, s) for s in steps])
    if timer is not None and row.status == "waiting":
        # a later wait of the same step (a retry) takes its (execution, seq) timer row over
        taken = {"b_eid": claim.execution_id, "b_seq": timer.seq, "b_id": timer.id,
                 "b_due": timer.due_at, "b_now": x.now}  # fmt: skip
        if not (await conn.execute(_SQL["timer_again"], taken)).rowcount:
            await conn.execute(_SQL["timer"], _timer_params(claim, timer, x.now))
    return str(row.status)


def _step_params(claim: Claim, step: StepWrite) -> dict[str, Any]:
    return {
        "execution_id": claim.execution_id,
        "seq": step.seq,
        "tenant_id": claim.tenant_id,
        "step_id": step.step_id,
        "step_type": step.step_type,
        "status": step.status,
        "attempts": step.attempts,
        "input": step.input,
        "output": step.output,
        "output_truncated": step.output_truncated,
        "error": step.error,
        "started_at": step.started_at,
        "finished_at": step.finished_at,
    }


def _timer_params(claim: Claim, timer: TimerWrite, now: datetime) -> dict[str, Any]:
    return {
        "id": timer.id,
        "tenant_id": claim.tenant_id,
        "execution_id": claim.execution_id,
        "workflow_id": timer.workflow_id,
        "region": timer.region,
        "seq": timer.seq,
        "due_at": timer.due_at,
        "status": "pending",
        "created_at": now,
    }
