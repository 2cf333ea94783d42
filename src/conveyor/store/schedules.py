"""Cron schedules and their ticks.

A schedule is a cron expression (5 fields, or 6 with seconds first — as BullMQ's cron-parser,
Quartz and Spring write it; see :mod:`conveyor.cron`) in an IANA time zone, validated on every
save, enabled or not: a malformed expression, an unknown zone, or an expression that never fires
(``0 0 30 2 *``) is :class:`ScheduleInvalid` naming the field. ``next_fire_at`` is always the
next fire instant in UTC.

Time zones and DST (:func:`next_fire_time`): the scheduler's rules (:mod:`conveyor.cron`). Cron
fields are matched against the local wall clock; a wall time that does not exist (spring
forward) fires at the transition instant (02:30 in a skipped hour fires at 03:00); a wall time
that exists twice (fall back) fires once, at its first occurrence, unless the hour field is a
wildcard.

Exactly once per tick: :meth:`ScheduleService.fire` records ``(schedule_id, fire_time)`` under
the primary key of ``schedule_ticks`` **in the same transaction** that creates the execution, so
two schedulers that both believe they lead cannot fire one tick twice; that execution carries
the tick instant as ``scheduled_for``. The misfire policy (which missed ticks to fire) is the
scheduler's decision; this module only records.
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.cron import next_fire, parse_cron
from conveyor.errors import CronInvalid, NotFound, ScheduleInvalid
from conveyor.store._base import ServiceBase, page_limit
from conveyor.store._types import check_storable, new_id, utcnow
from conveyor.store.records import Execution, FiredTick, Page, Schedule
from conveyor.store.schema import executions, schedule_ticks, schedules, workflows
from conveyor.store.triggers import insert_values, new_execution

__all__ = ["MISFIRE_POLICIES", "ScheduleService", "next_fire_time", "validate_schedule"]

MISFIRE_POLICIES = ("fire_once", "skip")
_UPDATABLE = frozenset({"name", "cron", "timezone", "enabled", "input", "misfire_policy"})


def validate_schedule(cron: str, timezone: str, misfire_policy: str | None = None) -> ZoneInfo:
    """Raise :class:`ScheduleInvalid` (details name the field) unless all three are valid; a
    cron expression must also fire at least once (:func:`conveyor.cron.parse_cron`)."""
    if not isinstance(cron, str) or len(cron) > 200:
        raise ScheduleInvalid(f"invalid cron expression {cron!r:.100}", field="cron")
    try:
        parse_cron(cron)  # the zone does not change whether (or how) the fields are valid
    except CronInvalid as exc:
        raise ScheduleInvalid(str(exc), field="cron") from None
    try:
        zone = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError, TypeError):
        raise ScheduleInvalid(f"unknown time zone {timezone!r:.100}", field="timezone") from None
    if misfire_policy is not None and misfire_policy not in MISFIRE_POLICIES:
        raise ScheduleInvalid(
            f"misfire_policy must be one of {', '.join(MISFIRE_POLICIES)}", field="misfire_policy"
        )
    return zone


def next_fire_time(cron: str, timezone: str, after: datetime) -> datetime:
    """The first fire instant strictly after ``after`` (aware), in UTC, exact to the second:
    :func:`conveyor.cron.next_fire`, the scheduler's own rule, so the ``next_fire_at`` saved
    here is the tick the scheduler fires."""
    validate_schedule(cron, timezone)
    try:
        return next_fire(parse_cron(cron, timezone), after)
    except CronInvalid as exc:
        raise ScheduleInvalid(str(exc), field="cron") from None


def _check_input(value: Any) -> None:
    try:
        check_storable(value, "input")
    except ValueError as exc:
        raise ScheduleInvalid(str(exc), field="input") from None


class ScheduleService(ServiceBase):
    """Schedules CRUD (tenant-scoped) and the scheduler's queries (system)."""

    async def create(
        self,
        tenant_id: str,
        workflow_id: str,
        cron: str,
        timezone: str = "UTC",
        *,
        name: str | None = None,
        input: Any = None,
        enabled: bool = True,
        misfire_policy: str | None = None,
    ) -> Schedule:
        validate_schedule(cron, timezone, misfire_policy)
        _check_input(input)
        now = utcnow()
        schedule = Schedule(
            id=new_id(),
            tenant_id=tenant_id,
            workflow_id=workflow_id,
            name=name,
            cron=cron,
            timezone=timezone,
            enabled=enabled,
            input=input,
            misfire_policy=misfire_policy,
            next_fire_at=next_fire_time(cron, timezone, now) if enabled else None,
            last_fired_at=None,
            created_at=now,
            updated_at=now,
        )
        async with self._tx() as conn:
            await self._check_workflow(conn, tenant_id, workflow_id)
            await conn.execute(
                schedules.insert().values(
                    id=schedule.id,
                    tenant_id=tenant_id,
                    workflow_id=workflow_id,
                    name=name,
                    cron=cron,
                    timezone=timezone,
                    enabled=enabled,
                    input=input,
                    misfire_policy=misfire_policy,
                    next_fire_at=schedule.next_fire_at,
                    created_at=now,
                    updated_at=now,
                )
            )
        return schedule

    @staticmethod
    async def _check_workflow(conn: AsyncConnection, tenant_id: str, workflow_id: str) -> None:
        found = (
            await conn.execute(
                select(workflows.c.id).where(
                    workflows.c.tenant_id == tenant_id,
                    workflows.c.id == workflow_id,
                    workflows.c.deleted_at.is_(None),
                )
            )
        ).first()
        if found is None:
            raise NotFound("workflow not found", workflow_id=workflow_id)

    async def get(self, tenant_id: str, schedule_id: str) -> Schedule:
        async with self._auto() as conn:
            row = (
                await conn.execute(
                    select(schedules).where(
                        schedules.c.tenant_id == tenant_id, schedules.c.id == schedule_id
                    )
                )
            ).first()
        if row is None:
            raise NotFound("schedule not found", schedule_id=schedule_id)
        return Schedule.from_mapping(row._mapping)

    async def list(
        self,
        tenant_id: str,
        *,
        workflow_id: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> Page[Schedule]:
        query = select(schedules).where(schedules.c.tenant_id == tenant_id)
        if workflow_id is not None:
            query = query.where(schedules.c.workflow_id == workflow_id)
        return await self._page(query, schedules, Schedule, limit=limit, cursor=cursor)

    async def update(
        self, tenant_id: str, schedule_id: str, changes: Mapping[str, Any]
    ) -> Schedule:
        """Change ``name``, ``cron``, ``timezone``, ``enabled``, ``input`` or
        ``misfire_policy``; the next fire time is recomputed from now."""
        unknown = set(changes) - _UPDATABLE
        if unknown:
            raise ScheduleInvalid(
                f"cannot change {', '.join(sorted(unknown))}", field=sorted(unknown)[0]
            )
        current = await self.get(tenant_id, schedule_id)
        merged = {name: getattr(current, name) for name in _UPDATABLE} | dict(changes)
        validate_schedule(merged["cron"], merged["timezone"], merged["misfire_policy"])
        _check_input(merged["input"])
        now = utcnow()
        next_at = (
            next_fire_time(merged["cron"], merged["timezone"], now) if merged["enabled"] else None
        )
        async with self._auto() as conn:
            row = (
                await conn.execute(
                    update(schedules)
                    .where(schedules.c.tenant_id == tenant_id, schedules.c.id == schedule_id)
                    .values(**merged, next_fire_at=next_at, updated_at=now)
                    .returning(*schedules.c)
                )
            ).first()
        if row is None:
            raise NotFound("schedule not found", schedule_id=schedule_id)
        return Schedule.from_mapping(row._mapping)

    async def delete(self, tenant_id: str, schedule_id: str) -> None:
        async with self._auto() as conn:
            result = await conn.execute(
                schedules.delete().where(
                    schedules.c.tenant_id == tenant_id, schedules.c.id == schedule_id
                )
            )
        if not result.rowcount:
            raise NotFound("schedule not found", schedule_id=schedule_id)

    # --- the scheduler (system-wide, not tenant-scoped) ---------------------------------------

    async def due(self, now: datetime, *, limit: int = 500) -> builtins.list[Schedule]:
        """Enabled schedules of live workflows whose ``next_fire_at`` is at or before ``now``,
        earliest first."""
        query = (
            select(schedules)
            .join(workflows, workflows.c.id == schedules.c.workflow_id)
            .where(
                schedules.c.enabled.is_(True),
                schedules.c.next_fire_at <= now,
                workflows.c.deleted_at.is_(None),
            )
            .order_by(schedules.c.next_fire_at)
            .limit(limit)
        )
        async with self._auto() as conn:
            rows = (await conn.execute(query)).all()
        return [Schedule.from_mapping(r._mapping) for r in rows]

    async def next_due_at(self) -> datetime | None:
        """The earliest ``next_fire_at`` of any enabled schedule."""
        async with self._auto() as conn:
            row = (
                await conn.execute(
                    select(schedules.c.next_fire_at)
                    .where(schedules.c.enabled.is_(True), schedules.c.next_fire_at.is_not(None))
                    .order_by(schedules.c.next_fire_at)
                    .limit(1)
                )
            ).first()
        return None if row is None else row.next_fire_at

    async def fire(
        self, schedule: Schedule, fire_time: datetime, *, next_fire_at: datetime | None
    ) -> FiredTick | None:
        """Record tick ``(schedule, fire_time)``, create its execution and move the schedule
        to ``next_fire_at`` — all in one transaction.

        Returns ``None`` if that tick was already recorded (another scheduler fired it; the
        schedule is still advanced). The tick's execution is ``None`` when the workflow is
        disabled or deleted. The caller enqueues the execution after this returns.
        """
        now = utcnow()
        async with self._tx() as conn:
            execution = await self._tick_execution(conn, schedule, fire_time, now)
            inserted = (
                await conn.execute(
                    self._insert(schedule_ticks)
                    .values(
                        schedule_id=schedule.id,
                        fire_time=fire_time,
                        tenant_id=schedule.tenant_id,
                        created_at=now,
                        execution_id=execution.id if execution is not None else None,
                    )
                    .on_conflict_do_nothing(index_elements=["schedule_id", "fire_time"])
                    .returning(schedule_ticks.c.schedule_id)
                )
            ).first()
            await self._advance(conn, schedule, fire_time if inserted else None, next_fire_at, now)
            if inserted is None:
                return None
            if execution is not None:
                await conn.execute(executions.insert().values(insert_values(execution)))
        return FiredTick(schedule_id=schedule.id, fire_time=fire_time, execution=execution)

    async def skip(self, schedule: Schedule, *, next_fire_at: datetime | None) -> None:
        """Move the schedule to ``next_fire_at`` without firing (misfire policy ``skip``)."""
        async with self._tx() as conn:
            await self._advance(conn, schedule, None, next_fire_at, utcnow())

    @staticmethod
    async def _advance(
        conn: AsyncConnection,
        schedule: Schedule,
        fired: datetime | None,
        next_fire_at: datetime | None,
        now: datetime,
    ) -> None:
        values: dict[str, Any] = {"next_fire_at": next_fire_at, "updated_at": now}
        if fired is not None:
            values["last_fired_at"] = fired
        await conn.execute(update(schedules).where(schedules.c.id == schedule.id).values(values))

    @staticmethod
    async def _tick_execution(
        conn: AsyncConnection, schedule: Schedule, fire_time: datetime, now: datetime
    ) -> Execution | None:
        """The execution the tick ``fire_time`` of ``schedule`` creates (not stored), or
        ``None`` if the workflow is disabled or deleted."""
        found = (
            await conn.execute(
                select(workflows.c.current_version, workflows.c.region).where(
                    workflows.c.tenant_id == schedule.tenant_id,
                    workflows.c.id == schedule.workflow_id,
                    workflows.c.enabled.is_(True),
                    workflows.c.deleted_at.is_(None),
                )
            )
        ).first()
        if found is None:
            return None
        return new_execution(
            tenant_id=schedule.tenant_id,
            workflow_id=schedule.workflow_id,
            version=found.current_version,
            region=found.region,
            input=schedule.input,
            triggered_by="schedule",
            now=now,
            schedule_id=schedule.id,
            scheduled_for=fire_time,
        )

    async def ticks(
        self, tenant_id: str, schedule_id: str, *, limit: int = 100
    ) -> builtins.list[tuple[datetime, str | None]]:
        """The latest recorded ticks of a schedule: ``(fire_time, execution_id)``."""
        async with self._auto() as conn:
            rows = (
                await conn.execute(
                    select(schedule_ticks.c.fire_time, schedule_ticks.c.execution_id)
                    .where(
                        schedule_ticks.c.tenant_id == tenant_id,
                        schedule_ticks.c.schedule_id == schedule_id,
                    )
                    .order_by(schedule_ticks.c.fire_time.desc())
                    .limit(page_limit(limit))
                )
            ).all()
        return [(r.fire_time, r.execution_id) for r in rows]
