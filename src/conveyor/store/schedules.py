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
the tick instant as ``scheduled_for``. :meth:`ScheduleService.materialise` does the same for
many schedules and ticks at once (the scheduler records the ticks of its look-ahead window
ahead): a compare-and-set on the schedules, one multi-row tick insert that ``RETURNING`` says
which ticks it wrote, one multi-row execution insert for those. Every tick row has an
``outcome`` (``fired``, ``collapsed``, ``skipped``, ``cancelled``, ``disabled``); an edit,
disable or delete cancels the ticks materialised ahead whose instant is still to come. The
misfire policy (which missed ticks to fire) is the scheduler's decision; this module only
records.
"""

from __future__ import annotations

import builtins
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from sqlalchemy import func, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.cron import next_fire, parse_cron
from conveyor.errors import CronInvalid, NotFound, ScheduleInvalid
from conveyor.store._base import ServiceBase, decode_cursor, encode_cursor, page_limit
from conveyor.store._ticks import cancel_ticks_ahead, lock_schedules
from conveyor.store._types import check_storable, new_id, utcnow
from conveyor.store.records import Execution, FiredTick, Page, Schedule, ScheduleTick
from conveyor.store.schema import executions, schedule_ticks, schedules, workflows
from conveyor.store.triggers import insert_values, new_execution

__all__ = [
    "MISFIRE_POLICIES",
    "PlannedTicks",
    "ScheduleService",
    "next_fire_time",
    "validate_schedule",
]

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


@dataclass(frozen=True, slots=True)
class PlannedTicks:
    """What the scheduler decided for one schedule it loaded (:meth:`ScheduleService.due`):
    the ticks to record, each with its outcome, and where the schedule moves next."""

    schedule: Schedule
    """As loaded: its ``next_fire_at``, ``cron``, ``timezone`` are compared on write."""
    ticks: Sequence[tuple[datetime, str]]
    """``(fire_time, outcome)``, oldest first; outcome ``fired`` creates an execution,
    ``collapsed``/``skipped`` record a misfire."""
    next_fire_at: datetime | None


_TICK_CHUNK = 500

# Postgres: the batch statements of materialise take one array per column (``unnest``), so
# their text is the same whatever the batch size — compiled and prepared once, not per batch
# (rendering a 500-row VALUES list cost more CPU than the database spent running it).
_ADVANCE_MANY = text("""
UPDATE schedules AS s
   SET next_fire_at = p.next_at,
       last_fired_at = coalesce(p.fired, s.last_fired_at),
       updated_at = :now
  FROM unnest(CAST(:sid AS text[]), CAST(:seen AS timestamptz[]), CAST(:cron AS text[]),
              CAST(:tz AS text[]), CAST(:next_at AS timestamptz[]), CAST(:fired AS timestamptz[]),
              CAST(:changed AS timestamptz[]))
       AS p(sid, seen, cron, tz, next_at, fired, changed)
 WHERE s.id = p.sid AND s.next_fire_at = p.seen AND s.cron = p.cron AND s.timezone = p.tz
   AND s.updated_at = p.changed AND s.enabled
