"""Executions: trigger (with idempotency keys), read with step runs, list with filters and
cursor pagination, cancel, retry; plus the reconciler's queries.

An execution is created ``queued`` and committed before its job is enqueued (the caller's
job). ``Idempotency-Key``: ``UNIQUE (tenant_id, idempotency_key)``; a second create with the
same key returns the first execution (``created=False``) — or raises ``Conflict`` when the key
was used for another workflow.
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import and_, bindparam, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from conveyor.errors import Conflict, NotFound
from conveyor.settings import Settings
from conveyor.store._base import ServiceBase
from conveyor.store._fast_pg import PgFast
from conveyor.store._types import check_storable, dumps, new_id, utcnow
from conveyor.store.records import Execution, Page, StepRun
from conveyor.store.schema import ACTIVE_STATUSES, executions, step_runs, timers, workflows
from conveyor.store.workflows import WorkflowService
from conveyor.workflows.definition import InputInvalid, validate_input

__all__ = ["ExecutionService", "new_execution"]

RETRYABLE_STATUSES = ("failed", "cancelled")
VERSION_HINTS = 10_000
"""Most (tenant, workflow) version hints kept for the one-statement trigger."""
_TRIGGER_TARGET = select(
    workflows.c.current_version, workflows.c.region, workflows.c.enabled
).where(
    workflows.c.tenant_id == bindparam("tid"),
    workflows.c.id == bindparam("wid"),
    workflows.c.deleted_at.is_(None),
)


def new_execution(
    *,
    tenant_id: str,
    workflow_id: str,
    version: int,
    region: str,
    input: Any,
    triggered_by: str,
    now: datetime,
    idempotency_key: str | None = None,
    schedule_id: str | None = None,
    retry_of: str | None = None,
    execution_id: str | None = None,
) -> Execution:
    """A fresh ``queued`` execution record (not yet stored)."""
    return Execution(
        id=execution_id or new_id(),
        tenant_id=tenant_id,
        workflow_id=workflow_id,
        workflow_version=version,
        status="queued",
        region=region,
        triggered_by=triggered_by,
        input=input,
        output=None,
        error=None,
        next_step=0,
        steps_run=0,
        attempts=0,
        lease=0,
        lease_expires_at=None,
        wake_at=None,
        idempotency_key=idempotency_key,
        schedule_id=schedule_id,
        retry_of=retry_of,
        created_at=now,
        queued_at=now,
        enqueued_at=None,
        started_at=None,
        finished_at=None,
        updated_at=now,
    )


def insert_values(execution: Execution) -> dict[str, Any]:
    return {
        "id": execution.id,
        "tenant_id": execution.tenant_id,
        "workflow_id": execution.workflow_id,
        "workflow_version": execution.workflow_version,
        "status": execution.status,
        "region": execution.region,
        "triggered_by": execution.triggered_by,
        "input": execution.input,
        "idempotency_key": execution.idempotency_key,
        "schedule_id": execution.schedule_id,
        "retry_of": execution.retry_of,
        "created_at": execution.created_at,
        "queued_at": execution.queued_at,
        "updated_at": execution.updated_at,
    }


def _check_input(value: Any) -> None:
    """Refuse input no backend can store (NaN, NUL characters) with ``InputInvalid``."""
    try:
        check_storable(value, "input")
    except ValueError as exc:
        error = InputInvalid(str(exc))
        error.details = cast(Any, [{"field": "", "message": str(exc)}])
        raise error from None


def _input_json(value: Any) -> str | None:
    """``value`` as the JSON text to store (``None`` for SQL NULL), checked like
    :func:`_check_input`."""
    if value is None:
        return None
    _check_input(value)
    return dumps(value)


class ExecutionService(ServiceBase):
    """Everything the API, the scheduler and the reconciler do with executions."""

    def __init__(
        self,
        engine: AsyncEngine,
        settings: Settings,
        workflows: WorkflowService,
        *,
        fast: PgFast | None = None,
    ) -> None:
        super().__init__(engine, settings, fast=fast)
        self._workflows = workflows
        # (tenant, workflow) -> last current version seen: a hint only (the one-statement
        # trigger re-checks it in SQL), so it may be stale or come from another tenant's miss.
        self._versions: dict[tuple[str, str], int] = {}

    async def create(
        self,
        tenant_id: str,
        workflow_id: str,
        input: Any = None,
        *,
        idempotency_key: str | None = None,
        triggered_by: str = "api",
    ) -> tuple[Execution, bool]:
        """Create a ``queued`` execution of the workflow's current version.

        Returns ``(execution, created)``; ``created`` is False when ``idempotency_key`` was
        already used (the earlier execution is returned). Raises NotFound (no such workflow for
        this tenant), Conflict (workflow disabled; key used for another workflow) and
        ``InputInvalid`` (input does not match the workflow's input schema).

        On Postgres, triggering a workflow whose current version this process has already seen
        (and whose definition is cached) is ONE statement: the input is validated against that
        version first and the row is inserted only if it is still current. Anything else (first
        trigger, a new version, invalid input, an idempotent replay) takes the general path,
        which raises the same errors in the same order.
        """
        if self._fast is not None:
            done = await self._create_fast(
                tenant_id, workflow_id, input, idempotency_key, triggered_by
            )
            if done is not None:
                return done
        found = await self._trigger_target(tenant_id, workflow_id)
        if found is None:
            raise NotFound("workflow not found", workflow_id=workflow_id)
        version, region, enabled = found
        if not enabled:
            raise Conflict("workflow is disabled", workflow_id=workflow_id)
        definition = await self._workflows.get_definition(tenant_id, workflow_id, version)
        _check_input(input)
        validate_input(definition, input)
        execution = new_execution(
            tenant_id=tenant_id,
            workflow_id=workflow_id,
            version=version,
            region=region,
            input=input,
            triggered_by=triggered_by,
            now=utcnow(),
            idempotency_key=idempotency_key,
        )
        if await self._insert_new(execution):
            return execution, True
        assert idempotency_key is not None
        return await self._replay(tenant_id, workflow_id, idempotency_key)

    async def _create_fast(
        self,
        tenant_id: str,
        workflow_id: str,
        input: Any,
        idempotency_key: str | None,
        triggered_by: str,
    ) -> tuple[Execution, bool] | None:
        """The one-statement trigger; ``None`` when the general path must decide."""
        assert self._fast is not None
        target = (tenant_id, workflow_id)
        version = self._versions.get(target)
        if version is None:
            return None
        definition = self._workflows.cache.get((tenant_id, workflow_id, version))
        if definition is None:
            return None
        try:
            input_json = _input_json(input)
            validate_input(definition, input)
        except InputInvalid:
            return None  # raised by the general path, after its NotFound/Conflict checks
        now = utcnow()
        execution_id = new_id()
        row = await self._fast.trigger(
            execution_id,
            tenant_id,
            workflow_id,
            version,
            triggered_by=triggered_by,
            input_json=input_json,
            idempotency_key=idempotency_key,
            now=now,
        )
        if row is None:
            self._versions.pop(target, None)
            raise NotFound("workflow not found", workflow_id=workflow_id)
        current, region = int(row["current_version"]), str(row["region"])
        self._remember_version(target, current)
        if not row["enabled"]:
            raise Conflict("workflow is disabled", workflow_id=workflow_id)
        if row["inserted"]:
            execution = new_execution(
                tenant_id=tenant_id,
                workflow_id=workflow_id,
                version=current,
                region=region,
                input=input,
                triggered_by=triggered_by,
                now=now,
                idempotency_key=idempotency_key,
                execution_id=execution_id,
            )
            return execution, True
        if current != version:
            return None  # a new version since: validate the input against it first
        assert idempotency_key is not None
        return await self._replay(tenant_id, workflow_id, idempotency_key)

    async def _replay(
        self, tenant_id: str, workflow_id: str, idempotency_key: str
    ) -> tuple[Execution, bool]:
        """The execution created earlier with ``idempotency_key`` (``created=False``)."""
        earlier = await self._by_key(tenant_id, idempotency_key)
        if earlier is None:  # deleted in between: extremely unlikely; let the caller retry
            raise Conflict("idempotency key race, try again", idempotency_key=idempotency_key)
        if earlier.workflow_id != workflow_id:
            raise Conflict(
                "idempotency key already used for another workflow",
                idempotency_key=idempotency_key,
                execution_id=earlier.id,
            )
        return earlier, False

    def _remember_version(self, target: tuple[str, str], version: int) -> None:
        """Note a workflow's current version: the next trigger of it can be one statement."""
        if target not in self._versions and len(self._versions) >= VERSION_HINTS:
            self._versions.clear()
        self._versions[target] = version

    async def _trigger_target(
        self, tenant_id: str, workflow_id: str
    ) -> tuple[int, str, bool] | None:
        """(current version, region, enabled) of a live workflow of this tenant."""
        if self._fast is not None:
            row = await self._fast.workflow_for_trigger(tenant_id, workflow_id)
        else:
            async with self._auto() as conn:
                row = (
                    (await conn.execute(_TRIGGER_TARGET, {"tid": tenant_id, "wid": workflow_id}))
                    .mappings()
                    .first()
                )
        if row is None:
            return None
        version = int(row["current_version"])
        self._remember_version((tenant_id, workflow_id), version)
        return version, str(row["region"]), bool(row["enabled"])

    async def _insert_new(self, execution: Execution) -> bool:
        """Insert; False if its idempotency key was already used."""
        if self._fast is not None:
            return await self._fast.insert_execution(execution)
        statement = (
            self._insert(executions)
            .values(insert_values(execution))
            .on_conflict_do_nothing(
                index_elements=["tenant_id", "idempotency_key"],
                index_where=executions.c.idempotency_key.is_not(None),
            )
            .returning(executions.c.id)
        )
        async with self._auto() as conn:
            return (await conn.execute(statement)).first() is not None

    async def _by_key(self, tenant_id: str, key: str) -> Execution | None:
        if self._fast is not None:
            return await self._fast.execution_by_key(tenant_id, key)
        async with self._auto() as conn:
            row = (
                await conn.execute(
                    select(executions).where(
                        executions.c.tenant_id == tenant_id, executions.c.idempotency_key == key
                    )
                )
            ).first()
        return None if row is None else Execution.from_mapping(row._mapping)

    async def get(
        self, tenant_id: str, execution_id: str, *, with_steps: bool = False
    ) -> Execution:
        """One execution (and its step runs, in order, with ``with_steps``)."""
        if self._fast is not None and not with_steps:
            found = await self._fast.execution(tenant_id, execution_id)
            if found is None:
                raise NotFound("execution not found", execution_id=execution_id)
            return found
        async with self._auto() as conn:
            row = (
                await conn.execute(
                    select(executions).where(
                        executions.c.tenant_id == tenant_id, executions.c.id == execution_id
                    )
                )
            ).first()
            if row is None:
                raise NotFound("execution not found", execution_id=execution_id)
            steps: tuple[StepRun, ...] = ()
            if with_steps:
                steps = await self._step_runs(conn, tenant_id, execution_id)
        return Execution.from_mapping(row._mapping, steps=steps)

    async def step_runs(self, tenant_id: str, execution_id: str) -> list[StepRun]:
        async with self._auto() as conn:
            return list(await self._step_runs(conn, tenant_id, execution_id))

    @staticmethod
    async def _step_runs(
        conn: AsyncConnection, tenant_id: str, execution_id: str
    ) -> tuple[StepRun, ...]:
        rows = (
            await conn.execute(
                select(step_runs)
                .where(step_runs.c.tenant_id == tenant_id, step_runs.c.execution_id == execution_id)
                .order_by(step_runs.c.seq)
            )
        ).all()
        return tuple(StepRun.from_mapping(r._mapping) for r in rows)

    async def list(
        self,
        tenant_id: str,
        *,
        status: str | Sequence[str] | None = None,
        workflow_id: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page[Execution]:
        """Executions of ``tenant_id``, newest first; ``next_cursor`` continues the list
        (stable under concurrent inserts: the cursor is the last row's (created_at, id))."""
        query = select(executions).where(executions.c.tenant_id == tenant_id)
        if isinstance(status, str):
            query = query.where(executions.c.status == status)
        elif status:
            query = query.where(executions.c.status.in_(list(status)))
        if workflow_id is not None:
            query = query.where(executions.c.workflow_id == workflow_id)
        return await self._page(query, executions, Execution, limit=limit, cursor=cursor)

    async def cancel(self, tenant_id: str, execution_id: str) -> Execution:
        """Cancel a queued, running or waiting execution (idempotent for cancelled ones).

        A running execution stops at its next step boundary (the step in progress finishes and
        is recorded); a waiting one's timer is cancelled. Conflict if it already succeeded or
        failed.
        """
        now = utcnow()
        async with self._tx() as conn:
            row = (
                await conn.execute(
                    update(executions)
                    .where(
                        executions.c.tenant_id == tenant_id,
                        executions.c.id == execution_id,
                        executions.c.status.in_(ACTIVE_STATUSES),
                    )
                    .values(
                        status="cancelled",
                        finished_at=now,
                        updated_at=now,
                        wake_at=None,
                        error={"type": "Cancelled", "message": "cancelled on request"},
                    )
                    .returning(*executions.c)
                )
            ).first()
            if row is not None:
                await conn.execute(
                    update(timers)
                    .where(timers.c.execution_id == execution_id, timers.c.status == "pending")
                    .values(status="cancelled")
                )
                return Execution.from_mapping(row._mapping)
        current = await self.get(tenant_id, execution_id)
        if current.status != "cancelled":
            raise Conflict(
                f"execution already {current.status}",
                execution_id=execution_id,
                status=current.status,
            )
        return current

    async def retry(self, tenant_id: str, execution_id: str) -> Execution:
        """A new execution of the same workflow version with the same input
        (``retry_of`` = the original). Only failed or cancelled executions can be retried."""
        original = await self.get(tenant_id, execution_id)
        if original.status not in RETRYABLE_STATUSES:
            raise Conflict(
                f"only failed or cancelled executions can be retried, not {original.status}",
                execution_id=execution_id,
            )
        execution = new_execution(
            tenant_id=tenant_id,
            workflow_id=original.workflow_id,
            version=original.workflow_version,
            region=original.region,
            input=original.input,
            triggered_by="retry",
            now=utcnow(),
            retry_of=original.id,
        )
        async with self._auto() as conn:
            await conn.execute(executions.insert().values(insert_values(execution)))
        return execution

    # --- for the reconciler and the dispatchers (not tenant-scoped: system processes) --------

    async def stranded(
        self, now: datetime, *, min_age_s: float = 5.0, limit: int = 500
    ) -> builtins.list[Execution]:
        """Executions that should be on the queue but may not be: ``queued`` whose last
        enqueue (or creation) is older than ``min_age_s``, ``running`` whose lease expired,
        ``waiting`` whose wake time passed ``min_age_s`` ago. Oldest first."""
        cutoff = now - timedelta(seconds=min_age_s)
        last_enqueue = executions.c.enqueued_at
        condition = or_(
            and_(
                executions.c.status == "queued",
                executions.c.queued_at <= cutoff,
                or_(last_enqueue.is_(None), last_enqueue <= cutoff),
            ),
            and_(
                executions.c.status == "running",
                executions.c.lease_expires_at <= now,
                or_(last_enqueue.is_(None), last_enqueue <= cutoff),
            ),
            and_(
                executions.c.status == "waiting",
                executions.c.wake_at <= cutoff,
                or_(last_enqueue.is_(None), last_enqueue <= cutoff),
            ),
        )
        query = (
            select(executions)
            .where(executions.c.status.in_(ACTIVE_STATUSES), condition)
            .order_by(executions.c.queued_at)
            .limit(limit)
        )
        async with self._auto() as conn:
            rows = (await conn.execute(query)).all()
        return [Execution.from_mapping(r._mapping) for r in rows]

    async def mark_enqueued(self, execution_ids: Sequence[str], at: datetime) -> int:
        """Record that jobs for these executions were (re-)enqueued at ``at``."""
        if not execution_ids:
            return 0
        async with self._auto() as conn:
            result = await conn.execute(
                update(executions)
                .where(executions.c.id.in_(list(execution_ids)))
                .values(enqueued_at=at)
            )
        return int(result.rowcount or 0)

    async def status_of(self, execution_ids: Sequence[str]) -> dict[str, str]:
        """``{execution id: status}`` for the ids that exist (system use: reconcilers, tests)."""
        if not execution_ids:
            return {}
        async with self._auto() as conn:
            rows = (
                await conn.execute(
                    select(executions.c.id, executions.c.status).where(
                        executions.c.id.in_(list(execution_ids))
                    )
                )
            ).all()
        return {r.id: r.status for r in rows}
