"""``/api/admin/storage`` and ``/api/admin/tenants/{tenantId}/retention`` (ADMIN_TOKEN): what
Conveyor's data weighs, and per-tenant retention overrides (:mod:`conveyor.store.retention`)."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Path

from conveyor.api import probes
from conveyor.api.deps import AdminDep, CtxDep
from conveyor.api.schemas import Envelope, RetentionIn, RetentionOut, StorageData, error_responses
from conveyor.dispatch import keys
from conveyor.queue import execution_queue_name, health
from conveyor.settings import KeepPolicy, Settings
from conveyor.store import RetentionOverride

router = APIRouter(
    prefix="/api/admin",
    tags=["admin"],
    dependencies=[AdminDep],
    responses=error_responses(400, 401, 413, 422, 503),
)

TenantId = Annotated[
    str, Path(alias="tenantId", min_length=1, max_length=64, description="Tenant id.")
]


def keep_out(keep: KeepPolicy) -> dict[str, int]:
    return {"count": keep.count, "age_s": keep.age_s}


def retention_out(override: RetentionOverride, settings: Settings) -> dict[str, Any]:
    return {
        "tenant_id": override.tenant_id,
        "retention_s": override.retention_s,
        "max_executions": override.max_executions,
        "effective_retention_s": (
            override.retention_s
            if override.retention_s is not None
            else settings.execution_retention
        ),
        "effective_max_executions": (
            override.max_executions
            if override.max_executions is not None
            else settings.execution_retention_max_per_tenant
        ),
    }


@router.get(
    "/tenants/{tenantId}/retention",
    response_model=Envelope[RetentionOut],
    summary="A tenant's retention",
    description=(
        "The tenant's own retention and count cap (`null`: the setting applies) and the limits "
        "in force."
    ),
    responses=error_responses(404),
)
async def get_retention(ctx: CtxDep, tenant_id: TenantId) -> dict[str, Any]:
    override = await ctx.store.retention.get_override(tenant_id)
    return {"success": True, "data": retention_out(override, ctx.settings)}


@router.put(
    "/tenants/{tenantId}/retention",
    response_model=Envelope[RetentionOut],
    summary="Set a tenant's retention",
    description=(
        "Replaces the tenant's retention overrides: `retention` (a duration such as `30d`, or "
        "seconds) and `maxExecutions` (most finished executions kept); a field left out or "
        "`null` falls back on `EXECUTION_RETENTION` / `EXECUTION_RETENTION_MAX_PER_TENANT`. "
        "The next retention pass (leading scheduler, or `conveyor prune`) applies it."
    ),
    responses=error_responses(404),
)
async def put_retention(ctx: CtxDep, tenant_id: TenantId, body: RetentionIn) -> dict[str, Any]:
    retention_s = body.retention if isinstance(body.retention, int) else None
    override = await ctx.store.retention.set_override(
        tenant_id, retention_s=retention_s, max_executions=body.max_executions
    )
    return {"success": True, "data": retention_out(override, ctx.settings)}


@router.get(
    "/storage",
    response_model=Envelope[StorageData],
    summary="Storage used: database tables and Redis",
    description=(
        "Rows, bytes and the oldest row of every table (PostgreSQL: `pg_total_relation_size`, "
        "large tables' rows estimated by the planner; SQLite: `dbstat` pages and counts), the "
        "daily partitions of `executions` and `step_runs` (PostgreSQL), "
        "Redis `used_memory` and, per `workflow.execute.<region>` queue, the completed and "
        "failed jobs kept and the events stream's length, and the retention settings. Answers "
        "200 also when Redis is down (`redis.status` = `unreachable`)."
    ),
)
async def storage(ctx: CtxDep) -> dict[str, Any]:
    usage = await ctx.store.storage.usage()
    s = ctx.settings
    policies = await ctx.store.retention.policies(
        retention_s=s.execution_retention, max_executions=s.execution_retention_max_per_tenant
    )
    data = {
        "timestamp": probes.iso_now(),
        "database": {
            "dialect": usage.dialect,
            "total_bytes": usage.total_bytes,
            "tables": [
                {
                    "name": t.name,
                    "rows": t.rows,
                    "rows_exact": t.rows_exact,
                    "bytes": t.bytes,
                    "oldest": t.oldest,
                }
                for t in usage.tables
            ],
            "partitions": [
                {
                    "table": p.table,
                    "name": p.name,
                    "day": p.day,
                    "lower": p.lower,
                    "upper": p.upper,
                    "rows": p.rows,
                    "bytes": p.bytes,
                }
                for p in usage.partitions
            ],
        },
        "redis": await _redis(ctx),
        "retention": {
            "execution_retention_s": s.execution_retention,
            "max_per_tenant": s.execution_retention_max_per_tenant,
            "tenants_overriding": sum(1 for p in policies if p.overridden),
            "queue_keep_completed": keep_out(s.queue_keep_completed),
            "queue_keep_failed": keep_out(s.queue_keep_failed),
            "queue_events_max_len": s.queue_events_max_len,
        },
    }
    return {"success": True, "data": data}


async def _redis(ctx: CtxDep) -> dict[str, Any]:
    if ctx.queues.driver != "bullmq":
        return {"status": "unreachable", "error": "the in-memory queue driver has no Redis"}
    try:
        async with asyncio.timeout(probes.PROBE_TIMEOUT_S):
            client = ctx.queues.redis
            memory = await health.memory_info(client, cluster=ctx.settings.uses_cluster)
            try:
                workers = probes.worker_regions(await probes.live_processes(ctx))
            except probes.ProbeErrors:
                workers = {}
            queues = []
            for region in ctx.known_regions(*workers):
                name = execution_queue_name(region)
                counts = await ctx.execution_queue(region).get_job_counts("completed", "failed")
                events = await client.xlen(
                    keys.events(ctx.settings.queue_prefix, name, cluster=ctx.settings.uses_cluster)
                )
                queues.append({"queue": name, "completed": counts["completed"],
                               "failed": counts["failed"], "events": int(events)})  # fmt: skip
    except probes.ProbeErrors as exc:
        return {"status": "unreachable", "error": probes.describe(exc)}
    return {
        "status": "ready",
        "used_memory": int(memory.get("used_memory", 0)),
        "maxmemory": int(memory.get("maxmemory", 0)),
        "queues": queues,
    }
