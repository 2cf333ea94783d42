"""Sub-workflows: the child executions of ``workflow`` steps.

* :meth:`ChildService.start` creates the child of a parent's step run exactly once: its
  idempotency key is derived from the parent's id and the step's ``seq``
  (``UNIQUE (tenant_id, idempotency_key)``), so a parent that crashed after creating it and
  runs the step again finds the same child. The child records its parent
  (``parent_execution_id``, ``parent_seq``), its ``depth`` and ``triggered_by = 'workflow'``.
* :meth:`ChildService.notify_parent` — called by the engine once a child has ended (and again
  by any later delivery of its job, so a crash between the child's last write and the call is
  repaired when the job is redelivered), and by a cancel — sends the parent the event
  ``conveyor.workflow.<seq>`` through :meth:`EventService.send` (idempotent: one event per
  child), which wakes the parent if it is parked on that step. The parent reads the child's
  status and output itself: the event only wakes it.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.errors import Conflict, InputInvalid, NotFound
from conveyor.settings import Settings
from conveyor.store._base import ServiceBase
from conveyor.store._types import check_storable
from conveyor.store.events import EventService, Sent
from conveyor.store.records import Execution
from conveyor.store.schema import executions
from conveyor.store.statements import Statements
from conveyor.store.triggers import insert_values, new_execution
from conveyor.store.workflows import WorkflowService
from conveyor.workflows.definition import validate_input

__all__ = ["CHILD_EVENT_PREFIX", "ChildService", "child_event", "child_key"]

CHILD_EVENT_PREFIX = "conveyor.workflow."


def child_key(parent_id: str, seq: int) -> str:
    """The idempotency key of the child of ``parent_id``'s step run ``seq``."""
    return f"conveyor.child:{parent_id}:{seq}"


def child_event(seq: int) -> str:
    """The name of the event that tells a parent its step run ``seq``'s child ended."""
    return f"{CHILD_EVENT_PREFIX}{seq}"


def _own(execution: Execution, parent_id: str, seq: int) -> Execution:
    """``execution`` found by the child's key: it must be that step run's child (a trigger
    cannot pass for it by reusing the key)."""
    if (execution.parent_execution_id, execution.parent_seq) != (parent_id, seq):
        raise Conflict(
            "the sub-workflow's idempotency key was used by another execution",
            execution_id=execution.id,
        )
    return execution


class ChildService(ServiceBase):
    def __init__(
        self,
        engine: AsyncEngine,
        settings: Settings,
        statements: Statements,
        workflows: WorkflowService,
        events: EventService,
    ) -> None:
        super().__init__(engine, settings, statements)
        self._workflows = workflows
        self._events = events

    async def start(
        self,
        *,
        tenant_id: str,
        parent_id: str,
        seq: int,
        depth: int,
        workflow_id: str,
        version: int | Literal["latest"],
        input: Any,
        now: datetime,
    ) -> tuple[Execution, bool]:
        """The child of ``parent_id``'s step run ``seq`` (created ``queued`` the first time:
        ``(child, True)``). Raises ``NotFound`` (no such workflow or version of this tenant),
        ``Conflict`` (workflow disabled) and ``InputInvalid`` (input against its schema)."""
        key = child_key(parent_id, seq)
        earlier = await self._statements.execution_by_key(tenant_id, key)
        if earlier is not None:
            return _own(earlier, parent_id, seq), False
        target = await self._statements.trigger_target(tenant_id, workflow_id)
        if target is None:
            raise NotFound("workflow not found", workflow_id=workflow_id)
        if not target["enabled"]:
            raise Conflict("workflow is disabled", workflow_id=workflow_id)
        chosen = int(target["current_version"]) if version == "latest" else version
        definition = await self._workflows.get_definition(tenant_id, workflow_id, chosen)
        try:
            check_storable(input, "input")
        except ValueError as exc:
            raise InputInvalid(f"the child's input cannot be stored: {exc}") from None
        validate_input(definition, input)
        child = new_execution(
            tenant_id=tenant_id,
            workflow_id=workflow_id,
            version=chosen,
            region=str(target["region"]),
            input=input,
            triggered_by="workflow",
            now=now,
            idempotency_key=key,
        )
        values = {**insert_values(child), "parent_execution_id": parent_id,
                  "parent_seq": seq, "depth": depth}  # fmt: skip
        try:
            async with self._tx() as conn:
                inserted = await conn.execute(insert(executions).values(**values))
                if not inserted.rowcount:  # PostgreSQL: the key trigger skipped it (key taken)
                    raise Conflict("idempotency key already used", execution_id=child.id)
        except Conflict:  # created meanwhile (a concurrent runner of the same step run)
            earlier = await self._statements.execution_by_key(tenant_id, key)
            if earlier is None:
                raise
            return _own(earlier, parent_id, seq), False
        async with self._auto() as conn:
            row = (await conn.execute(select(executions).where(executions.c.id == child.id))).one()
        return Execution.from_mapping(row._mapping), True

    async def notify_parent(
        self, execution_id: str, now: datetime
    ) -> tuple[Sent, Execution] | None:
        """Tell the parent of ``execution_id`` (if any, still running) that it ended: the event
        sent (``woken`` names the parent when it was parked on the step: enqueue it) and the
        parent, or ``None`` when there is nothing to tell."""
        async with self._auto() as conn:
            row = (
                await conn.execute(
                    select(
                        executions.c.tenant_id,
                        executions.c.status,
                        executions.c.parent_execution_id,
                        executions.c.parent_seq,
                    ).where(executions.c.id == execution_id)
                )
            ).first()
        if row is None or row.parent_execution_id is None or row.parent_seq is None:
            return None
        if row.status not in ("succeeded", "failed", "cancelled"):
            return None
        try:
            return await self._events.send(
                row.tenant_id,
                row.parent_execution_id,
                child_event(row.parent_seq),
                {"childId": execution_id, "status": row.status},
                now,
                source="workflow",
                idempotency_key=f"conveyor.child:{execution_id}",
            )
        except (NotFound, Conflict):  # the parent is gone or already ended
            return None
