"""The admin status document operators poll during an incident, built live from Redis.

Queue depths are read from BullMQ itself, so they are right also when no worker runs; the
processes come from their heartbeats (:mod:`conveyor.runtime.heartbeat`). Every Redis read is bounded;
when Redis is unreachable the document still answers, with ``redis.status: "unreachable"``,
empty depths and the reason in ``errors``.
"""

from __future__ import annotations

from typing import Any

from conveyor.api import probes
from conveyor.api.context import ApiContext
from conveyor.runtime import TIMER_ROLES


def _sum(processes: list[dict[str, Any]], key: str) -> int:
    total = 0
    for proc in processes:
        value = proc.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            total += int(value)
    return total


def _earliest(values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    return min(present, key=str) if present else None


def _latest(values: list[Any]) -> Any:
    present = [v for v in values if v is not None]
    return max(present, key=str) if present else None


def _worker_section(
    ctx: ApiContext, workers: list[dict[str, Any]], counts: dict[str, dict[str, int]]
) -> dict[str, Any]:
    return {
        "started": bool(workers),
        "queueDriver": ctx.queues.driver,
        "instances": len(workers),
        "concurrency": _sum(workers, "concurrency"),
        "activeJobs": _sum(workers, "activeJobs"),
        "jobsDone": _sum(workers, "jobsDone"),
        "jobsFailed": _sum(workers, "jobsFailed"),
        "metrics": {"queueDepths": {name: probes.depth_of(c) for name, c in counts.items()}},
    }


def _scheduler_section(
    ctx: ApiContext, schedulers: list[dict[str, Any]], queue: dict[str, Any]
) -> dict[str, Any]:
    holder = next((s for s in schedulers if s.get("lockHeld")), None)
    source = holder or {}
    return {
        "preferredStrategy": "postgres" if ctx.settings.is_postgres else "redis",
        "redis": {
            "status": queue.get("status", "unreachable"),
            "latencyMs": queue.get("latencyMs"),
        },
        "started": bool(schedulers),
        "instances": len(schedulers),
        "lockHolder": source.get("id"),
        "lockHolderHost": source.get("host"),
        "lastTick": source.get("lastTick") or _latest([s.get("lastTick") for s in schedulers]),
        "lagMs": source.get("lagMs"),
        "ticksInWindow": source.get("ticksInWindow"),
        "lookaheadMs": source.get("lookaheadMs"),
        "windowMs": source.get("windowMs"),
        "ticksPerSecond": source.get("ticksPerSecond"),
        "misfiresPerMinute": source.get("misfiresPerMinute"),
        "misfires": source.get("misfires"),
    }


def _timer_section(timers: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "started": bool(timers),
        "instances": len(timers),
        "nextDueAt": _earliest([t.get("nextDueAt") for t in timers]),
        "backlog": max((int(t.get("backlog") or 0) for t in timers), default=0),
        "lagMs": _latest([t.get("lagMs") for t in timers]),
    }


async def status_document(ctx: ApiContext) -> dict[str, Any]:
    """The ``data`` of ``GET /api/admin/workers/status``."""
    queue = await probes.probe_queue(ctx)
    errors: list[str] = []
    processes: list[dict[str, Any]] = []
    counts: dict[str, dict[str, int]] = {}
    workers_by_region: dict[str, int] | None = None
    regions = ctx.known_regions()
    if queue.get("status") == "ready":
        try:
            processes = await probes.live_processes(ctx)
            workers_by_region = probes.worker_regions(processes)
            regions = ctx.known_regions(*workers_by_region)
        except probes.ProbeErrors as exc:
            errors.append(f"heartbeats: {probes.describe(exc)}")
        try:
            counts = await probes.queue_counts(ctx, regions)
        except probes.ProbeErrors as exc:
            errors.append(f"queue depths: {probes.describe(exc)}")
    else:
        errors.append(f"redis: {queue.get('error') or 'unreachable'}")
    by_role: dict[str, list[dict[str, Any]]] = {}
    for proc in processes:
        by_role.setdefault(str(proc.get("role")), []).append(proc)
    timers = [p for role in TIMER_ROLES for p in by_role.get(role, [])]
    return {
        "timestamp": probes.iso_now(),
        "executionWorker": _worker_section(ctx, by_role.get("worker", []), counts),
        "scheduler": _scheduler_section(ctx, by_role.get("scheduler", []), queue),
        "timerDispatcher": _timer_section(timers),
        "queue": queue,
        "regions": probes.consumption(
            regions, workers_by_region, counts if counts or not errors else None
        ),
        "processes": processes,
        "errors": errors,
    }
