"""``/api/schedules``: cron schedules (validated on save) that trigger workflows."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Query, Response

from conveyor.api.deps import CtxDep, TenantDep
from conveyor.api.schemas import (
    Envelope,
    Page,
    ScheduleIn,
    ScheduleOut,
    SchedulePatch,
    ScheduleTickOut,
    error_responses,
)
from conveyor.store import Schedule

router = APIRouter(
    prefix="/api/schedules",
    tags=["schedules"],
    responses=error_responses(400, 401, 404, 413, 422, 503),
)

ScheduleId = Annotated[
    str, Path(alias="scheduleId", min_length=1, max_length=64, description="Schedule id.")
]


def schedule_out(schedule: Schedule) -> dict[str, Any]:
    return {
        name: getattr(schedule, name)
        for name in (
            "id", "workflow_id", "name", "cron", "timezone", "enabled", "input",
            "misfire_policy", "next_fire_at", "last_fired_at", "created_at", "updated_at",
        )
    }  # fmt: skip


@router.post(
    "",
    status_code=201,
    response_model=Envelope[ScheduleOut],
    summary="Create a schedule",
    description=(
        "The cron expression and IANA time zone are validated on save (422 "
        "`schedule_invalid` naming the field). `nextFireAt` is the next fire instant in UTC; "
        "the scheduler process fires each tick exactly once."
    ),
)
async def create_schedule(ctx: CtxDep, auth: TenantDep, body: ScheduleIn) -> dict[str, Any]:
    schedule = await ctx.store.schedules.create(
        auth.tenant_id,
        body.workflow_id,
        body.cron,
        body.timezone,
        name=body.name,
        input=body.input,
        enabled=body.enabled,
        misfire_policy=body.misfire_policy,
    )
    return {"success": True, "data": schedule_out(schedule)}


@router.get(
    "",
    response_model=Envelope[Page[ScheduleOut]],
    summary="List schedules",
    description="Newest first, cursor-paginated; optionally for one workflow.",
)
async def list_schedules(
    ctx: CtxDep,
    auth: TenantDep,
    workflow_id: Annotated[str | None, Query(alias="workflowId", max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> dict[str, Any]:
    page = await ctx.store.schedules.list(
        auth.tenant_id, workflow_id=workflow_id, limit=limit, cursor=cursor
    )
    items = [schedule_out(s) for s in page.items]
    return {"success": True, "data": {"items": items, "next_cursor": page.next_cursor}}


@router.get("/{scheduleId}", response_model=Envelope[ScheduleOut], summary="Get a schedule")
async def get_schedule(ctx: CtxDep, auth: TenantDep, schedule_id: ScheduleId) -> dict[str, Any]:
    schedule = await ctx.store.schedules.get(auth.tenant_id, schedule_id)
    return {"success": True, "data": schedule_out(schedule)}


@router.get(
    "/{scheduleId}/ticks",
    response_model=Envelope[Page[ScheduleTickOut]],
    summary="List a schedule's ticks",
    description=(
        "The ticks the scheduler recorded for this schedule, latest first, cursor-paginated, "
        "each with its outcome: fired (with its execution), collapsed or skipped (a misfire), "
        "cancelled (the schedule changed after the tick was recorded ahead), disabled."
    ),
)
async def list_schedule_ticks(
    ctx: CtxDep,
    auth: TenantDep,
    schedule_id: ScheduleId,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> dict[str, Any]:
    page = await ctx.store.schedules.tick_page(
        auth.tenant_id, schedule_id, limit=limit, cursor=cursor
    )
    items = [
        {"fire_time": t.fire_time, "outcome": t.outcome, "execution_id": t.execution_id,
         "created_at": t.created_at}
        for t in page.items
    ]  # fmt: skip
    return {"success": True, "data": {"items": items, "next_cursor": page.next_cursor}}


@router.patch(
    "/{scheduleId}",
    response_model=Envelope[ScheduleOut],
    summary="Change a schedule",
    description=(
        "Changes the given fields (cron, timezone, name, input, enabled, misfirePolicy); the "
        "result is validated again and the next fire time recomputed from now."
    ),
)
async def update_schedule(
    ctx: CtxDep, auth: TenantDep, schedule_id: ScheduleId, body: SchedulePatch
) -> dict[str, Any]:
    changes = body.model_dump(exclude_unset=True)
    for field in ("cron", "timezone", "enabled"):
        if field in changes and changes[field] is None:
            del changes[field]
    schedule = await ctx.store.schedules.update(auth.tenant_id, schedule_id, changes)
    return {"success": True, "data": schedule_out(schedule)}


@router.delete(
    "/{scheduleId}", status_code=204, response_class=Response, summary="Delete a schedule"
)
async def delete_schedule(ctx: CtxDep, auth: TenantDep, schedule_id: ScheduleId) -> Response:
    await ctx.store.schedules.delete(auth.tenant_id, schedule_id)
    return Response(status_code=204)
