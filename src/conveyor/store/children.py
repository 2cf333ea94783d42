"""Sub-workflows: the child executions of ``workflow`` steps.

* :meth:`ChildService.start` creates the child of a parent's step run exactly once: its
  idempotency key is derived from the parent's id and the step's ``seq``
  (``UNIQUE (tenant_id, idempotency_key)``), so a parent that crashed after creating it and
  runs the step again finds the same child. The child records its parent
  (``parent_execution_id``, ``parent_seq``), its ``depth`` and ``triggered_by = 'workflow'``.
* :meth:`ChildService.start_branches` creates the children of a ``parallel`` / ``foreach``
  step run (one per branch or item, the same workflow version, ``branch`` naming the step list
  they run, ``parent_index`` their index): each exactly once, its key derived from the
  parent's id, the step's seq and the index. :meth:`ChildService.fanout` summarises them
  (started, active, succeeded, the first that failed or succeeded) in one statement, and
  :meth:`ChildService.fanout_outputs` collects their outputs in index order.
* :meth:`ChildService.notify_parent` — called by the engine once a child has ended (and again
  by any later delivery of its job, so a crash between the child's last write and the call is
  repaired when the job is redelivered), and by a cancel — sends the parent the event
  ``conveyor.workflow.<seq>`` through :meth:`EventService.send_child_end` (one transaction;
  idempotent: one event per child), which wakes the parent if it is parked on that step. The
  parent reads the child's status and output itself: the event only wakes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import and_, case, func, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from conveyor.errors import Conflict, InputInvalid, LeaseLost, NotFound
from conveyor.settings import Settings
from conveyor.store._base import ServiceBase
from conveyor.store._types import check_storable
from conveyor.store.events import EventService, Sent
from conveyor.store.records import Execution
from conveyor.store.runs import Claim
from conveyor.store.schema import ACTIVE_STATUSES, executions
from conveyor.store.statements import Statements
from conveyor.store.triggers import insert_values, new_execution
from conveyor.store.workflows import WorkflowService
from conveyor.workflows.definition import validate_input

__all__ = [
    "CHILD_EVENT_PREFIX",
    "ChildService",
    "Fanout",
    "FanoutChild",
    "branch_key",
    "child_event",
    "child_key",
]

CHILD_EVENT_PREFIX = "conveyor.workflow."
_ENDED = ("succeeded", "failed", "cancelled")
_INSERT_CHUNK = 500
"""Children per INSERT statement (bind parameters stay under the drivers' limits)."""


def child_key(parent_id: str, seq: int) -> str:
    """The idempotency key of the child of ``parent_id``'s step run ``seq``."""
    return f"conveyor.child:{parent_id}:{seq}"


def branch_key(parent_id: str, seq: int, index: int) -> str:
    """The idempotency key of branch / item ``index`` of ``parent_id``'s step run ``seq``."""
    return f"conveyor.child:{parent_id}:{seq}:{index}"


@dataclass(frozen=True, slots=True)
class FanoutChild:
    index: int
    id: str
    status: str
    output: Any = None
    error: Any = None


@dataclass(frozen=True, slots=True)
class Fanout:
    """The children of one ``parallel`` / ``foreach`` step run, summarised."""

    started: int
    """How many exist (indexes ``0 .. started - 1``: they are created in order)."""
    active: int
    """Not ended yet (queued, running, waiting)."""
    succeeded: int
    failed: FanoutChild | None
    """The first (lowest index) that failed or was cancelled."""
    winner: FanoutChild | None
    """The first that succeeded (earliest end; then lowest index), with its output."""


async def _fence(conn: AsyncConnection, parent: Claim) -> None:
    """Children are created only by the parent's current runner (a stale one, whose lease
    expired while it decided, would start items beyond the window): its lease, locked until
    the insert commits. Raises ``LeaseLost``."""
    held = await conn.execute(
        select(executions.c.id)
        .where(executions.c.id == parent.execution_id, executions.c.lease == parent.lease)
        .with_for_update()
    )
    if held.first() is None:
        raise LeaseLost(execution_id=parent.execution_id, lease=parent.lease)


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
        inserted = False
        try:
            async with self._tx() as conn:
                added = await conn.execute(
                    insert(executions).values(**values).returning(executions.c.id)
                )
                inserted = added.first() is not None
        except Conflict:
            pass
        if not inserted:  # created meanwhile (a concurrent runner of the same step run)
            earlier = await self._statements.execution_by_key(tenant_id, key)
            if earlier is None:
                raise Conflict("the sub-workflow could not be created", execution_id=parent_id)
            return _own(earlier, parent_id, seq), False
        async with self._auto() as conn:
            row = (await conn.execute(select(executions).where(executions.c.id == child.id))).one()
        return Execution.from_mapping(row._mapping), True

    async def start_branches(
        self,
        parent: Claim,
        *,
        seq: int,
        branch: str,
        kind: str,
        inputs: Sequence[tuple[int, str | None, Any]],
        now: datetime,
    ) -> list[Execution]:
        """Create the children ``inputs`` lists — ``(index, branch, input)`` (``branch``:
        the list this child runs, else ``branch`` for all) — of ``parent``'s step run ``seq``
        (the parent's claim: the children run its workflow version, in its region),
        each once; those created now (to enqueue), in index order. ``kind``: their
        ``triggered_by`` (``parallel`` / ``foreach``)."""
        if not inputs:
            return []
        keys = {branch_key(parent.execution_id, seq, index): index for index, _, _ in inputs}
        async with self._auto() as conn:
            rows = await conn.execute(
                select(executions.c.idempotency_key).where(
                    executions.c.tenant_id == parent.tenant_id,
                    executions.c.parent_execution_id == parent.execution_id,
                    executions.c.idempotency_key.in_(list(keys)),
                )
            )
            existing = {keys[r.idempotency_key] for r in rows}
        children: list[Execution] = []
        values: list[dict[str, Any]] = []
        for index, own_branch, child_input in inputs:
            if index in existing:
                continue
            try:
                check_storable(child_input, "input")
            except ValueError as exc:
                raise InputInvalid(f"the input of child {index} cannot be stored: {exc}") from None
            child = new_execution(
                tenant_id=parent.tenant_id, workflow_id=parent.workflow_id,
                version=parent.workflow_version, region=parent.region, input=child_input,
                triggered_by=kind, now=now, idempotency_key=branch_key(parent.execution_id, seq, index),
            )  # fmt: skip
            child = replace(
                child, parent_execution_id=parent.execution_id, parent_seq=seq,
                depth=parent.depth + 1, branch=own_branch or branch, parent_index=index,
            )  # fmt: skip
            children.append(child)
            values.append({**insert_values(child), "parent_execution_id": parent.execution_id,
                           "parent_seq": seq, "depth": child.depth, "branch": child.branch,
                           "parent_index": index})  # fmt: skip
        if not values:
            return []
        # A key taken meanwhile (a concurrent runner of the same step run) either refuses the
        # statement (then: one row at a time) or skips its row (a database that enforces the
        # key in a trigger): only the ids the insert returns were created here.
        made: set[str] = set()
        try:
            async with self._tx() as conn:
                await _fence(conn, parent)
                for at in range(0, len(values), _INSERT_CHUNK):
                    chunk = values[at : at + _INSERT_CHUNK]
                    added = await conn.execute(
                        insert(executions).values(chunk).returning(executions.c.id)
                    )
                    made.update(added.scalars())
        except Conflict:
            made.clear()
            for row in values:
                try:
                    async with self._tx() as conn:
                        await _fence(conn, parent)
                        added = await conn.execute(
                            insert(executions).values(**row).returning(executions.c.id)
                        )
                        made.update(added.scalars())
                except Conflict:
                    continue
        return [child for child in children if child.id in made]

    async def fanout(
        self, tenant_id: str, parent_id: str, seq: int, *, winner: bool = True
    ) -> Fanout:
        """The children of ``parent_id``'s step run ``seq``, summarised (see :class:`Fanout`);
        ``winner=False`` leaves :attr:`Fanout.winner` out (only a ``parallel`` step of mode
        ``any`` needs it: the query orders every child that succeeded)."""
        e = executions.c
        mine = and_(e.tenant_id == tenant_id, e.parent_execution_id == parent_id,
                    e.parent_seq == seq)  # fmt: skip
        counts = select(
            func.count(),
            func.coalesce(func.sum(case((e.status.in_(ACTIVE_STATUSES), 1), else_=0)), 0),
            func.coalesce(func.sum(case((e.status == "succeeded", 1), else_=0)), 0),
        ).where(mine)
        bad = (
            select(e.parent_index, e.id, e.status, e.error)
            .where(mine, e.status.in_(("failed", "cancelled")))
            .order_by(e.parent_index)
            .limit(1)
        )
        good = (
            select(e.parent_index, e.id, e.status, e.output)
            .where(mine, e.status == "succeeded")
            .order_by(e.finished_at, e.parent_index)
            .limit(1)
        )
        async with self._auto() as conn:
            started, active, succeeded = (await conn.execute(counts)).one()
            failed = first = None
            if int(started) - int(active) - int(succeeded) > 0:
                row = (await conn.execute(bad)).first()
                if row is not None:
                    failed = FanoutChild(row.parent_index, row.id, row.status, error=row.error)
            if winner and int(succeeded) > 0:
                row = (await conn.execute(good)).first()
                if row is not None:
                    first = FanoutChild(row.parent_index, row.id, row.status, output=row.output)
        return Fanout(int(started), int(active), int(succeeded), failed, first)

    async def fanout_outputs(self, tenant_id: str, parent_id: str, seq: int) -> list[Any]:
        """The outputs of the children of ``parent_id``'s step run ``seq``, in index order."""
        e = executions.c
        query = (
            select(e.output)
            .where(
                e.tenant_id == tenant_id, e.parent_execution_id == parent_id, e.parent_seq == seq
            )
            .order_by(e.parent_index)
        )
        async with self._auto() as conn:
            return list((await conn.execute(query)).scalars())

    async def fanout_queued(self, tenant_id: str, parent_id: str, seq: int) -> list[Execution]:
        """The children of ``parent_id``'s step run ``seq`` that are still ``queued``."""
        e = executions.c
        query = select(executions).where(
            e.tenant_id == tenant_id, e.parent_execution_id == parent_id, e.parent_seq == seq,
            e.status == "queued",
        ).order_by(e.parent_index)  # fmt: skip
        async with self._auto() as conn:
            rows = (await conn.execute(query)).all()
        return [Execution.from_mapping(r._mapping) for r in rows]

    async def fanout_active(self, tenant_id: str, parent_id: str, seq: int) -> list[str]:
        """The children of ``parent_id``'s step run ``seq`` that have not ended."""
        e = executions.c
        query = select(e.id).where(
            e.tenant_id == tenant_id, e.parent_execution_id == parent_id, e.parent_seq == seq,
            e.status.in_(ACTIVE_STATUSES),
        )  # fmt: skip
        async with self._auto() as conn:
            return list((await conn.execute(query)).scalars())

    async def notify_parent(
        self, execution_id: str, now: datetime, ended: Claim | None = None, status: str = ""
    ) -> tuple[Sent, Execution | None] | None:
        """Tell the parent of ``execution_id`` (if any, still running) that it ended: the event
        sent (``woken`` names the parent when it was parked on the step: enqueue the parent
        returned with it), or ``None`` when there is nothing to tell (no parent, the parent
        ended, or it was told already). ``ended`` and ``status``: the child's claim and final
        status when the caller just finished it (saves reading them back)."""
        if ended is not None and status in _ENDED:
            tenant_id, parent_id, seq = ended.tenant_id, ended.parent_execution_id, ended.parent_seq
        else:
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
            if row is None:
                return None
            tenant_id, parent_id, seq = row.tenant_id, row.parent_execution_id, row.parent_seq
            status = row.status
        if parent_id is None or seq is None or status not in _ENDED:
            return None
        return await self._events.send_child_end(
            tenant_id,
            parent_id,
            child_event(seq),
            {"childId": execution_id, "status": status},
            now,
            idempotency_key=f"conveyor.child:{execution_id}",
        )
