"""Cancelling the cron ticks a scheduler materialised ahead (shared by schedules and
workflows: an edited, disabled or deleted schedule, a disabled or deleted workflow)."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.store.schema import executions, schedule_ticks, schedules

__all__ = ["cancel_ticks_ahead", "lock_schedules"]


def _of(tenant_id: str, schedule_id: str | None, workflow_id: str | None) -> ColumnElement[bool]:
    if schedule_id is not None:
        return schedule_ticks.c.schedule_id == schedule_id
    of_workflow = select(schedules.c.id).where(
        schedules.c.tenant_id == tenant_id, schedules.c.workflow_id == workflow_id
    )
    return schedule_ticks.c.schedule_id.in_(of_workflow.scalar_subquery())


async def lock_schedules(
    conn: AsyncConnection,
    tenant_id: str,
    *,
    schedule_id: str | None = None,
    workflow_id: str | None = None,
) -> list[str]:
    """Lock the schedule (or the workflow's schedules) for this transaction — waiting for a
    scheduler pass materialising its ticks to commit, so that its ticks are seen — and return
    their ids."""
    query = select(schedules.c.id).where(schedules.c.tenant_id == tenant_id).with_for_update()
    if schedule_id is not None:
        query = query.where(schedules.c.id == schedule_id)
    else:
        query = query.where(schedules.c.workflow_id == workflow_id)
    return [str(row[0]) for row in await conn.execute(query)]


async def cancel_ticks_ahead(
    conn: AsyncConnection,
    tenant_id: str,
    now: datetime,
    *,
    schedule_id: str | None = None,
    workflow_id: str | None = None,
) -> int:
    """Cancel the ticks of a schedule (or of a workflow's schedules) materialised ahead
    (instant still in the future): their executions, still ``queued``, become ``cancelled``
    (the engine skips their delayed jobs), and those ticks ``cancelled`` — a later
    materialisation under the schedule's new definition may record the same instant again.
    A tick whose execution already started (its instant passed while this waited for the
    schedule's lock) is left ``fired``: recorded again, it would fire twice. Returns how many
    were cancelled."""
    ahead = (
        select(schedule_ticks.c.execution_id)
        .where(
            schedule_ticks.c.tenant_id == tenant_id,
            _of(tenant_id, schedule_id, workflow_id),
            schedule_ticks.c.fire_time > now,
            schedule_ticks.c.outcome == "fired",
            schedule_ticks.c.execution_id.is_not(None),
        )
        .scalar_subquery()
    )
    cancelled = (
        (
            await conn.execute(
                update(executions)
                .where(executions.c.id.in_(ahead), executions.c.status == "queued")
                .values(status="cancelled", finished_at=now, updated_at=now)
                .returning(executions.c.id)
            )
        )
        .scalars()
        .all()
    )
    if cancelled:
        await conn.execute(
            update(schedule_ticks)
            .where(
                schedule_ticks.c.tenant_id == tenant_id,
                schedule_ticks.c.execution_id.in_(list(cancelled)),
                schedule_ticks.c.outcome == "fired",
            )
            .values(outcome="cancelled")
        )
    return len(cancelled)
