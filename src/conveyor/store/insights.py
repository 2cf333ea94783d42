"""What operators read across tenants (the operations console): executions searched by any
filter, the last hour's activity, the next due timers, a workflow's versions.

Admin reads, not tenant reads: they are served only behind the admin token. A filter that
names a workflow or a schedule is resolved to its tenant first, so the search runs on the
per-tenant indexes; without one it runs on ``ix_executions_created`` /
``ix_executions_status_created`` (migration 0004). Either way a page reads ``limit + 1`` rows
of an index in order — no sort, whatever the table's size.
"""

from __future__ import annotations

import builtins
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from conveyor.errors import NotFound
from conveyor.store._base import ServiceBase
from conveyor.store._types import utcnow
from conveyor.store.records import Execution, Page, Timer
from conveyor.store.schema import executions, schedules, timers, workflow_versions, workflows

__all__ = ["Activity", "ExecutionFilter", "InsightService", "VersionInfo"]

ACTIVITY_LOOKBACK = timedelta(hours=2)
"""How far before the charted hour an execution may have been created and still be counted
(its start, success or failure inside the hour): the activity query reads executions by
creation time (an index range), not every row's start time. One waiting on a longer delay
is not charted when it resumes."""
ACTIVITY_MAX_ROWS = 200_000
"""A bound on the rows the activity query reads (a flood larger than that is charted in
part)."""


@dataclass(frozen=True, slots=True)
class ExecutionFilter:
    """A search of executions across tenants; every field is optional."""

    tenant_id: str | None = None
    workflow_id: str | None = None
    status: str | None = None
    schedule_id: str | None = None
    since: datetime | None = None
    """Created at or after (inclusive)."""
    until: datetime | None = None
    """Created before (exclusive)."""


@dataclass(frozen=True, slots=True)
class Activity:
    """Per minute of the last hour (oldest first): executions started, succeeded and failed,
    and the enqueue-to-start latency percentiles (ms; ``None`` for a minute without a start)."""

    minutes: list[datetime]
    started: list[int] = field(default_factory=list)
    succeeded: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    p50_ms: list[float | None] = field(default_factory=list)
    p99_ms: list[float | None] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class VersionInfo:
    version: int
    created_at: datetime


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-quantile (0..1) of ``values`` by nearest rank; ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1))
    return ordered[rank]


class InsightService(ServiceBase):
    """Cross-tenant reads for operators (see the module docstring)."""

    async def find_execution(self, execution_id: str) -> Execution:
        """The execution with this id, whichever tenant owns it (NotFound otherwise)."""
        async with self._auto() as conn:
            row = (
                await conn.execute(select(executions).where(executions.c.id == execution_id))
            ).first()
        if row is None:
            raise NotFound("execution not found", execution_id=execution_id)
        return Execution.from_mapping(row._mapping)

    async def search_executions(
        self, where: ExecutionFilter, *, limit: int = 50, cursor: str | None = None
    ) -> Page[Execution]:
        """Executions matching ``where``, newest first, cursor-paginated like the tenant list.

        A workflow or schedule that does not exist (or belongs to another tenant than the one
        named) matches nothing."""
        tenant_id = where.tenant_id
        workflow_id = where.workflow_id
        if where.schedule_id is not None:
            owner = await self._owner(schedules.c.id, where.schedule_id)
            if owner is None or (workflow_id is not None and owner[1] != workflow_id):
                return Page([], None)
            tenant_id, workflow_id = self._same_tenant(tenant_id, owner[0]), owner[1]
        elif workflow_id is not None:
            owner = await self._owner(workflows.c.id, workflow_id)
            tenant_id = self._same_tenant(tenant_id, owner[0] if owner else "")
        if tenant_id == "":
            return Page([], None)
        query = select(executions)
        if tenant_id is not None:
            query = query.where(executions.c.tenant_id == tenant_id)
        if workflow_id is not None:
            query = query.where(executions.c.workflow_id == workflow_id)
        if where.schedule_id is not None:
            query = query.where(executions.c.schedule_id == where.schedule_id)
        if where.status is not None:
            query = query.where(executions.c.status == where.status)
        if where.since is not None:
            query = query.where(executions.c.created_at >= where.since)
        if where.until is not None:
            query = query.where(executions.c.created_at < where.until)
        return await self._page(query, executions, Execution, limit=limit, cursor=cursor)

    @staticmethod
    def _same_tenant(named: str | None, owner: str) -> str:
        """The owner's tenant, or ``""`` (nothing matches) when another tenant was named."""
        return owner if named is None or named == owner else ""

    async def _owner(self, id_column: Any, object_id: str) -> tuple[str, str] | None:
        """``(tenant_id, workflow_id)`` of a schedule or workflow (by its ``id_column``), or
        ``None`` if absent."""
        table = id_column.table
        workflow = table.c.workflow_id if table is schedules else table.c.id
        query = select(table.c.tenant_id, workflow).where(id_column == object_id)
        async with self._auto() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else (str(row[0]), str(row[1]))

    async def activity(self, now: datetime | None = None, minutes: int = 60) -> Activity:
        """The last ``minutes`` minutes of executions, per minute (see :class:`Activity`)."""
        now = now or utcnow()
        end = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
        start = end - timedelta(minutes=minutes)
        query = (
            select(
                executions.c.status,
                executions.c.queued_at,
                executions.c.started_at,
                executions.c.finished_at,
            )
            .where(executions.c.created_at >= start - ACTIVITY_LOOKBACK)
            .limit(ACTIVITY_MAX_ROWS)
        )
        async with self._auto() as conn:
            rows = (await conn.execute(query)).all()
        slots = [start + timedelta(minutes=i) for i in range(minutes)]
        started = [0] * minutes
        succeeded = [0] * minutes
        failed = [0] * minutes
        latencies: list[list[float]] = [[] for _ in range(minutes)]

        def slot(at: datetime | None) -> int | None:
            if at is None or at < start or at >= end:
                return None
            return int((at - start).total_seconds() // 60)

        for status, queued_at, started_at, finished_at in rows:
            i = slot(started_at)
            if i is not None:
                started[i] += 1
                latencies[i].append((started_at - queued_at).total_seconds() * 1000.0)
            j = slot(finished_at)
            if j is not None and status == "succeeded":
                succeeded[j] += 1
            elif j is not None and status == "failed":
                failed[j] += 1
        return Activity(
            minutes=slots,
            started=started,
            succeeded=succeeded,
            failed=failed,
            p50_ms=[percentile(v, 0.5) for v in latencies],
            p99_ms=[percentile(v, 0.99) for v in latencies],
        )

    async def upcoming_timers(self, limit: int = 10) -> builtins.list[Timer]:
        """The pending timers due soonest (all tenants)."""
        query = (
            select(timers)
            .where(timers.c.status == "pending")
            .order_by(timers.c.due_at)
            .limit(limit)
        )
        async with self._auto() as conn:
            rows = (await conn.execute(query)).all()
        return [Timer.from_mapping(r._mapping) for r in rows]

    async def versions(self, tenant_id: str, workflow_id: str) -> builtins.list[VersionInfo]:
        """Every stored version of a workflow, newest first (tenant-scoped)."""
        query = (
            select(workflow_versions.c.version, workflow_versions.c.created_at)
            .where(
                workflow_versions.c.tenant_id == tenant_id,
                workflow_versions.c.workflow_id == workflow_id,
            )
            .order_by(workflow_versions.c.version.desc())
        )
        async with self._auto() as conn:
            rows = (await conn.execute(query)).all()
        return [VersionInfo(version=r.version, created_at=r.created_at) for r in rows]