RETURNING s.id
""")
"""The compare-and-set of a pass's plans: a schedule changed since the pass read it (any
edit: its input too, which leaves the next fire time where it was) is not moved, and the
plan's ticks are not recorded."""
_ADVANCE_COLUMNS = ("sid", "seen", "cron", "tz", "next_at", "fired", "changed")
_TICK_COLUMNS = ("schedule_id", "fire_time", "tenant_id", "created_at", "execution_id", "outcome")
_INSERT_TICKS = text("""
INSERT INTO schedule_ticks AS t (schedule_id, fire_time, tenant_id, created_at, execution_id,
                                 outcome)
SELECT * FROM unnest(CAST(:schedule_id AS text[]), CAST(:fire_time AS timestamptz[]),
                     CAST(:tenant_id AS text[]), CAST(:created_at AS timestamptz[]),
                     CAST(:execution_id AS text[]), CAST(:outcome AS text[]))
ON CONFLICT (schedule_id, fire_time) DO UPDATE
   SET execution_id = excluded.execution_id, outcome = excluded.outcome,
       created_at = excluded.created_at
 WHERE t.outcome = 'cancelled'
RETURNING schedule_id, fire_time
""")
"""Most rows per multi-row INSERT (SQLite allows 32766 bound values per statement)."""


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
        async with self._tx() as conn:
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
            await cancel_ticks_ahead(conn, tenant_id, now, schedule_id=schedule_id)
        return Schedule.from_mapping(row._mapping)

    async def delete(self, tenant_id: str, schedule_id: str) -> None:
        """Delete the schedule and its ticks; executions materialised ahead for ticks not yet
        due are cancelled (their delayed jobs then do nothing)."""
        async with self._tx() as conn:
            # the row first: a scheduler pass materialising its ticks holds it until it commits
            # (cancelled before, its ticks would not be seen, and would fire)
            if not await lock_schedules(conn, tenant_id, schedule_id=schedule_id):
                raise NotFound("schedule not found", schedule_id=schedule_id)
            await cancel_ticks_ahead(conn, tenant_id, utcnow(), schedule_id=schedule_id)
            await conn.execute(
                schedules.delete().where(
                    schedules.c.tenant_id == tenant_id, schedules.c.id == schedule_id
                )
            )

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

    async def count_due(self, horizon: datetime) -> int:
        """How many enabled schedules have their next tick at or before ``horizon`` (an index
        range count: how much work is coming, for the scheduler's look-ahead)."""
        query = (
            select(func.count())
            .select_from(schedules)
            .where(schedules.c.enabled.is_(True), schedules.c.next_fire_at <= horizon)
        )
        async with self._auto() as conn:
            return int((await conn.execute(query)).scalar_one())

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
                        outcome="fired" if execution is not None else "disabled",
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

    async def materialise(
        self, plans: Sequence[PlannedTicks]
    ) -> tuple[builtins.list[FiredTick], builtins.set[str]]:
        """Record the planned ticks of many schedules and advance them, in one transaction
        and a handful of statements whatever the number of ticks.

        1. One ``UPDATE schedules … FROM unnest(…)`` moves every schedule to its new
           ``next_fire_at`` **only if** its ``next_fire_at``, ``cron``, ``timezone`` are still
           those the scheduler planned from and it is enabled (compare-and-set; it also locks
           the rows, so an API edit committing meanwhile either waits for this transaction —
           and then cancels what it materialised — or wins, and these ticks are not written).
        2. One multi-row ``INSERT INTO schedule_ticks … ON CONFLICT (schedule_id, fire_time)``
           per chunk of ticks of the schedules that moved: ``DO NOTHING``, except that a tick
           ``cancelled`` by an edit is recorded again (``DO UPDATE … WHERE outcome =
           'cancelled'``). ``RETURNING`` says which ticks this call wrote.
        3. One multi-row ``INSERT INTO executions`` for the ``fired`` ticks written — so a tick
           recorded elsewhere (a second leader) creates no execution here.

        Returns the ``fired`` ticks written (with their executions; ``None`` when the workflow
        is disabled: such ticks are recorded ``disabled``) — not the misfires — and the ids of
        the schedules moved.
        """
        if not plans:
            return [], set()
        now = utcnow()
        async with self._tx() as conn:
            moved = await self._advance_many(conn, plans, now)
            versions = await self._live_workflows(conn, {p.schedule.workflow_id for p in plans})
            rows: builtins.list[dict[str, Any]] = []
            pending: dict[tuple[str, datetime], tuple[str, Execution | None]] = {}
            for plan in plans:
                if plan.schedule.id not in moved:
                    continue
                found = versions.get(plan.schedule.workflow_id)
                for fire_time, outcome in plan.ticks:
                    execution: Execution | None = None
                    if outcome == "fired":
                        if found is None:
                            outcome = "disabled"
                        else:
                            execution = self._new_tick_execution(plan.schedule, fire_time,
                                                                 found, now)  # fmt: skip
                    pending[(plan.schedule.id, fire_time)] = (outcome, execution)
                    rows.append({
                        "schedule_id": plan.schedule.id, "fire_time": fire_time,
                        "tenant_id": plan.schedule.tenant_id, "created_at": now,
                        "execution_id": execution.id if execution is not None else None,
                        "outcome": outcome,
                    })  # fmt: skip
            fired: builtins.list[FiredTick] = []
            for i in range(0, len(rows), _TICK_CHUNK):
                written = await self._insert_ticks(conn, rows[i : i + _TICK_CHUNK])
                new = [
                    FiredTick(schedule_id=sid, fire_time=at, execution=pending[(sid, at)][1])
                    for sid, at in written
                    if pending[(sid, at)][0] in ("fired", "disabled")
                ]
                created = [insert_values(t.execution) for t in new if t.execution is not None]
                if created:
                    await conn.execute(executions.insert(), created)
                fired += new
        fired.sort(key=lambda t: t.fire_time)
        return fired, moved

    async def _advance_many(
        self, conn: AsyncConnection, plans: Sequence[PlannedTicks], now: datetime
    ) -> builtins.set[str]:
        """Compare-and-set every planned schedule to its next fire time; ids of those moved.

        Postgres: one ``UPDATE … FROM unnest(<one array per column>)``. SQLite (in-process, one writer; no
        column aliases on ``VALUES``): one ``UPDATE`` per schedule in this transaction."""
        if self._dialect != "postgresql":
            return await self._advance_each(conn, plans, now)
        columns: tuple[builtins.list[Any], ...] = ([], [], [], [], [], [], [])
        for p in plans:
            fired = max((at for at, o in p.ticks if o == "fired"), default=None)
            row = (p.schedule.id, p.schedule.next_fire_at, p.schedule.cron, p.schedule.timezone,
                   p.next_fire_at, fired, p.schedule.updated_at)  # fmt: skip
            for values, value in zip(columns, row, strict=True):
                values.append(value)
        params: dict[str, Any] = dict(zip(_ADVANCE_COLUMNS, columns, strict=True))
        result = await conn.execute(_ADVANCE_MANY, {**params, "now": now})
        return {row.id for row in result}

    @staticmethod
    async def _advance_each(
        conn: AsyncConnection, plans: Sequence[PlannedTicks], now: datetime
    ) -> builtins.set[str]:
        moved: builtins.set[str] = set()
        for p in plans:
            last = max((at for at, o in p.ticks if o == "fired"), default=None)
            values: dict[str, Any] = {"next_fire_at": p.next_fire_at, "updated_at": now}
            if last is not None:
                values["last_fired_at"] = last
            row = (
                await conn.execute(
                    update(schedules)
                    .where(
                        schedules.c.id == p.schedule.id,
                        schedules.c.next_fire_at == p.schedule.next_fire_at,
                        schedules.c.cron == p.schedule.cron,
                        schedules.c.timezone == p.schedule.timezone,
                        schedules.c.updated_at == p.schedule.updated_at,
                        schedules.c.enabled.is_(True),
                    )
                    .values(values)
                    .returning(schedules.c.id)
                )
            ).first()
            if row is not None:
                moved.add(row.id)
        return moved

    @staticmethod
    async def _live_workflows(
        conn: AsyncConnection, workflow_ids: builtins.set[str]
    ) -> dict[str, tuple[int, str]]:
        """``workflow id -> (current version, region)`` of the enabled, live ones."""
        rows = await conn.execute(
            select(workflows.c.id, workflows.c.current_version, workflows.c.region).where(
                workflows.c.id.in_(sorted(workflow_ids)),
                workflows.c.enabled.is_(True),
                workflows.c.deleted_at.is_(None),
            )
        )
        return {r.id: (r.current_version, r.region) for r in rows}

    @staticmethod
    def _new_tick_execution(
        schedule: Schedule, fire_time: datetime, found: tuple[int, str], now: datetime
    ) -> Execution:
        return new_execution(
            tenant_id=schedule.tenant_id,
            workflow_id=schedule.workflow_id,
            version=found[0],
            region=found[1],
            input=schedule.input,
            triggered_by="schedule",
            now=now,
            schedule_id=schedule.id,
            scheduled_for=fire_time,
        )

    async def _insert_ticks(
        self, conn: AsyncConnection, rows: builtins.list[dict[str, Any]]
    ) -> builtins.list[tuple[str, datetime]]:
        """One multi-row INSERT; the ``(schedule_id, fire_time)`` it wrote."""
        if self._dialect == "postgresql":
            params = {name: [r[name] for r in rows] for name in _TICK_COLUMNS}
            result = await conn.execute(_INSERT_TICKS, params)
            return [(r.schedule_id, r.fire_time) for r in result]
        stmt = self._insert(schedule_ticks).values(rows)
        stmt = stmt.on_conflict_do_update(
            index_elements=["schedule_id", "fire_time"],
            set_={
                "execution_id": stmt.excluded.execution_id,
                "outcome": stmt.excluded.outcome,
                "created_at": stmt.excluded.created_at,
            },
            where=schedule_ticks.c.outcome == "cancelled",
        ).returning(schedule_ticks.c.schedule_id, schedule_ticks.c.fire_time)
        result = await conn.execute(stmt)
        return [(r.schedule_id, r.fire_time) for r in result]

    async def staged(self, since: datetime, *, limit: int = 5000) -> builtins.list[Execution]:
        """Executions of ``fired`` ticks at or after ``since`` that are still ``queued``: what
        a new leader puts on the queue again (same job ids, so jobs already there are left
        alone), in case the previous leader died between recording them and enqueueing."""
        query = (
            select(executions)
            .join(schedule_ticks, schedule_ticks.c.execution_id == executions.c.id)
            .where(
                schedule_ticks.c.fire_time >= since,
                schedule_ticks.c.outcome == "fired",
                executions.c.status == "queued",
            )
            .order_by(schedule_ticks.c.fire_time)
            .limit(limit)
        )
        async with self._auto() as conn:
            rows = (await conn.execute(query)).all()
        return [Execution.from_mapping(r._mapping) for r in rows]

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
        self,
        tenant_id: str,
        schedule_id: str,
        *,
        limit: int = 100,
        before: datetime | None = None,
    ) -> builtins.list[ScheduleTick]:
        """The recorded ticks of a schedule, latest first, with their outcome; ``before``
        (exclusive) pages back. Tenant-scoped."""
        query = select(schedule_ticks).where(
            schedule_ticks.c.tenant_id == tenant_id,
            schedule_ticks.c.schedule_id == schedule_id,
        )
        if before is not None:
            query = query.where(schedule_ticks.c.fire_time < before)
        query = query.order_by(schedule_ticks.c.fire_time.desc()).limit(page_limit(limit - 1) + 1)
        async with self._auto() as conn:
            rows = (await conn.execute(query)).all()
        return [
            ScheduleTick(fire_time=r.fire_time, outcome=r.outcome,
                         execution_id=r.execution_id, created_at=r.created_at)
            for r in rows
        ]  # fmt: skip

    async def tick_page(
        self, tenant_id: str, schedule_id: str, *, limit: int = 50, cursor: str | None = None
    ) -> Page[ScheduleTick]:
        """One page of a schedule's ticks, latest first (``NotFound`` for a schedule of
        another tenant); pass ``next_cursor`` back as ``cursor`` for the next page."""
        await self.get(tenant_id, schedule_id)
        before = decode_cursor(cursor)[0] if cursor else None
        limit = page_limit(limit)
        items = await self.ticks(tenant_id, schedule_id, limit=limit + 1, before=before)
        more = len(items) > limit
        items = items[:limit]
        next_cursor = encode_cursor(items[-1].fire_time, schedule_id) if more else None
        return Page(items=items, next_cursor=next_cursor)
