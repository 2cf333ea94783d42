"""Bounded probes of Redis, the database and the regional queues (health, ready, status).

Every probe has a timeout and turns failures into a status instead of raising, so health
endpoints always answer within their budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from redis.exceptions import RedisClusterException, RedisError

from conveyor.api.context import ApiContext
from conveyor.dispatch import keys
from conveyor.errors import ConveyorError
from conveyor.queue import QueueFactory, execution_queue_name
from conveyor.runtime import list_processes

log = logging.getLogger(__name__)

PROBE_TIMEOUT_S = 1.0
"""Budget of each dependency probe; probes run concurrently, so a health answer takes at most
about this long even with Redis and the database both hanging."""

COUNT_STATES = ("waiting", "prioritized", "active", "delayed", "paused", "failed")

ProbeErrors = (RedisError, RedisClusterException, OSError, ConveyorError, TimeoutError)

PAUSED_FLAG = "isPaused"
"""Key of :func:`queue_counts`' entries that is not a job state: 1 when the queue is paused
(BullMQ's flag, set by our admin API or by any BullMQ client or dashboard), else 0."""
"""What a Redis read may raise; callers turn these into an `unknown`/`unreachable` status."""


def iso_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


async def probe_queue(ctx: ApiContext, timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    """``QueueFactory.health`` bounded by ``timeout_s`` (never raises); concurrent callers
    share one probe."""
    return dict(await ctx.single_flight("probe:queue", lambda: _probe_queue(ctx, timeout_s)))


async def _probe_queue(ctx: ApiContext, timeout_s: float) -> dict[str, Any]:
    try:
        async with asyncio.timeout(timeout_s + 0.5):
            return dict(await ctx.queues.health(timeout_s=timeout_s))
    except Exception as exc:  # health must answer whatever went wrong
        return {
            "driver": ctx.queues.driver,
            "status": "unreachable",
            "latencyMs": None,
            "durable": ctx.queues.durable,
            "error": describe(exc),
        }


async def probe_database(ctx: ApiContext, timeout_s: float = PROBE_TIMEOUT_S) -> dict[str, Any]:
    """One ``SELECT 1`` round trip bounded by ``timeout_s`` (never raises); concurrent callers
    share one probe."""
    return dict(await ctx.single_flight("probe:db", lambda: _probe_database(ctx, timeout_s)))


async def _probe_database(ctx: ApiContext, timeout_s: float) -> dict[str, Any]:
    dialect = ctx.store.dialect
    try:
        async with asyncio.timeout(timeout_s + 0.5):
            latency = await ctx.store.ping(timeout_s)
    except Exception as exc:  # health must answer whatever went wrong
        return {"dialect": dialect, "status": "unreachable", "latencyMs": None,
                "error": describe(exc)}  # fmt: skip
    return {"dialect": dialect, "status": "ready", "latencyMs": round(latency, 3)}


def describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    text = str(exc) or type(exc).__name__
    return text[:300]


def depth_of(counts: dict[str, int]) -> dict[str, int]:
    """A queue's depth for operators: ``{waiting, active, total}`` plus detail.

    ``waiting`` counts BullMQ's ``waiting`` and ``prioritized`` lists (both are ready to run:
    Conveyor's fairness gives most jobs a priority); ``delayed`` (timers, tenant-cap
    hold-backs, retries with backoff) is reported separately; ``total`` = waiting + active +
    delayed. ``isPaused``: the queue is paused; ``paused`` is then how many of the waiting jobs
    the pause holds back (BullMQ 5+ leaves them in the waiting lists and only sets a flag).
    """
    waiting = int(counts.get("waiting", 0)) + int(counts.get("prioritized", 0))
    active = int(counts.get("active", 0))
    delayed = int(counts.get("delayed", 0))
    is_paused = bool(counts.get(PAUSED_FLAG, 0))
    return {
        "waiting": waiting,
        "active": active,
        "delayed": delayed,
        "paused": int(counts.get("paused", 0)) + (waiting if is_paused else 0),
        "isPaused": is_paused,
        "failed": int(counts.get("failed", 0)),
        "total": waiting + active + delayed,
    }


async def queue_counts(
    ctx: ApiContext, regions: list[str], timeout_s: float = PROBE_TIMEOUT_S
) -> dict[str, dict[str, int]]:
    """Raw BullMQ job counts per ``workflow.execute.<region>`` queue, read live from Redis, and
    whether the queue is paused (:data:`PAUSED_FLAG`).

    Raises on Redis errors (bounded by ``timeout_s``).
    """

    async def one(region: str) -> dict[str, int]:
        queue = ctx.execution_queue(region)
        counts, paused = await asyncio.gather(
            queue.get_job_counts(*COUNT_STATES), queue.is_paused()
        )
        return {**counts, PAUSED_FLAG: int(paused)}

    async with asyncio.timeout(timeout_s):
        results = await asyncio.gather(*(one(r) for r in regions))
    return {execution_queue_name(r): c for r, c in zip(regions, results, strict=True)}


async def oldest_waiting(
    ctx: ApiContext,
    queue_names: Iterable[str],
    timeout_s: float = PROBE_TIMEOUT_S,
    now_ms: float | None = None,
) -> dict[str, float]:
    """Per queue, seconds since the oldest job that is ready to run was added (0 when none).

    Bounded: two pipelined round trips whatever the queue lengths. Candidates per queue are the
    oldest job of BullMQ's ``wait`` list (its right end) and the first and last job of its
    ``prioritized`` set (next to run, and last in line: a low-priority job kept behind busier
    tenants); their ``timestamp`` (ms, set when added) is read. Within one priority BullMQ
    keeps insertion order, so this is exact for a single priority and a close lower bound
    otherwise. A job that was deferred (delayed) and came back keeps the time it was first
    added. Raises on Redis errors (bounded by ``timeout_s``).
    """
    async with asyncio.timeout(timeout_s):
        return await _oldest_waiting(ctx.queues, sorted(set(queue_names)), now_ms)


async def _oldest_waiting(
    queues: QueueFactory, names: list[str], now_ms: float | None
) -> dict[str, float]:
    prefix = queues.settings.queue_prefix
    pipe = queues.redis.pipeline(transaction=False)
    for name in names:
        wait, _, prioritized, _ = keys.backlog(prefix, name, cluster=queues.settings.uses_cluster)
        pipe.lindex(wait, -1)
        pipe.zrange(prioritized, 0, 0)
        pipe.zrange(prioritized, -1, -1)
    raw = await pipe.execute()
    candidates: list[tuple[str, str]] = []
    for i, name in enumerate(names):
        last, head, tail = raw[3 * i : 3 * i + 3]
        ids = {_str(j) for j in (last, *head, *tail) if j is not None}
        candidates += [(name, job_id) for job_id in sorted(ids)]
    ages = dict.fromkeys(names, 0.0)
    if not candidates:
        return ages
    pipe = queues.redis.pipeline(transaction=False)
    for name, job_id in candidates:
        pipe.hget(keys.job(prefix, name, job_id, cluster=queues.settings.uses_cluster), "timestamp")
    stamps = await pipe.execute()
    now_ms = time.time() * 1000 if now_ms is None else now_ms
    for (name, _), stamp in zip(candidates, stamps, strict=True):
        with contextlib.suppress(TypeError, ValueError):
            ages[name] = max(ages[name], (now_ms - float(_str(stamp))) / 1000)
    return ages


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def live_processes(
    ctx: ApiContext, timeout_s: float = PROBE_TIMEOUT_S
) -> list[dict[str, Any]]:
    """Heartbeats of live processes (raises on Redis errors, bounded)."""
    async with asyncio.timeout(timeout_s):
        return await list_processes(ctx.queues)


def worker_regions(processes: list[dict[str, Any]]) -> dict[str, int]:
    """Live worker processes per region they consume."""
    out: dict[str, int] = {}
    for proc in processes:
        if proc.get("role") != "worker":
            continue
        for region in proc.get("regions") or ():
            out[str(region)] = out.get(str(region), 0) + 1
    return out


def consumption(
    regions: list[str],
    workers: dict[str, int] | None,
    counts: dict[str, dict[str, int]] | None,
) -> list[dict[str, Any]]:
    """Per regional queue: is anybody consuming it? (``None`` inputs: Redis unreadable.)

    A paused queue is ``paused`` whoever listens to it: its workers take no jobs from it."""
    out: list[dict[str, Any]] = []
    for region in regions:
        name = execution_queue_name(region)
        if workers is None or counts is None:
            out.append({"queue": name, "region": region, "status": "unknown", "workers": 0,
                        "waiting": None})  # fmt: skip
            continue
        n = workers.get(region, 0)
        depth = depth_of(counts.get(name, {}))
        waiting = depth["waiting"]
        status = "consumed" if n else ("unconsumed" if waiting else "idle")
        if depth["isPaused"]:
            status = "paused"
        out.append(
            {"queue": name, "region": region, "status": status, "workers": n, "waiting": waiting}
        )
    return out
