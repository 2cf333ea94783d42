"""``/api/health`` (liveness) and ``/api/health/ready`` (readiness)."""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from conveyor.api import probes
from conveyor.api.deps import CtxDep
from conveyor.api.errors import error_response
from conveyor.api.schemas import Envelope, HealthData, ReadyData, error_responses

router = APIRouter(tags=["health"])


@router.get(
    "/api/health",
    response_model=Envelope[HealthData],
    summary="Liveness and dependency status",
    description=(
        "Always answers 200 within about one second, even when Redis or the database hang: "
        "reports the queue (driver, `ready`/`unreachable`, round-trip latency, durability, "
        "AOF/RDB persistence, eviction policy, Redis version, the master's address and, with "
        "Sentinel, the sentinels' view; with Redis Cluster, the cluster's state and nodes) and "
        "the database (status, "
        "latency). `status` is `degraded` when either dependency is unreachable. Use it as "
        "the liveness probe."
    ),
)
async def health(ctx: CtxDep) -> dict[str, Any]:
    queue, database = await asyncio.gather(probes.probe_queue(ctx), probes.probe_database(ctx))
    ok = queue.get("status") == "ready" and database["status"] == "ready"
    return {
        "success": True,
        "data": {
            "status": "ok" if ok else "degraded",
            "timestamp": probes.iso_now(),
            "queue": queue,
            "database": database,
        },
    }


async def readiness(ctx: CtxDep) -> tuple[bool, dict[str, Any]]:
    """Decide readiness (Redis answers, durable driver, database answers) and report queues."""
    queue, database = await asyncio.gather(probes.probe_queue(ctx), probes.probe_database(ctx))
    redis_ok = queue.get("status") == "ready"
    checks = {
        "redis": redis_ok,
        "durable": bool(queue.get("durable")) and ctx.queues.driver == "bullmq",
        "database": database["status"] == "ready",
    }
    workers: dict[str, int] | None = None
    counts: dict[str, dict[str, int]] | None = None
    regions = ctx.known_regions()
    if redis_ok:
        try:
            processes = await probes.live_processes(ctx)
            workers = probes.worker_regions(processes)
            regions = ctx.known_regions(*workers)
            counts = await probes.queue_counts(ctx, regions)
        except probes.ProbeErrors:
            workers = counts = None
    data = {
        "ready": all(checks.values()),
        "checks": checks,
        "queues": probes.consumption(regions, workers, counts),
        "redis": {
            "address": queue.get("address"),
            "sentinel": queue.get("sentinel"),
            "cluster": queue.get("cluster"),
        },
    }
    if queue.get("error"):
        data["queueError"] = queue["error"]
    if database.get("error"):
        data["databaseError"] = database["error"]
    return bool(data["ready"]), data


@router.get(
    "/api/health/ready",
    response_model=Envelope[ReadyData],
    summary="Readiness probe",
    description=(
        "200 only when Redis answers, the queue driver is durable (`bullmq`, not `inmemory`) "
        "and the database answers; otherwise 503 with the error shape and the same report in "
        "`error.details`. Follows Redis going away and coming back without a restart.\n\n"
        "`queues` is informational and never turns the answer into 503: for each regional "
        "queue it says whether a live worker heartbeat covers the region (`consumed`), jobs "
        "are waiting with nobody consuming them (`unconsumed`), or it is `idle`. The API can "
        "accept work durably while workers are down, so missing consumers do not make it "
        "unready; alert on `unconsumed` instead. `redis` says which master is in use and, "
        "with Sentinel, how many sentinels answer and whether they can reach their quorum; with "
        "Redis Cluster, `cluster_state` and its masters and replicas."
    ),
    responses=error_responses(503),
)
async def ready(ctx: CtxDep) -> Any:
    ok, data = await readiness(ctx)
    if ok:
        return {"success": True, "data": data}
    failed = [name for name, passed in data["checks"].items() if not passed]
    response: JSONResponse = error_response(
        503, "not_ready", f"not ready: {', '.join(failed)} check failed", data
    )
    return response
