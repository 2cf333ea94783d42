"""Console pages of what tenants own: workflows (definition, versions, diff), schedules (next
fire times, last ticks, pause and resume) and tenants with their API keys (issue — the token
shown once — and revoke). Every read and write goes through the store's tenant-scoped
services, as the admin and tenant API routes do."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Annotated, Any
from zoneinfo import ZoneInfo

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from conveyor.api.console._common import clean, ctx_of, form_of, render
from conveyor.api.console._render import diff_lines
from conveyor.api.console._session import check_csrf, session_of
from conveyor.api.context import ApiContext
from conveyor.errors import ConveyorError, NotFound
from conveyor.store import Schedule, Tenant, next_fire_time

log = logging.getLogger(__name__)

router = APIRouter(prefix="/console", include_in_schema=False)

TENANT_CHOICES = 200
FIRE_TIMES = 5
TICKS_SHOWN = 5


async def _tenants(ctx: ApiContext) -> list[Tenant]:
    return (await ctx.store.tenants.list(limit=TENANT_CHOICES)).items


def _not_found(request: Request, session: Any, what: str) -> HTMLResponse:
    return render(request, "not_found.html", session=session, what=what, status_code=404)


# --- workflows -----------------------------------------------------------------------------


@router.get("/workflows", response_class=HTMLResponse)
async def workflows_page(
    request: Request,
    tenant: Annotated[str | None, Query(max_length=64)] = None,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> HTMLResponse:
    session = session_of(request)
    ctx = ctx_of(request)
    tenants = await _tenants(ctx)
    tenant_id = clean(tenant) or (tenants[0].id if tenants else None)
    items: list[Any] = []
    next_cursor = None
    if tenant_id is not None:
        page = await ctx.store.workflows.list(tenant_id, limit=50, cursor=clean(cursor, 512))
        items, next_cursor = page.items, page.next_cursor
    return render(request, "workflows.html", session=session, page="workflows",
                  tenants=tenants, tenant_id=tenant_id, items=items,
                  next_cursor=next_cursor)  # fmt: skip


@router.get("/tenants/{tenant_id}/workflows/{workflow_id}", response_class=HTMLResponse)
async def workflow_page(
    request: Request,
    tenant_id: str,
    workflow_id: str,
    a: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
    b: Annotated[int | None, Query(ge=1, le=2**31 - 1)] = None,
) -> HTMLResponse:
    session = session_of(request)
    ctx = ctx_of(request)
    try:
        workflow = await ctx.store.workflows.get(tenant_id[:64], workflow_id[:64])
        versions = await ctx.store.insights.versions(workflow.tenant_id, workflow.id)
        diff = None
        if a is not None and b is not None:
            old = await ctx.store.workflows.get_version(workflow.tenant_id, workflow.id, a)
            new = await ctx.store.workflows.get_version(workflow.tenant_id, workflow.id, b)
            diff = diff_lines(old.definition, new.definition, f"version {a}", f"version {b}")
    except NotFound as exc:
        return _not_found(request, session, str(exc))
    default_a = versions[1].version if len(versions) > 1 else workflow.current_version
    return render(request, "workflow.html", session=session, page="workflows", w=workflow,
                  versions=versions, diff=diff, a=a or default_a,
                  b=b or workflow.current_version)  # fmt: skip


# --- schedules -----------------------------------------------------------------------------


def _fire_times(schedule: Schedule, now: datetime) -> list[tuple[datetime, str]]:
    """The next :data:`FIRE_TIMES` instants of an enabled schedule (the scheduler's cron code),
    each with its wall-clock time in the schedule's time zone."""
    if not schedule.enabled:
        return []
    out: list[tuple[datetime, str]] = []
    at = now
    try:
        zone = ZoneInfo(schedule.timezone)
        for _ in range(FIRE_TIMES):
            at = next_fire_time(schedule.cron, schedule.timezone, at)
            out.append((at, at.astimezone(zone).strftime("%a %H:%M:%S %Z")))
    except (ConveyorError, ValueError, KeyError):
        pass
    return out


@router.get("/schedules", response_class=HTMLResponse)
async def schedules_page(
    request: Request,
    tenant: Annotated[str | None, Query(max_length=64)] = None,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> HTMLResponse:
    session = session_of(request)
    ctx = ctx_of(request)
    tenants = await _tenants(ctx)
    tenant_id = clean(tenant) or (tenants[0].id if tenants else None)
    rows: list[dict[str, Any]] = []
    next_cursor = None
    now = datetime.now(UTC)
    if tenant_id is not None:
        page = await ctx.store.schedules.list(tenant_id, limit=50, cursor=clean(cursor, 512))
        next_cursor = page.next_cursor
        for s in page.items:
            ticks = await ctx.store.schedules.ticks(tenant_id, s.id, limit=TICKS_SHOWN)
            rows.append({"s": s, "fires": _fire_times(s, now), "ticks": ticks})
    return render(request, "schedules.html", session=session, page="schedules", tenants=tenants,
                  tenant_id=tenant_id, rows=rows, next_cursor=next_cursor, now=now)  # fmt: skip


@router.post("/tenants/{tenant_id}/schedules/{schedule_id}/{action}")
async def schedule_action(request: Request, tenant_id: str, schedule_id: str, action: str) -> Any:
    session = session_of(request)
    check_csrf(session, await form_of(request))
    if action not in ("pause", "resume"):
        return _not_found(request, session, f"action {action[:20]}")
    ctx = ctx_of(request)
    try:
        schedule = await ctx.store.schedules.update(
            tenant_id[:64], schedule_id[:64], {"enabled": action == "resume"}
        )
    except NotFound as exc:
        return _not_found(request, session, str(exc))
    log.info("console.schedule_action", extra={"action": action, "scheduleId": schedule.id})
    return RedirectResponse(f"/console/schedules?tenant={schedule.tenant_id}", status_code=303)


# --- tenants and API keys ------------------------------------------------------------------


@router.get("/tenants", response_class=HTMLResponse)
async def tenants_page(
    request: Request, cursor: Annotated[str | None, Query(max_length=512)] = None
) -> HTMLResponse:
    session = session_of(request)
    page = await ctx_of(request).store.tenants.list(limit=50, cursor=clean(cursor, 512))
    return render(request, "tenants.html", session=session, page="tenants", items=page.items,
                  next_cursor=page.next_cursor)  # fmt: skip


async def _tenant_page(
    request: Request, session: Any, tenant_id: str, *, issued: Any = None, status_code: int = 200
) -> HTMLResponse:
    ctx = ctx_of(request)
    try:
        tenant = await ctx.store.tenants.get(tenant_id[:64])
    except NotFound as exc:
        return _not_found(request, session, str(exc))
    keys = await ctx.store.api_keys.list(tenant.id)
    return render(request, "tenant.html", session=session, page="tenants", t=tenant, keys=keys,
                  issued=issued, status_code=status_code)  # fmt: skip


@router.get("/tenants/{tenant_id}", response_class=HTMLResponse)
async def tenant_page(request: Request, tenant_id: str) -> HTMLResponse:
    return await _tenant_page(request, session_of(request), tenant_id)


@router.post("/tenants/{tenant_id}/keys", response_class=HTMLResponse)
async def issue_key(request: Request, tenant_id: str) -> HTMLResponse:
    session = session_of(request)
    form = await form_of(request)
    check_csrf(session, form)
    name = clean(form.get("name"), 200) or "console"
    try:
        issued = await ctx_of(request).store.api_keys.issue(tenant_id[:64], name)
    except NotFound as exc:
        return _not_found(request, session, str(exc))
    log.info("console.key_issued", extra={"tenantId": issued.key.tenant_id, "keyId": issued.key.id})
    # Rendered in the answer to the POST (not after a redirect): the token is shown once.
    return await _tenant_page(request, session, tenant_id, issued=issued, status_code=201)


@router.post("/tenants/{tenant_id}/keys/{key_id}/revoke")
async def revoke_key(request: Request, tenant_id: str, key_id: str) -> Any:
    session = session_of(request)
    check_csrf(session, await form_of(request))
    ctx = ctx_of(request)
    try:
        key = await ctx.store.api_keys.revoke(tenant_id[:64], key_id[:64])
    except NotFound as exc:
        return _not_found(request, session, str(exc))
    ctx.forget_key(key.id)
    log.info("console.key_revoked", extra={"tenantId": key.tenant_id, "keyId": key.id})
    return RedirectResponse(f"/console/tenants/{key.tenant_id}", status_code=303)


@router.post("/tenants")
async def create_tenant(request: Request) -> Any:
    session = session_of(request)
    form = await form_of(request)
    check_csrf(session, form)
    name = clean(form.get("name"), 200)
    if name is None:
        return RedirectResponse("/console/tenants", status_code=303)
    tenant = await ctx_of(request).store.tenants.create(name)
    return RedirectResponse(f"/console/tenants/{tenant.id}", status_code=303)
