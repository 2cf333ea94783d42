"""``/api/admin``: the workers status document, pausing and resuming regional queues, tenants
and their API keys (ADMIN_TOKEN)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query

from conveyor.api import probes
from conveyor.api.deps import AdminDep, CtxDep
from conveyor.api.errors import ApiError
from conveyor.api.schemas import (
    ApiKeyIn,
    ApiKeyOut,
    Envelope,
    IssuedApiKeyOut,
    Page,
    QueueStateOut,
    StatusData,
    TenantIn,
    TenantOut,
    error_responses,
)
from conveyor.api.status import status_document
from conveyor.errors import QueueUnavailable
from conveyor.queue import execution_queue_name
from conveyor.store import ApiKey, Tenant

router = APIRouter(
    prefix="/api/admin",
    tags=["admin"],
    dependencies=[AdminDep],
    responses=error_responses(400, 401, 413, 422, 503),
)

TenantId = Annotated[
    str, Path(alias="tenantId", min_length=1, max_length=64, description="Tenant id.")
]
KeyId = Annotated[str, Path(alias="keyId", min_length=1, max_length=64, description="API key id.")]
Region = Annotated[
    str,
    Path(
        pattern=r"^[a-z0-9][a-z0-9-]{0,31}$",
        description="A region (its queue is `workflow.execute.<region>`).",
        examples=["us"],
    ),
]
Limit = Annotated[int, Query(ge=1, le=200, description="Page size (max 200).")]
Cursor = Annotated[
    str | None, Query(max_length=512, description="`nextCursor` of the previous page.")
]


def tenant_out(tenant: Tenant) -> dict[str, Any]:
    return {"id": tenant.id, "name": tenant.name, "created_at": tenant.created_at}


def key_out(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "tenant_id": key.tenant_id,
        "name": key.name,
        "prefix": key.prefix,
        "created_at": key.created_at,
        "revoked_at": key.revoked_at,
        "active": key.active,
    }


@router.get(
    "/workers/status",
    response_model=Envelope[StatusData],
    summary="Execution infrastructure status (incident polling)",
    description=(
        "What operators poll during an incident, read live: queue depths per "
        "`workflow.execute.<region>` queue straight from BullMQ (also when no worker runs; "
        "`waiting` = waiting + prioritized, `delayed` separate, `total` = waiting + active + "
        "delayed), whether an execution worker is started, the scheduler's preferred lock "
        "strategy, lock holder and last tick, the timer dispatcher's next due timer, and "
        "every live process heartbeat. Answers 200 also when Redis is down (with "
        "`scheduler.redis.status` = `unreachable` and the reason in `errors`)."
    ),
)
async def workers_status(ctx: CtxDep) -> dict[str, Any]:
    return {"success": True, "data": await status_document(ctx)}


async def _set_paused(ctx: CtxDep, region: str, paused: bool) -> dict[str, Any]:
    try:
        workers = probes.worker_regions(await probes.live_processes(ctx))
    except probes.ProbeErrors as exc:
        raise QueueUnavailable(f"cannot read the live workers: {probes.describe(exc)}") from exc
    if region not in ctx.known_regions(*workers):
        raise ApiError(
            404,
            "not_found",
            f"unknown region {region!r}: not in EXECUTION_REGIONS or DEFAULT_REGION, and no live "
            "worker consumes it",
            {"region": region},
        )
    queue = ctx.execution_queue(region)
    await (queue.pause() if paused else queue.resume())
    data = {"queue": execution_queue_name(region), "region": region, "paused": paused}
    return {"success": True, "data": data}


@router.post(
    "/queues/{region}/pause",
    response_model=Envelope[QueueStateOut],
    summary="Pause a region's execution queue",
    description=(
        "Sets BullMQ's `paused` flag on `workflow.execute.<region>` (the flag BullMQ dashboards "
        "set): every worker stops taking jobs from it; jobs in progress finish, waiting jobs "
        "stay waiting and triggers keep being accepted. The status document, readiness, "
        "`/metrics` (`conveyor_queue_paused`) and `conveyor status` show the queue as paused. "
        "Idempotent."
    ),
    responses=error_responses(404),
)
async def pause_queue(ctx: CtxDep, region: Region) -> dict[str, Any]:
    return await _set_paused(ctx, region, True)


@router.post(
    "/queues/{region}/resume",
    response_model=Envelope[QueueStateOut],
    summary="Resume a paused region's execution queue",
    description="Clears BullMQ's `paused` flag: workers take jobs again at once. Idempotent.",
    responses=error_responses(404),
)
async def resume_queue(ctx: CtxDep, region: Region) -> dict[str, Any]:
    return await _set_paused(ctx, region, False)


@router.post(
    "/tenants",
    status_code=201,
    response_model=Envelope[TenantOut],
    summary="Create a tenant",
    description="Creates a tenant (organization). Issue it an API key next.",
)
async def create_tenant(ctx: CtxDep, body: TenantIn) -> dict[str, Any]:
    tenant = await ctx.store.tenants.create(body.name)
    return {"success": True, "data": tenant_out(tenant)}


@router.get(
    "/tenants",
    response_model=Envelope[Page[TenantOut]],
    summary="List tenants",
    description="Newest first, cursor-paginated.",
)
async def list_tenants(ctx: CtxDep, limit: Limit = 50, cursor: Cursor = None) -> dict[str, Any]:
    page = await ctx.store.tenants.list(limit=limit, cursor=cursor)
    items = [tenant_out(t) for t in page.items]
    return {"success": True, "data": {"items": items, "next_cursor": page.next_cursor}}


@router.get(
    "/tenants/{tenantId}",
    response_model=Envelope[TenantOut],
    summary="Get a tenant",
    responses=error_responses(404),
)
async def get_tenant(ctx: CtxDep, tenant_id: TenantId) -> dict[str, Any]:
    return {"success": True, "data": tenant_out(await ctx.store.tenants.get(tenant_id))}


@router.post(
    "/tenants/{tenantId}/api-keys",
    status_code=201,
    response_model=Envelope[IssuedApiKeyOut],
    summary="Issue an API key",
    description=(
        "Issues a new API key for the tenant. The token (`key`) is in this answer only: it "
        "is stored hashed and cannot be read back."
    ),
    responses=error_responses(404),
)
async def issue_key(
    ctx: CtxDep, tenant_id: TenantId, body: Annotated[ApiKeyIn | None, Body()] = None
) -> dict[str, Any]:
    issued = await ctx.store.api_keys.issue(tenant_id, (body or ApiKeyIn()).name)
    return {"success": True, "data": {**key_out(issued.key), "key": issued.token}}


@router.get(
    "/tenants/{tenantId}/api-keys",
    response_model=Envelope[list[ApiKeyOut]],
    summary="List a tenant's API keys",
    description="Public parts only (id, name, prefix, revocation).",
    responses=error_responses(404),
)
async def list_keys(ctx: CtxDep, tenant_id: TenantId) -> dict[str, Any]:
    await ctx.store.tenants.get(tenant_id)
    keys = await ctx.store.api_keys.list(tenant_id)
    return {"success": True, "data": [key_out(k) for k in keys]}


@router.delete(
    "/tenants/{tenantId}/api-keys/{keyId}",
    response_model=Envelope[ApiKeyOut],
    summary="Revoke an API key",
    description=(
        "Revokes the key (idempotent). Requests with it are refused at once by this API "
        "process and within 5 seconds by the others (their verification cache)."
    ),
    responses=error_responses(404),
)
async def revoke_key(ctx: CtxDep, tenant_id: TenantId, key_id: KeyId) -> dict[str, Any]:
    key = await ctx.store.api_keys.revoke(tenant_id, key_id)
    ctx.forget_key(key.id)
    return {"success": True, "data": key_out(key)}
