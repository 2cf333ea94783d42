"""``GET /metrics``: Prometheus text exposition.

Renders, from the app's own registry: HTTP request metrics of this API process, live queue
depths per ``workflow.execute.<region>`` queue and state (read from BullMQ), live processes per
role (heartbeats), and what workers, scheduler and timer dispatcher published through Redis
with :class:`conveyor.runtime.MetricsPublisher` (executions finished by status and by tenant,
execution and step durations, enqueue-to-start latency, scheduler and timer lag). Read live on
each scrape, all bounded: the age of each queue's oldest waiting job, worker slots in use and in
total and the scheduler leader (heartbeats), Redis memory (``INFO memory``), and the readiness
verdict with its database check. When Redis is unreachable the Redis-backed families are empty
and ``conveyor_metrics_redis_up`` is 0; ``conveyor_ready`` and ``conveyor_database_up`` are
still rendered.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from conveyor.api import probes
from conveyor.api.deps import CtxDep
from conveyor.api.routes.health import readiness
from conveyor.runtime import MetricsSnapshot, read_metrics
from conveyor.runtime.prometheus import ConveyorCollector

router = APIRouter(tags=["metrics"])

EXAMPLE = """\
# HELP conveyor_queue_jobs Jobs in each BullMQ queue by state.
# TYPE conveyor_queue_jobs gauge
conveyor_queue_jobs{queue="workflow.execute.us",state="waiting"} 2.0
# HELP conveyor_executions_finished_total Execution runs finished by workers, by final status.
# TYPE conveyor_executions_finished_total counter
conveyor_executions_finished_total{status="succeeded"} 1042.0
"""


async def _snapshot(ctx: CtxDep) -> MetricsSnapshot:
    async with asyncio.timeout(probes.PROBE_TIMEOUT_S * 2):
        snapshot = await read_metrics(ctx.queues)
        processes = await probes.live_processes(ctx)
        workers = probes.worker_regions(processes)
        counts = await probes.queue_counts(ctx, ctx.known_regions(*workers))
        snapshot.oldest_waiting_s = await probes.oldest_waiting(ctx, counts)
    for name, raw in counts.items():
        depth = probes.depth_of(raw)
        states = {s: int(n) for s, n in raw.items() if s != probes.PAUSED_FLAG}
        states["paused"] = depth["paused"]  # waiting jobs a pause holds back
        snapshot.queue_depths[name] = states
        snapshot.queue_paused[name] = bool(depth["isPaused"])
    snapshot.add_heartbeats(processes)
    snapshot.redis_up = True
    return snapshot


async def _redis_snapshot(ctx: CtxDep) -> MetricsSnapshot:
    try:
        return await _snapshot(ctx)
    except (*probes.ProbeErrors, ValueError):
        return MetricsSnapshot()


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    description=(
        "Prometheus text format. Queue depths are read live from Redis on each scrape; "
        "execution, latency and lag metrics are the totals every worker, scheduler and timer "
        "process published to Redis, so any API process renders the same values."
    ),
    response_class=Response,
    responses={
        200: {"content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}, "example": EXAMPLE}}}
    },
)
async def metrics(request: Request, ctx: CtxDep) -> Response:
    # Readiness probes Redis and the database itself (never raises, bounded): it still
    # answers when Redis is down and the Redis-backed families are empty.
    snapshot, (ready, report) = await asyncio.gather(_redis_snapshot(ctx), readiness(ctx))
    snapshot.ready = ready
    snapshot.database_up = bool(report["checks"]["database"])
    registry: CollectorRegistry = request.app.state.registry
    collector: ConveyorCollector = request.app.state.collector
    collector.update(snapshot)
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
