"""``/api/admin/tenants/{tenantId}/limits`` (ADMIN_TOKEN): per-tenant execution limits —
concurrency across all workers, start rate and burst (:mod:`conveyor.dispatch.limits`)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path

from conveyor.api.deps import AdminDep, CtxDep
from conveyor.api.schemas import Envelope, TenantLimitsIn, TenantLimitsOut, error_responses
from conveyor.dispatch import effective_limits
from conveyor.settings import Settings
from conveyor.store import TenantLimits

router = APIRouter(
    prefix="/api/admin",
    tags=["admin"],
    dependencies=[AdminDep],
    responses=error_responses(400, 401, 413, 422, 503),
)

TenantId = Annotated[
    str, Path(alias="tenantId", min_length=1, max_length=64, description="Tenant id.")
]


def limits_out(own: TenantLimits, settings: Settings) -> dict[str, Any]:
    effective = effective_limits(settings, own)
    return {
        "tenant_id": own.tenant_id,
        "concurrency": own.concurrency,
        "start_rate": own.start_rate,
        "start_burst": own.start_burst,
        "effective_concurrency": effective.concurrency,
        "effective_start_rate": effective.start_rate,
        "effective_start_burst": effective.start_burst,
    }


@router.get(
    "/tenants/{tenantId}/limits",
    response_model=Envelope[TenantLimitsOut],
    summary="A tenant's execution limits",
    description=(
        "The tenant's own limits (`null`: the setting applies) and the limits in force: "
        "executions running at once across all workers, executions started per second and "
        "the burst."
    ),
    responses=error_responses(404),
)
async def get_limits(ctx: CtxDep, tenant_id: TenantId) -> dict[str, Any]:
    own = await ctx.store.limits.get(tenant_id)
    return {"success": True, "data": limits_out(own, ctx.settings)}


@router.put(
    "/tenants/{tenantId}/limits",
    response_model=Envelope[TenantLimitsOut],
    summary="Set a tenant's execution limits",
    description=(
        "Replaces the tenant's limits: `concurrency` (executions running at once across all "
        "workers), `startRate` (executions started per second) and `startBurst` (starts "
        "allowed at once after an idle period); a field left out or `null` falls back on "
        "`EXECUTION_TENANT_CONCURRENCY` / `EXECUTION_TENANT_START_RATE` / "
        "`EXECUTION_TENANT_START_BURST`. Workers apply it within 5 seconds; executions already "
        "running are not stopped."
    ),
    responses=error_responses(404),
)
async def put_limits(ctx: CtxDep, tenant_id: TenantId, body: TenantLimitsIn) -> dict[str, Any]:
    own = await ctx.store.limits.set(
        TenantLimits(tenant_id, body.concurrency, body.start_rate, body.start_burst)
    )
    return {"success": True, "data": limits_out(own, ctx.settings)}
