"""Executions: read with step runs, list with filters and cursor pagination, cancel, retry (from
the start, or from the failed step reusing the step runs before it: :meth:`ExecutionService.
retry_from`); plus the reconciler's queries. Creating one (a trigger) is :mod:`conveyor.store.triggers`.
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping, Sequence
from dataclasses import replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy import Insert, and_, literal, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from conveyor.errors import Conflict, ConveyorError, NotFound
from conveyor.settings import Settings
from conveyor.store._base import ServiceBase, decode_cursor, encode_cursor, page_limit
from conveyor.store._group_commit import GroupCommit
from conveyor.store._types import utcnow
from conveyor.store.records import Execution, Page, StepRun
from conveyor.store.schema import ACTIVE_STATUSES, ID, executions, step_runs, timers
from conveyor.store.statements import Statements, TriggerRequest
from conveyor.store.triggers import TriggerService, insert_values, new_execution
from conveyor.store.workflows import WorkflowService

if TYPE_CHECKING:
    from conveyor.store.children import ChildService

__all__ = ["ExecutionService", "RetryFrom"]

RETRYABLE_STATUSES = ("failed", "cancelled")

RetryFrom = Literal["start", "failed"]
"""Where a retry starts: the first step, or the original's failed step."""


def _copy_step_runs(original: Execution, execution_id: str, before_seq: int) -> Insert:
    """``INSERT ... SELECT`` of ``original``'s step runs with ``seq < before_seq`` into
    ``execution_id``, each pointing back at ``original`` (``reused_from``)."""
    copied = [c.name for c in step_runs.c if c.name not in ("execution_id", "reused_from")]
    source = select(
        literal(execution_id, ID).label("execution_id"),
        *(step_runs.c[name] for name in copied),
        literal(original.id, ID).label("reused_from"),
    ).where(
        step_runs.c.tenant_id == original.tenant_id,
        step_runs.c.execution_id == original.id,
        step_runs.c.seq < before_seq,
    )
    return step_runs.insert().from_select(["execution_id", *copied, "reused_from"], source)


def _error_type(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("type") or error.get("message") or "unknown")[:100]
    return "unknown"


