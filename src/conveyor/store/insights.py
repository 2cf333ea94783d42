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
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select

from conveyor.errors import NotFound
from conveyor.store._base import ServiceBase
from conveyor.store._types import utcnow
from conveyor.store.records import Execution, Page, Timer
from conveyor.store.schema import (
    executions,
    schedules,
    tenants,
    timers,
    workflow_versions,
    workflows,
)

__all__ = ["Activity", "ExecutionFilter", "InsightService", "VersionInfo"]

ACTIVITY_LOOKBACK = timedelta(hours=2)
"""How far before the charted hour an execution may have been created and still be counted
(its start, success or failure inside the hour): the activity query reads executions by
creation time (an index range), not every row's start time. One waiting on a longer delay
is not charted when it resumes."""
ACTIVITY_MAX_ROWS = 200_000
"""On SQLite (where the rows are bucketed in Python), a bound on the rows the activity query
reads: a flood larger than that is charted in part."""


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
    and the enqueue-to-start latency percentiles (ms; ``None`` for a minute without a start).

    The latency runs from the moment the execution could start — when it was queued, or for a
    schedule's tick recorded ahead of its instant, the instant — to its first start."""

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
    """The ``q``-quantile (0..1) of ``values``, interpolated linearly between the closest
    ranks as PostgreSQL's ``percentile_cont`` does (so both backends chart the same figure);
    ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def _aware(at: datetime) -> datetime:
    return at if at.tzinfo is not None else at.replace(tzinfo=UTC)


def _slot(at: datetime | None, start: datetime, end: datetime) -> int | None:
    """The minute of ``at`` counted from ``start``; ``None`` outside ``[start, end)``."""
    if at is None or at < start or at >= end:
        return None
    return int((at - start).total_seconds() // 60)


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
        """The last ``minutes`` minutes of executions, per minute (see :class:`Activity`).

        On PostgreSQL the database aggregates (counts and ``percentile_cont`` per minute, two
        small result sets whatever the rate); on SQLite the rows are read and bucketed here."""
        now = now or utcnow()
        end = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
        start = end - timedelta(minutes=minutes)
        activity = Activity(
            minutes=[start + timedelta(minutes=i) for i in range(minutes)],
            started=[0] * minutes,
            succeeded=[0] * minutes,
            failed=[0] * minutes,
            p50_ms=[None] * minutes,
            p99_ms=[None] * minutes,
        )
        if self._dialect == "postgresql":
            await self._aggregate_in_database(activity, start, end)
        else:
            await self._aggregate_here(activity, start, end)
        return activity

    async def _aggregate_in_database(self, out: Activity, start: datetime, end: datetime) -> None:
        e = executions.c
        recent = e.created_at >= start - ACTIVITY_LOOKBACK
        minute = func.date_trunc("minute", e.started_at).label("minute")
        runnable = func.greatest(e.queued_at, e.scheduled_for)  # NULLs ignored
        latency = func.extract("epoch", e.started_at - runnable) * 1000.0
        starts = (
            select(
                minute,
                func.count(),
                func.percentile_cont(0.5).within_group(latency),
                func.percentile_cont(0.99).within_group(latency),
            )
            .where(recent, e.started_at >= start, e.started_at < end)
            .group_by(minute)
        )
        done_minute = func.date_trunc("minute", e.finished_at).label("minute")
        finishes = (
            select(done_minute, e.status, func.count())
            .where(
                recent,
                e.finished_at >= start,
                e.finished_at < end,
                e.status.in_(("succeeded", "failed")),
            )
            .group_by(done_minute, e.status)
        )
        async with self._auto() as conn:
            started = (await conn.execute(starts)).all()
            finished = (await conn.execute(finishes)).all()
        for at, count, p50, p99 in started:
            i = _slot(_aware(at), start, end)
            if i is not None:
                out.started[i] = int(count)
                out.p50_ms[i] = float(p50)
                out.p99_ms[i] = float(p99)
        for at, status, count in finished:
            i = _slot(_aware(at), start, end)
            if i is not None:
                (out.succeeded if status == "succeeded" else out.failed)[i] = int(count)

    async def _aggregate_here(self, out: Activity, start: datetime, end: datetime) -> None:
        e = executions.c
        query = (
            select(e.status, e.queued_at, e.scheduled_for, e.started_at, e.finished_at)
            .where(e.created_at >= start - ACTIVITY_LOOKBACK)
            .limit(ACTIVITY_MAX_ROWS)
        )
        async with self._auto() as conn:
            rows = (await conn.execute(query)).all()
        latencies: list[list[float]] = [[] for _ in out.minutes]
        for status, queued_at, scheduled_for, started_at, finished_at in rows:
            i = _slot(started_at, start, end)
            if i is not None:
                runnable = max(queued_at, scheduled_for or queued_at)
                out.started[i] += 1
                latencies[i].append((started_at - runnable).total_seconds() * 1000.0)
            j = _slot(finished_at, start, end)
            if j is not None and status == "succeeded":
                out.succeeded[j] += 1
            elif j is not None and status == "failed":
                out.failed[j] += 1
        for i, values in enumerate(latencies):
            out.p50_ms[i] = percentile(values, 0.5)
            out.p99_ms[i] = percentile(values, 0.99)

    async def names(
        self, tenant_ids: Sequence[str], workflow_ids: Sequence[str]
    ) -> tuple[dict[str, str], dict[str, str]]:
        """``({tenant id: name}, {workflow id: name})`` for the ids that exist (two primary-key
        look-ups; what a page of executions shows beside the ids)."""
        tenant_names: dict[str, str] = {}
        workflow_names: dict[str, str] = {}
        async with self._auto() as conn:
            if tenant_ids:
                query = select(tenants.c.id, tenants.c.name).where(
                    tenants.c.id.in_(sorted(set(tenant_ids)))
                )
                tenant_names = {r.id: r.name for r in (await conn.execute(query)).all()}
            if workflow_ids:
                query = select(workflows.c.id, workflows.c.name).where(
                    workflows.c.id.in_(sorted(set(workflow_ids)))
                )
                workflow_names = {r.id: r.name for r in (await conn.execute(query)).all()}
        return tenant_names, workflow_names

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
