"""Readiness check and health probe for the queue's Redis.

:func:`assert_ready` is what worker processes call at start-up: connectivity and
credentials within a short deadline, the Redis version BullMQ needs, and a loud warning
when ``maxmemory-policy`` is not ``noeviction`` (Redis could then evict queue keys).
:func:`probe` feeds ``GET /api/health``; it returns within its timeout whatever Redis does.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import Any, TypedDict

import redis.asyncio as aioredis
from redis.exceptions import NoPermissionError, ResponseError

from conveyor.errors import QueueNotReady, QueueUnavailable
from conveyor.queue import connection
from conveyor.settings import Settings

log = logging.getLogger(__name__)

MIN_REDIS_VERSION = (5, 0, 0)
"""BullMQ refuses older servers (streams, ZPOPMIN)."""
RECOMMENDED_REDIS_VERSION = (6, 2, 0)
"""BullMQ's recommended minimum."""

_background: set[asyncio.Task[Any]] = set()


class Persistence(TypedDict):
    aof: bool | None
    """``appendonly`` is on (``None``: could not be read)."""
    rdb: bool | None
    """RDB snapshots are configured (``save`` is not empty; ``None``: CONFIG denied)."""


class ServerFacts(TypedDict):
    redisVersion: str | None
    evictionPolicy: str | None
    persistence: Persistence


def parse_version(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    parts = re.findall(r"\d+", text)[:3]
    return tuple(int(p) for p in parts) if parts else None


async def _info(client: aioredis.Redis, section: str) -> dict[str, Any]:
    try:
        return dict(await client.info(section))
    except (NoPermissionError, ResponseError):
        return {}


async def server_facts(client: aioredis.Redis) -> ServerFacts:
    """Version, eviction policy and persistence; fields the ACL hides come back ``None``."""
    server = await _info(client, "server")
    memory = await _info(client, "memory")
    persistence = await _info(client, "persistence")
    try:
        save = (await client.config_get("save")).get("save")
        rdb: bool | None = bool(save and str(save).strip())
    except (NoPermissionError, ResponseError):
        rdb = None
    aof = persistence.get("aof_enabled")
    return {
        "redisVersion": str(server["redis_version"]) if "redis_version" in server else None,
        "evictionPolicy": memory.get("maxmemory_policy"),
        "persistence": {"aof": None if aof is None else bool(int(aof)), "rdb": rdb},
    }


def readiness_deadline_s(settings: Settings) -> float:
    return settings.queue_redis_connect_timeout_ms / 1000.0 + 2.0


async def assert_ready(client: aioredis.Redis, settings: Settings) -> ServerFacts:
    """Raise :class:`QueueUnavailable` / :class:`QueueNotReady` unless BullMQ can use Redis."""
    deadline = readiness_deadline_s(settings)
    where = connection.location(settings)
    try:
        async with asyncio.timeout(deadline):
            await client.ping()
            facts = await server_facts(client)
    except TimeoutError as exc:
        raise QueueUnavailable(f"Redis at {where} did not answer within {deadline:g} s") from exc
    except connection.QUEUE_ERRORS as exc:
        raise connection.translate(exc, settings, "connect to") from exc
    check_facts(facts, where)
    log.info(
        "queue.ready",
        extra={
            "redis": where,
            "version": facts["redisVersion"],
            "evictionPolicy": facts["evictionPolicy"],
        },
    )
    return facts


def check_facts(facts: ServerFacts, where: str) -> None:
    """Refuse a Redis older than BullMQ needs; warn on an old one and on eviction."""
    version = parse_version(facts["redisVersion"])
    if version is None:
        log.warning("queue.redis_version_unknown", extra={"redis": where})
    elif version < MIN_REDIS_VERSION:
        raise QueueNotReady(
            f"Redis at {where} is version {facts['redisVersion']}; BullMQ needs >= 5.0.0 (6.2+ recommended)"
        )
    elif version < RECOMMENDED_REDIS_VERSION:
        log.warning(
            "queue.redis_version_old", extra={"redis": where, "version": facts["redisVersion"]}
        )
    policy = facts["evictionPolicy"]
    if policy is not None and policy != "noeviction":
        log.warning(
            "queue.eviction_policy_unsafe: maxmemory-policy is %r; BullMQ needs 'noeviction' "
            "or Redis may silently evict queued jobs under memory pressure",
            policy,
            extra={"redis": where, "evictionPolicy": policy},
        )


def _unreachable(driver: str, error: str) -> dict[str, Any]:
    return {
        "driver": driver,
        "status": "unreachable",
        "latencyMs": None,
        "durable": False,
        "persistence": {"aof": None, "rdb": None},
        "evictionPolicy": None,
        "redisVersion": None,
        "warnings": [],
        "error": error,
    }


async def _measure(client: aioredis.Redis) -> tuple[float, ServerFacts]:
    start = time.perf_counter()
    await client.ping()
    latency_ms = round((time.perf_counter() - start) * 1000.0, 3)
    return latency_ms, await server_facts(client)


def _reap(task: asyncio.Task[Any]) -> None:
    _background.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved so asyncio does not log it


async def probe(
    client: aioredis.Redis | None, settings: Settings, timeout_s: float = 2.0
) -> dict[str, Any]:
    """The health document; returns within ``timeout_s`` even if Redis hangs."""
    if client is None or settings.driver == "inmemory":
        return {
            "driver": "inmemory",
            "status": "ready",
            "latencyMs": 0.0,
            "durable": False,
            "persistence": {"aof": False, "rdb": False},
            "evictionPolicy": None,
            "redisVersion": None,
            "warnings": ["QUEUE_DRIVER=inmemory: jobs are lost when the process exits"],
        }
    task = asyncio.get_running_loop().create_task(_measure(client), name="conveyor.queue_health")
    done, _ = await asyncio.wait({task}, timeout=timeout_s)
    if not done:
        task.cancel()
        _background.add(task)
        task.add_done_callback(_reap)
        where = connection.location(settings)
        return _unreachable("bullmq", f"Redis at {where} did not answer within {timeout_s:g} s")
    exc = task.exception()
    if exc is not None:
        if not isinstance(exc, connection.QUEUE_ERRORS):
            raise exc
        return _unreachable("bullmq", connection.translate(exc, settings, "probe").message)
    latency_ms, facts = task.result()
    warnings = []
    if facts["evictionPolicy"] not in (None, "noeviction"):
        warnings.append(f"maxmemory-policy is {facts['evictionPolicy']}; BullMQ needs noeviction")
    return {
        "driver": "bullmq",
        "status": "ready",
        "latencyMs": latency_ms,
        "durable": True,
        **facts,
        "warnings": warnings,
    }
