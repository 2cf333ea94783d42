"""Seeding executions in any state, with their step runs, timers and schedule ticks, for the
retention tests (rows written directly: the states and instants are the point)."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, select

from conveyor.store import Store, new_id
from conveyor.store.schema import executions, schedule_ticks, schedules, step_runs, timers

NOOP = {"name": "wf", "steps": [{"id": "a", "type": "noop"}]}
_ticks = itertools.count(1)


def _instant(at: datetime) -> datetime:
    """``at`` made unique among ticks (a few ms later): one tick per schedule and instant."""
    return at + timedelta(milliseconds=next(_ticks))


@dataclass
class Tenant:
    id: str
    workflow_id: str
    schedule_id: str


async def tenant(store: Store, name: str, at: datetime) -> Tenant:
    t = await store.tenants.create(name)
    wf = await store.workflows.create(t.id, NOOP)
    schedule_id = new_id()
    async with store.engine.begin() as conn:
        await conn.execute(
            schedules.insert().values(
                id=schedule_id, tenant_id=t.id, workflow_id=wf.id, cron="0 * * * * *",
                timezone="UTC", next_fire_at=None, created_at=at, updated_at=at,
            )
        )  # fmt: skip
    return Tenant(t.id, wf.id, schedule_id)


async def execution(
    store: Store,
    owner: Tenant,
    status: str,
    *,
    created: datetime,
    finished: datetime | None = None,
    steps: int = 2,
    timer: bool = False,
    tick: bool = False,
    lease_until: datetime | None = None,
    id_at: datetime | None = None,
    parent: str | None = None,
) -> str:
    """One execution of ``owner`` in ``status`` with ``steps`` step runs, optionally a fired
    timer and the schedule tick that created it; returns its id (made at ``id_at``, which picks
    its partition on PostgreSQL; default now)."""
    eid = new_id(id_at)
    row: dict[str, Any] = dict(
        id=eid, tenant_id=owner.id, workflow_id=owner.workflow_id, workflow_version=1,
        status=status, region="us", triggered_by="schedule" if tick else "api",
        input={"n": 1}, output={"ok": True} if status == "succeeded" else None,
        created_at=created, queued_at=created, started_at=created, finished_at=finished,
        updated_at=finished or created, lease_expires_at=lease_until,
        next_step=steps, steps_run=steps, parent_execution_id=parent,
        parent_seq=None if parent is None else 0, depth=0 if parent is None else 1,
    )  # fmt: skip
    async with store.engine.begin() as conn:
        await conn.execute(executions.insert().values(**row))
        if steps:
            await conn.execute(
                step_runs.insert(),
                [
                    dict(execution_id=eid, seq=i, tenant_id=owner.id, step_id=f"s{i}",
                         step_type="noop", status="succeeded", attempts=1, input={"i": i},
                         output={"i": i}, started_at=created, finished_at=created)
                    for i in range(steps)
                ],
            )  # fmt: skip
        if timer:
            await conn.execute(
                timers.insert().values(
                    id=new_id(), tenant_id=owner.id, execution_id=eid,
                    workflow_id=owner.workflow_id, region="us", seq=0,
                    due_at=created + timedelta(seconds=1),
                    status="pending" if status == "waiting" else "fired",
                    fired_at=None if status == "waiting" else created, created_at=created,
                )
            )  # fmt: skip
        if tick:
            await conn.execute(
                schedule_ticks.insert().values(
                    schedule_id=owner.schedule_id, fire_time=_instant(created), tenant_id=owner.id,
                    execution_id=eid, created_at=created, outcome="fired",
                )
            )  # fmt: skip
    return eid


async def idle_tick(store: Store, owner: Tenant, at: datetime, outcome: str = "collapsed") -> None:
    async with store.engine.begin() as conn:
        await conn.execute(
            schedule_ticks.insert().values(
                schedule_id=owner.schedule_id, fire_time=_instant(at), tenant_id=owner.id,
                execution_id=None, created_at=at, outcome=outcome,
            )
        )  # fmt: skip


async def ids(store: Store, tenant_id: str | None = None) -> set[str]:
    query = select(executions.c.id)
    if tenant_id is not None:
        query = query.where(executions.c.tenant_id == tenant_id)
    async with store.engine.connect() as conn:
        return set((await conn.execute(query)).scalars())


async def children(store: Store, execution_id: str) -> tuple[int, int, int]:
    """(step runs, timers, ticks) of one execution."""
    async with store.engine.connect() as conn:
        out = []
        for table in (step_runs, timers, schedule_ticks):
            out.append(
                (
                    await conn.execute(
                        select(func.count())
                        .select_from(table)
                        .where(table.c.execution_id == execution_id)
                    )
                ).scalar_one()
            )
    return out[0], out[1], out[2]


async def count(store: Store, table: Any) -> int:
    async with store.engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())
