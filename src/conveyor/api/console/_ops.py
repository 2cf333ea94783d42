"""Console pages of the running system: the live overview, the executions list and an
execution's detail with its cancel and retry actions (from the start, or from the failed step).

Everything is read through what the API already has: the admin status document
(:func:`~conveyor.api.status.status_document`), the probes, the store's services; cancel and
retry run the same store calls and enqueue as ``POST /api/executions/{id}/cancel|retry``.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from conveyor.api import probes
from conveyor.api.console._common import clean, ctx_of, form_of, render
from conveyor.api.console._render import line_chart
from conveyor.api.console._session import check_csrf, session_of
from conveyor.api.context import ApiContext
from conveyor.api.status import status_document
from conveyor.api.trigger import enqueue
from conveyor.errors import Conflict, ConveyorError, CursorInvalid, NotFound
from conveyor.store import (
    EXECUTION_STATUSES,
    Activity,
    DatabaseUsage,
    Execution,
    ExecutionFilter,
    RetryFrom,
    Timer,
)

log = logging.getLogger(__name__)

router = APIRouter(prefix="/console", include_in_schema=False)
STORAGE_TIMEOUT_S = 2.0

PAGE_SIZE = 50
JOB_STATE_TIMEOUT_S = 1.0


# --- overview ------------------------------------------------------------------------------


def _banners(status: dict[str, Any], database: dict[str, Any]) -> list[str]:
    banners: list[str] = []
    queue = status.get("queue", {})
    if queue.get("status") != "ready":
        banners.append(f"Redis is unreachable: {queue.get('error') or 'no answer'}.")
    if database.get("status") != "ready":
        name = "PostgreSQL" if database.get("dialect") == "postgresql" else "The database"
        banners.append(f"{name} is down: {database.get('error') or 'no answer'}.")
    for region in status.get("regions", []):
        if region.get("status") == "unconsumed":
            banners.append(
                f"Queue {region['queue']} has {region.get('waiting')} waiting job(s) and no live "
                "worker consumes it."
            )
    return banners


def _queues(status: dict[str, Any]) -> list[dict[str, Any]]:
    depths = status["executionWorker"]["metrics"]["queueDepths"]
    rows = []
    for region in status.get("regions", []):
        depth = depths.get(region["queue"], {})
        rows.append({**region, **depth, "waiting": depth.get("waiting", region.get("waiting"))})
    return rows


def _charts(activity: Activity | None) -> list[Any]:
    if activity is None:
        return []
    labels = [m.strftime("%H:%M") for m in activity.minutes]
    counts = [
        ("started", "s1", activity.started),
        ("succeeded", "s2", activity.succeeded),
        ("failed", "s3", activity.failed),
    ]
    latency = [("p50", "s1", activity.p50_ms), ("p99", "s3", activity.p99_ms)]
    return [
        line_chart("Executions per minute (last hour, UTC)", counts, labels),
        line_chart("Enqueue → start latency, ms (last hour)", latency, labels, unit=" ms"),
    ]


async def overview_data(ctx: ApiContext) -> dict[str, Any]:
    status, database = await asyncio.gather(status_document(ctx), probes.probe_database(ctx))
    activity: Activity | None = None
    timers: list[Timer] = []
    errors = list(status.get("errors", []))
    if database.get("status") == "ready":
        try:
            activity, timers = await asyncio.gather(
                ctx.store.insights.activity(), ctx.store.insights.upcoming_timers(8)
            )
        except ConveyorError as exc:
            errors.append(f"database: {exc}")
    return {
        "status": status,
        "database": database,
        "banners": _banners(status, database),
        "queues": _queues(status),
        "charts": _charts(activity),
        "totals": None
        if activity is None
        else {
            "started": sum(activity.started),
            "succeeded": sum(activity.succeeded),
            "failed": sum(activity.failed),
        },
        "timers": timers,
        "errors": errors,
        "now": datetime.now(UTC),
    }


async def storage_data(ctx: ApiContext) -> DatabaseUsage | None:
    """Rows, bytes and oldest row per table (``GET /api/admin/storage``'s database part), read
    once per page load, not on every live refresh; ``None`` when the database cannot say."""
    try:
        async with asyncio.timeout(STORAGE_TIMEOUT_S):
            return await ctx.store.storage.usage()
    except (ConveyorError, TimeoutError) as exc:
        log.warning("console.storage_failed", extra={"error": repr(exc)})
        return None


@router.get("", response_class=HTMLResponse)
async def overview(request: Request) -> HTMLResponse:
    session = session_of(request)
    ctx = ctx_of(request)
    data, storage = await asyncio.gather(overview_data(ctx), storage_data(ctx))
    return render(
        request, "overview.html", session=session, page="overview", storage=storage, **data
    )


@router.get("/live/overview", response_class=HTMLResponse)
async def overview_live(request: Request) -> HTMLResponse:
    session = session_of(request)
    data = await overview_data(ctx_of(request))
    return render(
        request,
        "fragment.html",
        session=session,
        live_id="live",
        inner="overview_live.html",
        **data,
    )


# --- executions ----------------------------------------------------------------------------


def _instant(value: str | None, field: str) -> datetime | None:
    """A ``datetime-local`` value (UTC) or an ISO 8601 instant; ``ValueError`` names the field."""
    if not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{field}: {value[:40]!r} is not a date and time") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


@router.get("/executions", response_class=HTMLResponse)
async def executions_list(
    request: Request,
    tenant: Annotated[str | None, Query(max_length=64)] = None,
    workflow: Annotated[str | None, Query(max_length=64)] = None,
    status: Annotated[str | None, Query(max_length=16)] = None,
    schedule: Annotated[str | None, Query(max_length=64)] = None,
    since: Annotated[str | None, Query(max_length=40)] = None,
    until: Annotated[str | None, Query(max_length=40)] = None,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> HTMLResponse:
    session = session_of(request)
    ctx = ctx_of(request)
    form = {"tenant": clean(tenant), "workflow": clean(workflow), "status": clean(status),
            "schedule": clean(schedule), "since": clean(since, 40), "until": clean(until, 40)}  # fmt: skip
    error = None
    items: list[Execution] = []
    next_cursor = None
    try:
        if form["status"] is not None and form["status"] not in EXECUTION_STATUSES:
            raise ValueError(
                f"status: {form['status']!r} is not one of {', '.join(EXECUTION_STATUSES)}"
            )
        where = ExecutionFilter(
            tenant_id=form["tenant"],
            workflow_id=form["workflow"],
            status=form["status"],
            schedule_id=form["schedule"],
            since=_instant(form["since"], "since"),
            until=_instant(form["until"], "until"),
        )
        page = await ctx.store.insights.search_executions(
            where, limit=PAGE_SIZE, cursor=clean(cursor, 512)
        )
        items, next_cursor = page.items, page.next_cursor
    except (ValueError, CursorInvalid) as exc:
        error = str(exc)
    tenant_names, workflow_names = await ctx.store.insights.names(
        [e.tenant_id for e in items], [e.workflow_id for e in items]
    )
    query = {k: v for k, v in form.items() if v}
    return render(
        request,
        "executions.html",
        session=session,
        page="executions",
        form=form,
        query=query,
        statuses=EXECUTION_STATUSES,
        items=items,
        tenant_names=tenant_names,
        workflow_names=workflow_names,
        next_cursor=next_cursor,
        first_page=cursor is None,
        error=error,
        status_code=400 if error else 200,
    )


async def _job_states(ctx: ApiContext, execution: Execution, timers: list[Timer]) -> list[Any]:
    """BullMQ state of the execution's job and of each pending timer's job (bounded)."""
    queue = ctx.execution_queue(execution.region)
    ids = [execution.id, *(t.job_id for t in timers if t.status == "pending")]
    try:
        async with asyncio.timeout(JOB_STATE_TIMEOUT_S):
            states = await asyncio.gather(*(queue.get_job_state(i) for i in ids))
    except (*probes.ProbeErrors,) as exc:
        return [(i, f"unknown ({probes.describe(exc)})") for i in ids]
    return [(i, s or _absent(i)) for i, s in zip(ids, states, strict=True)]


def _absent(job_id: str) -> str:
    if job_id.startswith("timer:"):
        return "not enqueued yet (the timer dispatcher adds it shortly before it is due)"
    return "absent"


def _timeline(execution: Execution) -> list[dict[str, Any]]:
    """Each step's start offset and duration relative to the first step, as fractions of the
    whole span, for the SVG timeline. Steps reused by a retry from the failed step ran in
    another execution: they are listed (``reused``) but not placed on this one's time axis."""
    steps = execution.steps
    if not steps:
        return []
    ran = [s for s in steps if s.reused_from is None] or list(steps)
    start = min(s.started_at for s in ran)
    end = max(s.finished_at for s in ran)
    span = max((end - start).total_seconds(), 0.001)
    out = []
    for s in steps:
        if s.reused_from is not None:
            out.append({"step": s, "x": 0.0, "w": 0.004, "offset_ms": None, "reused": True})
            continue
        offset = (s.started_at - start).total_seconds()
        out.append({"step": s, "x": offset / span, "w": max(s.duration_ms / 1000 / span, 0.004),
                    "offset_ms": offset * 1000, "reused": False})  # fmt: skip
    return out


async def _detail(request: Request, execution_id: str) -> dict[str, Any]:
    ctx = ctx_of(request)
    found = await ctx.store.insights.find_execution(execution_id)
    execution = await ctx.store.executions.get(found.tenant_id, execution_id, with_steps=True)
    timers = await ctx.store.timers.for_execution(found.tenant_id, execution_id)
    jobs = await _job_states(ctx, execution, timers)
    tenant_names, workflow_names = await ctx.store.insights.names(
        [execution.tenant_id], [execution.workflow_id]
    )
    waiting_on = next((t for t in timers if t.status == "pending"), None)
    return {
        "e": execution,
        "timers": timers,
        "waiting_on": waiting_on,
        "jobs": jobs,
        "tenant_name": tenant_names.get(execution.tenant_id, ""),
        "workflow_name": workflow_names.get(execution.workflow_id, ""),
        "timeline": _timeline(execution),
        "resumable": execution.status == "failed"
        and any(s.status == "failed" for s in execution.steps),
        "now": datetime.now(UTC),
    }


def _not_found(request: Request, session: Any, what: str) -> HTMLResponse:
    return render(request, "not_found.html", session=session, what=what, status_code=404)


@router.get("/executions/{execution_id}", response_class=HTMLResponse)
async def execution_detail(request: Request, execution_id: str) -> HTMLResponse:
    session = session_of(request)
    try:
        data = await _detail(request, execution_id[:64])
    except NotFound:
        return _not_found(request, session, f"execution {execution_id[:64]}")
    return render(request, "execution.html", session=session, page="executions", **data)


@router.get("/executions/{execution_id}/live", response_class=HTMLResponse)
async def execution_live(request: Request, execution_id: str) -> HTMLResponse:
    session = session_of(request)
    try:
        data = await _detail(request, execution_id[:64])
    except NotFound:
        return _not_found(request, session, f"execution {execution_id[:64]}")
    return render(
        request,
        "fragment.html",
        session=session,
        live_id="live",
        inner="execution_live.html",
        **data,
    )


ACTIONS = {
    "cancel": ("Cancel execution", "Cancel this execution? A running step finishes first; a "
               "waiting timer is cancelled. This cannot be undone."),
    "retry": ("Retry from start", "Start a new execution of the same workflow version with the "
              "same input, running every step again?"),
    "retry-failed": ("Retry from failed step", "Start a new execution of the same workflow "
                     "version with the same input that resumes at the failed step? The steps "
                     "before it are not run again: their recorded outputs are reused."),
}  # fmt: skip


@router.get("/executions/{execution_id}/{action}", response_class=HTMLResponse)
async def confirm_action(request: Request, execution_id: str, action: str) -> HTMLResponse:
    session = session_of(request)
    if action not in ACTIONS:
        return _not_found(request, session, f"action {action[:20]}")
    title, question = ACTIONS[action]
    try:
        execution = await ctx_of(request).store.insights.find_execution(execution_id[:64])
    except NotFound:
        return _not_found(request, session, f"execution {execution_id[:64]}")
    return render(request, "confirm.html", session=session, page="executions", title=title,
                  question=question, subject=f"execution {execution.id} ({execution.status})",
                  action=f"/console/executions/{execution.id}/{action}",
                  back=f"/console/executions/{execution.id}", button=title)  # fmt: skip


@router.post("/executions/{execution_id}/{action}")
async def run_action(request: Request, execution_id: str, action: str) -> Any:
    session = session_of(request)
    check_csrf(session, await form_of(request))
    if action not in ACTIONS:
        return _not_found(request, session, f"action {action[:20]}")
    ctx = ctx_of(request)
    try:
        found = await ctx.store.insights.find_execution(execution_id[:64])
    except NotFound:
        return _not_found(request, session, f"execution {execution_id[:64]}")
    target = found.id
    try:
        if action == "cancel":
            await ctx.store.executions.cancel(found.tenant_id, found.id)
        else:
            start: RetryFrom = "failed" if action == "retry-failed" else "start"
            retried, _ = await ctx.store.executions.retry_from(
                found.tenant_id, found.id, start=start
            )
            await enqueue(ctx, retried, reason="retry")
            target = retried.id
    except Conflict as exc:
        return render(request, "confirm.html", session=session, page="executions",
                      title=ACTIONS[action][0], question=None, subject=f"execution {found.id}",
                      error=str(exc), action=None, back=f"/console/executions/{found.id}",
                      button=None, status_code=409)  # fmt: skip
    log.info("console.execution_action", extra={"action": action, "executionId": found.id})
    return RedirectResponse(f"/console/executions/{target}", status_code=303)