class ExecutionService(ServiceBase):
    """Everything the API, the scheduler and the reconciler do with executions."""

    def __init__(
        self,
        engine: AsyncEngine,
        settings: Settings,
        statements: Statements,
        workflows: WorkflowService,
    ) -> None:
        super().__init__(engine, settings, statements)
        self._workflows = workflows
        self._triggers = TriggerService(engine, settings, statements, workflows)
        self.children: ChildService | None = None
        """Set by the store: tells a cancelled child's parent (sub-workflows)."""

    @property
    def group_commit(self) -> GroupCommit[TriggerRequest, Mapping[str, Any] | ConveyorError | None]:
        """The triggers' group commit (its ``batches`` count is read by tests)."""
        return self._triggers.group_commit

    @property
    def replays(self) -> GroupCommit[tuple[str, str], Execution | None]:
        """The idempotent replays' batched reads by key (its ``batches`` count is read by
        tests)."""
        return self._triggers.replays

    async def create(
        self,
        tenant_id: str,
        workflow_id: str,
        input: Any = None,
        *,
        idempotency_key: str | None = None,
        triggered_by: str = "api",
    ) -> tuple[Execution, bool]:
        """Create a ``queued`` execution: see :meth:`TriggerService.create`."""
        return await self._triggers.create(
            tenant_id,
            workflow_id,
            input,
            idempotency_key=idempotency_key,
            triggered_by=triggered_by,
        )

    async def get(
        self, tenant_id: str, execution_id: str, *, with_steps: bool = False
    ) -> Execution:
        """One execution (and its step runs, in order, with ``with_steps``)."""
        if with_steps:
            found = await self._statements.execution_with_steps(tenant_id, execution_id)
        else:
            found = await self._statements.execution(tenant_id, execution_id)
        if found is None:
            raise NotFound("execution not found", execution_id=execution_id)
        return found

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
        statuses = (status,) if isinstance(status, str) else tuple(status or ())
        items, more = await self._statements.execution_page(
            tenant_id,
            statuses=statuses or None,
            workflow_id=workflow_id,
            limit=page_limit(limit),
            after=None if cursor is None else decode_cursor(cursor),
        )
        if not more:
            return Page(items, None)
        last = items[-1]
        return Page(items, encode_cursor(last.created_at, last.id))

    async def cancel(self, tenant_id: str, execution_id: str) -> Execution:
        """Cancel a queued, running or waiting execution (idempotent for cancelled ones).

        A running execution stops at its next step boundary (the step in progress finishes and
        is recorded); a waiting one's timer is cancelled. Conflict if it already succeeded or
        failed. Its active sub-workflows (``workflow`` steps' children) are cancelled with it,
        recursively, in the same transaction; a cancelled child's parent is told (its
        ``workflow`` step fails).
        """
        now = utcnow()
        cancelled = await self._cancel(tenant_id, execution_id, now)
        if cancelled is not None:
            if cancelled.parent_execution_id is not None and self.children is not None:
                await self.children.notify_parent(cancelled.id, now)
            return cancelled
        current = await self.get(tenant_id, execution_id)
        if current.status != "cancelled":
            raise Conflict(
                f"execution already {current.status}",
                execution_id=execution_id,
                status=current.status,
            )
        return current

    async def _cancel(self, tenant_id: str, execution_id: str, now: datetime) -> Execution | None:
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
                await self._cancel_children(conn, tenant_id, execution_id, now)
                return Execution.from_mapping(row._mapping)
        return None

    async def _cancel_children(
        self, conn: AsyncConnection, tenant_id: str, parent_id: str, now: datetime
    ) -> None:
        """Cancel the active descendants of ``parent_id`` (level by level; depth is bounded)."""
        parents = [parent_id]
        while parents:
            rows = (
                await conn.execute(
                    update(executions)
                    .where(
                        executions.c.tenant_id == tenant_id,
                        executions.c.parent_execution_id.in_(parents),
                        executions.c.status.in_(ACTIVE_STATUSES),
                    )
                    .values(
                        status="cancelled",
                        finished_at=now,
                        updated_at=now,
                        wake_at=None,
                        error={
                            "type": "Cancelled",
                            "message": "its parent execution was cancelled",
                        },
                    )
                    .returning(executions.c.id)
                )
            ).all()
            parents = [r.id for r in rows]
            if parents:
                await conn.execute(
                    update(timers)
                    .where(timers.c.execution_id.in_(parents), timers.c.status == "pending")
                    .values(status="cancelled")
                )

    async def retry(self, tenant_id: str, execution_id: str) -> Execution:
        """A new execution of the same workflow version with the same input
        (``retry_of`` = the original). Only failed or cancelled executions can be retried."""
        execution, _ = await self.retry_from(tenant_id, execution_id)
        return execution

    async def retry_from(
        self,
        tenant_id: str,
        execution_id: str,
        *,
        start: RetryFrom = "start",
        idempotency_key: str | None = None,
    ) -> tuple[Execution, bool]:
        """A new ``queued`` execution of the same workflow version with the same input
        (``retry_of`` = the original, ``triggered_by`` = ``retry``); ``(execution, created)``.

        ``start="start"``: it runs every step again (a failed or cancelled original).
        ``start="failed"``: it resumes at the original's failed step (a failed original whose
        failure was a step's): the step runs before it are copied in the same transaction
        (same ``seq``, ``reused_from`` = the original) and its cursor points at the failed
        step, so the engine restores their outputs and runs the failed step and what follows;
        the steps before it are not run again.

        ``idempotency_key`` (per tenant, shared with triggers): a key already used for a retry
        of this execution returns that retry (``created=False``); used for anything else,
        ``Conflict``. NotFound for an execution of another tenant; Conflict for the wrong
        status or (``failed``) when no step failed.
        """
        if idempotency_key is not None:
            replay = await self._retry_replay(tenant_id, execution_id, idempotency_key)
            if replay is not None:
                return replay, False
        original = await self.get(tenant_id, execution_id)
        resume_at, reused = 0, 0
        if start == "failed":
            resume_at, reused = await self._resume_point(original)
        elif original.status not in RETRYABLE_STATUSES:
            raise Conflict(
                f"only failed or cancelled executions can be retried, not {original.status}",
                execution_id=execution_id,
                status=original.status,
            )
        execution = replace(
            new_execution(
                tenant_id=tenant_id,
                workflow_id=original.workflow_id,
                version=original.workflow_version,
                region=original.region,
                input=original.input,
                triggered_by="retry",
                now=utcnow(),
                retry_of=original.id,
                idempotency_key=idempotency_key,
            ),
            next_step=resume_at,
            steps_run=reused,
        )
        values = {**insert_values(execution), "next_step": resume_at, "steps_run": reused}
        try:
            async with self._tx() as conn:
                inserted = await conn.execute(executions.insert().values(values))
                if not inserted.rowcount:  # PostgreSQL: the key trigger skipped it (key taken)
                    raise Conflict("idempotency key already used", execution_id=execution_id)
                if reused:
                    await conn.execute(_copy_step_runs(original, execution.id, reused))
        except Conflict:
            if idempotency_key is None:
                raise
            replay = await self._retry_replay(tenant_id, execution_id, idempotency_key)
            if replay is None:
                raise
            return replay, False
        return execution, True

    async def _retry_replay(self, tenant_id: str, execution_id: str, key: str) -> Execution | None:
        """The retry of ``execution_id`` made earlier with ``key``; None if the key is unused;
        Conflict if it was used for anything else."""
        earlier = await self._statements.execution_by_key(tenant_id, key)
        if earlier is None:
            return None
        if earlier.retry_of != execution_id:
            raise Conflict(
                "idempotency key already used for another request",
                idempotency_key=key,
                execution_id=earlier.id,
            )
        return earlier

    async def _resume_point(self, original: Execution) -> tuple[int, int]:
        """Where a retry from the failed step starts: (index of the failed step in the
        version's steps, number of step runs before it)."""
        if original.status != "failed":
            raise Conflict(
                "only failed executions can be retried from the failed step, not "
                f"{original.status}",
                execution_id=original.id,
                status=original.status,
            )
        async with self._auto() as conn:
            runs = await self._step_runs(conn, original.tenant_id, original.id)
        failed = next((r for r in reversed(runs) if r.status == "failed"), None)
        if failed is None:
            raise Conflict(
                "no step of this execution failed (it failed outside a step: "
                f"{_error_type(original.error)}); retry it from the start",
                execution_id=original.id,
            )
        definition = await self._workflows.get_definition(
            original.tenant_id, original.workflow_id, original.workflow_version
        )
        try:
            index = definition.step_index(failed.step_id)
        except KeyError:
            raise Conflict(
                f"the failed step {failed.step_id!r} is not in workflow version "
                f"{original.workflow_version}; retry it from the start",
                execution_id=original.id,
            ) from None
        return index, failed.seq

    # --- for the reconciler and the dispatchers (not tenant-scoped: system processes) --------

    async def stranded(
        self,
        now: datetime,
        *,
        min_age_s: float = 5.0,
        limit: int = 500,
        ids: Sequence[str] | None = None,
        after: tuple[datetime, str] | None = None,
    ) -> builtins.list[Execution]:
        """Executions that should be on the queue but may not be: ``queued`` whose last
        enqueue (or creation) is older than ``min_age_s``, ``running`` whose lease expired,
        ``waiting`` whose wake time passed ``min_age_s`` ago. Oldest first (``queued_at``,
        then id). ``ids``: only among these (the reconciler's second look, after it read the
        jobs' states). ``after``: only those after this ``(queued_at, id)`` (the reconciler's
        next page: a backlog larger than ``limit`` is walked through, not its oldest page
        looked at again and again)."""
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
            .order_by(executions.c.queued_at, executions.c.id)
            .limit(limit)
        )
        if after is not None:
            at, after_id = after
            query = query.where(
                or_(
                    executions.c.queued_at > at,
                    and_(executions.c.queued_at == at, executions.c.id > after_id),
                )
            )
        if ids is not None:
            query = query.where(executions.c.id.in_(builtins.list(ids)))
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
