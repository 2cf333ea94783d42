"""The engine's hot path: claim an execution, persist a step, park on a timer.

:class:`RunStore` is the interface the engine uses; there are two implementations:

* :class:`CoreRunStore` — SQLAlchemy Core, one transaction per write (SQLite; any backend);
* :class:`~conveyor.store._runs_pg.PgRunStore` — raw asyncpg prepared statements on Postgres,
  one round trip per claim and one per step (the step run insert, the execution update and a
  timer insert are one statement with data-modifying CTEs).

Fencing: :meth:`RunStore.claim` increments ``lease`` with a compare-and-set (only a queued
execution, a running one whose lease expired, or a waiting one whose wake time passed can be
claimed) and returns the new number; every later write says ``WHERE lease = :mine`` and raises
:class:`~conveyor.errors.LeaseLost` when no row matched. A write never overrides a
``cancelled`` status: it returns ``cancelled`` and the engine stops (step boundary).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from sqlalchemy import bindparam, case, func, null, or_, select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.errors import LeaseLost
from conveyor.store._base import translate_errors
from conveyor.store._db import autocommit
from conveyor.store._types import JSONType
from conveyor.store.schema import executions, step_runs, timers

__all__ = [
    "Claim",
    "CoreRunStore",
    "ExecutionWrite",
    "RunStore",
    "StepWrite",
    "TimerWrite",
    "Unclaimed",
]


@dataclass(slots=True)
class Claim:
    """An execution this runner holds, with what the engine needs to run it."""

    execution_id: str
    tenant_id: str
    workflow_id: str
    workflow_version: int
    region: str
    input: Any
    next_step: int
    steps_run: int
    lease: int
    attempts: int
    queued_at: datetime
    started_at: datetime


@dataclass(frozen=True, slots=True)
class Unclaimed:
    """Why a claim did not succeed (``status`` is ``None`` when the execution is missing)."""

    status: str | None
    lease_expires_at: datetime | None = None
    wake_at: datetime | None = None


@dataclass(slots=True)
class StepWrite:
    """One finished step (its last attempt), as stored in ``step_runs``."""

    seq: int
    step_id: str
    step_type: str
    status: str
    attempts: int
    input: Any
    input_json: str | None
    output: Any
    output_json: str | None
    output_truncated: bool
    error: Any
    error_json: str | None
    started_at: datetime
    finished_at: datetime


@dataclass(slots=True)
class ExecutionWrite:
    """The execution's new state after a step (or without one)."""

    status: str
    next_step: int
    steps_run: int
    now: datetime
    lease_expires_at: datetime | None
    output: Any = None
    output_json: str | None = None
    error: Any = None
    error_json: str | None = None
    finished_at: datetime | None = None
    wake_at: datetime | None = None


@dataclass(slots=True)
class TimerWrite:
    """A durable timer that wakes the execution (written only if it is really parked)."""

    id: str
    workflow_id: str
    region: str
    seq: int
    due_at: datetime


class RunStore(Protocol):
    def session(self) -> AbstractAsyncContextManager[RunStore]:
        """A view of this store for one run (may hold a connection between calls)."""
        ...

    async def idle(self) -> None:
        """Give back anything a session holds (before a step waits on I/O)."""
        ...

    async def claim(
        self, execution_id: str, now: datetime, lease_until: datetime
    ) -> Claim | None: ...

    async def unclaimed(self, execution_id: str) -> Unclaimed: ...

    async def completed_outputs(self, tenant_id: str, execution_id: str) -> dict[str, Any]: ...

    async def write(
        self,
        claim: Claim,
        execution: ExecutionWrite,
        step: StepWrite | None,
        timer: TimerWrite | None = None,
    ) -> str:
        """Persist atomically; return the execution's status afterwards (``cancelled`` if it
        was cancelled meanwhile). Raises LeaseLost if ``claim.lease`` is no longer current."""
        ...

    async def renew(self, claim: Claim, lease_until: datetime) -> None: ...

    async def release(self, claim: Claim, now: datetime) -> None: ...


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
            attempts=e.attempts + 1,
            started_at=func.coalesce(e.started_at, now),
            lease_expires_at=bindparam("until", type_=when),
            wake_at=None,
            updated_at=now,
        )
        .returning(*_CLAIM_RETURNS)
    )
    write = (
        update(executions)
        .where(e.id == bindparam("eid"), e.lease == bindparam("mine"))
        .values(
            status=_keep_if_cancelled(e.status, bindparam("status", type_=e.status.type)),
            next_step=bindparam("next_step"),
            steps_run=bindparam("steps_run"),
            output=_keep_if_cancelled(e.output, bindparam("output", type_=JSONType)),
            error=_keep_if_cancelled(e.error, bindparam("error", type_=JSONType)),
            finished_at=_keep_if_cancelled(e.finished_at, bindparam("finished_at", type_=when)),
            wake_at=_keep_if_cancelled(null(), bindparam("wake_at", type_=when)),
            lease_expires_at=bindparam("lease_until", type_=when),
            updated_at=now,
        )
        .returning(e.status)
    )
    fence = (e.id == bindparam("eid")) & (e.lease == bindparam("mine"))
    return {
        "claim": claim,
        "write": write,
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
        "renew": update(executions)
        .where(fence)
        .values(lease_expires_at=bindparam("until", type_=when)),
        "release": update(executions)
        .where(fence, e.status == "running")
        .values(lease_expires_at=bindparam("until", type_=when)),
    }


_SQL = _build_statements()


class CoreRunStore:
    """:class:`RunStore` on SQLAlchemy Core (used for SQLite, and as the Postgres baseline)."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._single = autocommit(engine)  # for single statements: atomic on their own

    @asynccontextmanager
    async def session(self) -> AsyncIterator[CoreRunStore]:
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
        step: StepWrite | None,
        timer: TimerWrite | None = None,
    ) -> str:
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
            "now": x.now,
        }
        with translate_errors():
            async with self._engine.begin() as conn:
                row = (await conn.execute(_SQL["write"], params)).first()
                if row is None:
                    raise LeaseLost(execution_id=claim.execution_id, lease=claim.lease)
                if step is not None:
                    await conn.execute(_SQL["step"], _step_params(claim, step))
                if timer is not None and row.status == "waiting":
                    await conn.execute(_SQL["timer"], _timer_params(claim, timer, x.now))
        return str(row.status)

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
