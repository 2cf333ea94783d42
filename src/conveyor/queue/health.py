"""Readiness check and health probe for the queue's Redis.

:func:`assert_ready` is what worker processes call at start-up: connectivity and
credentials within a short deadline, the Redis version BullMQ needs, and a loud warning
when ``maxmemory-policy`` is not ``noeviction`` (Redis could then evict queue keys).
:func:`probe` feeds ``GET /api/health``; it returns within its timeout whatever Redis does.
With Sentinel both also report the master in use and :func:`sentinel_view`: how many of the
configured sentinels answer, the master they name, and whether they can still agree on a
failover (``SENTINEL CKQUORUM``). With Redis Cluster they report :func:`cluster_view`: the
cluster's state (``CLUSTER INFO``) and its masters and replicas.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter
from typing import Any, TypedDict

import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel
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


class SentinelView(TypedDict):
    master: str
    """The master's name (``QUEUE_REDIS_SENTINEL_MASTER``)."""
    masterAddress: str | None
    """``host:port`` most answering sentinels name as the master (``None``: none answered)."""
    sentinels: int
    """Sentinels configured (``QUEUE_REDIS_SENTINELS``)."""
    reachable: int
    """Of those, how many answered and know the master."""
    quorum: int | None
    """Sentinels that must agree the master is down before a failover starts."""
    quorumOk: bool
    """``SENTINEL CKQUORUM``: enough sentinels are up to reach the quorum and authorise a
    failover (a majority of all sentinels)."""
    masterDown: bool
    """Some answering sentinel sees the master down now (a failover may be under way)."""
    errors: list[str]


_VIEW_ERRORS: tuple[type[BaseException], ...] = (ResponseError, *connection.QUEUE_ERRORS)


async def _command(client: aioredis.Redis, *args: str) -> Any:
    """A raw command (redis-py's ``execute_command`` is untyped); ``SENTINEL MASTER`` is
    parsed into a dict by redis-py's response callbacks."""
    execute: Any = client.execute_command
    return await execute(*args)


def _address(state: dict[str, Any]) -> str:
    return f"{state['ip']}:{state['port']}"


async def sentinel_view(sentinel: Sentinel, settings: Settings, timeout_s: float) -> SentinelView:
    """Ask every configured sentinel about the master, concurrently; never raises, returns
    within about ``timeout_s``."""
    name = str(settings.queue_redis_sentinel_master)
    deadline = asyncio.get_running_loop().time() + timeout_s

    async def ask(client: aioredis.Redis) -> dict[str, Any]:
        async with asyncio.timeout_at(deadline):
            state = await _command(client, "SENTINEL MASTER", name)
        if not isinstance(state, dict):
            raise ResponseError(f"unexpected reply to SENTINEL MASTER: {state!r}")
        return state

    clients = list(sentinel.sentinels)
    answers = await asyncio.gather(*(ask(c) for c in clients), return_exceptions=True)
    states = [a for a in answers if isinstance(a, dict)]
    errors = [
        f"{_where(c)}: {str(a) or type(a).__name__}"[:200]
        for c, a in zip(clients, answers, strict=True)
        if isinstance(a, BaseException)
    ]
    quorum_ok = False
    for client, answer in zip(clients, answers, strict=True):
        if not isinstance(answer, dict):
            continue
        try:
            async with asyncio.timeout_at(deadline):
                reply = await _command(client, "SENTINEL", "CKQUORUM", name)
            quorum_ok = str(reply).startswith("OK")
        except _VIEW_ERRORS as exc:
            errors.append(f"{_where(client)}: {exc}"[:200])
        break
    named = Counter(_address(s) for s in states)
    return {
        "master": name,
        "masterAddress": named.most_common(1)[0][0] if named else None,
        "sentinels": len(clients),
        "reachable": len(states),
        "quorum": max(int(s["quorum"]) for s in states) if states else None,
        "quorumOk": quorum_ok,
        "masterDown": any(s.get("is_sdown") or s.get("is_odown") for s in states),
        "errors": errors,
    }


def _where(client: aioredis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"sentinel {kwargs.get('host')}:{kwargs.get('port')}"


def _unanswered_view(settings: Settings, why: str) -> SentinelView:
    return {
        "master": str(settings.queue_redis_sentinel_master),
        "masterAddress": None,
        "sentinels": len(settings.queue_redis_sentinels),
        "reachable": 0,
        "quorum": None,
        "quorumOk": False,
        "masterDown": False,
        "errors": [why],
    }


class ClusterView(TypedDict):
    state: str | None
    """``cluster_state`` of ``CLUSTER INFO``: ``ok`` when every slot is served."""
    slotsOk: int | None
    """Slots served by a reachable master (16384 when all is well)."""
    masters: list[str]
    """``host:port`` of the masters serving slots."""
    replicas: int
    """Replicas known to the client."""
    knownNodes: int | None
    """``cluster_known_nodes``: every node the cluster knows (masters, replicas, failed)."""
    failed: int
    """Nodes flagged as failed (``fail`` or ``fail?``)."""
    errors: list[str]


async def cluster_view(client: aioredis.Redis, timeout_s: float) -> ClusterView:
    """The cluster's state as one node sees it and the nodes the client knows; never raises,
    returns within about ``timeout_s``."""
    view: ClusterView = {
        "state": None,
        "slotsOk": None,
        "masters": [],
        "replicas": 0,
        "knownNodes": None,
        "failed": 0,
        "errors": [],
    }
    cluster: Any = client
    try:
        async with asyncio.timeout(timeout_s):
            info = await cluster.cluster_info()
            view["state"] = str(info.get("cluster_state"))
            view["slotsOk"] = int(info.get("cluster_slots_ok", 0))
            view["knownNodes"] = int(info.get("cluster_known_nodes", 0))
            nodes: dict[str, Any] = await cluster.cluster_nodes()
        live = {a: n for a, n in nodes.items() if "fail" not in str(n.get("flags"))}
        view["masters"] = sorted(
            a for a, n in live.items() if "master" in str(n.get("flags")) and n.get("slots")
        )
        view["replicas"] = sum(1 for n in live.values() if "slave" in str(n.get("flags")))
        view["failed"] = len(nodes) - len(live)
    except _VIEW_ERRORS as exc:  # includes TimeoutError
        view["errors"].append((str(exc) or type(exc).__name__)[:200])
    return view


async def memory_info(client: aioredis.Redis, *, cluster: bool) -> dict[str, Any]:
    """``INFO memory``; of a Redis Cluster, the masters' memory added up (their policy: the
    first master's), since a cluster pipeline refuses ``INFO`` and a plain call asks one node."""
    if not cluster:
        return dict(await client.info("memory"))
    nodes: Any = client
    per_node: dict[str, Any] = await nodes.info("memory", target_nodes=nodes.PRIMARIES)
    infos = [i for i in per_node.values() if isinstance(i, dict)]
    if not infos:
        return {}
    memory: dict[str, Any] = {
        k: sum(int(i.get(k) or 0) for i in infos) for k in ("used_memory", "maxmemory")
    }
    memory["maxmemory_policy"] = infos[0].get("maxmemory_policy")
    return memory


def cluster_warnings(view: ClusterView | None) -> list[str]:
    """What an operator should hear about the cluster (empty: all well)."""
    if view is None:
        return []
    warnings = []
    if view["state"] not in (None, "ok"):
        warnings.append(f"cluster_state is {view['state']}: some slots are not served")
    if view["failed"]:
        warnings.append(f"{view['failed']} cluster nodes are seen failing")
    if view["state"] is not None and view["replicas"] < len(view["masters"]):
        warnings.append(
            f"{view['replicas']} replicas for {len(view['masters'])} masters: a master "
            "without a replica is not replaced when it fails"
        )
    return warnings


def view_warnings(view: SentinelView | None) -> list[str]:
    """What an operator should hear about the sentinels (empty: all well)."""
    if view is None:
        return []
    warnings = []
    if view["reachable"] < view["sentinels"]:
        warnings.append(f"{view['reachable']} of {view['sentinels']} sentinels answered")
    if not view["quorumOk"]:
        warnings.append(
            "the sentinels cannot reach their quorum: a failed master would not be replaced"
        )
    return warnings


def readiness_deadline_s(settings: Settings) -> float:
    return settings.queue_redis_connect_timeout_ms / 1000.0 + 2.0


async def assert_ready(
    client: aioredis.Redis, settings: Settings, sentinel: Sentinel | None = None
) -> ServerFacts:
    """Raise :class:`QueueUnavailable` / :class:`QueueNotReady` unless BullMQ can use Redis.
    With ``sentinel``, also log the master found and warn when the sentinels are degraded."""
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
    extra: dict[str, Any] = {
        "redis": where,
        "version": facts["redisVersion"],
        "evictionPolicy": facts["evictionPolicy"],
    }
    if settings.uses_cluster:
        cview = await cluster_view(client, timeout_s=deadline / 2)
        extra.update(
            clusterState=cview["state"], masters=len(cview["masters"]), replicas=cview["replicas"]
        )
        for warning in cluster_warnings(cview):
            log.warning("queue.cluster_degraded: %s", warning, extra={"redis": where})
        if "{" in settings.queue_prefix:
            log.warning(
                "queue.cluster_one_slot: QUEUE_PREFIX %r has a hash tag: every queue and key is "
                "in one slot, on one master; leave the braces out to spread the regions",
                settings.queue_prefix,
                extra={"redis": where},
            )
    if sentinel is not None:
        view = await sentinel_view(sentinel, settings, timeout_s=deadline / 2)
        extra.update(
            master=connection.master_address(client),
            sentinelsReachable=view["reachable"],
            quorumOk=view["quorumOk"],
        )
        for warning in view_warnings(view):
            log.warning("queue.sentinel_degraded: %s", warning, extra={"redis": where})
    log.info("queue.ready", extra=extra)
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


def _unreachable(
    driver: str, error: str, view: SentinelView | None, cluster: ClusterView | None = None
) -> dict[str, Any]:
    return {
        "driver": driver,
        "status": "unreachable",
        "latencyMs": None,
        "durable": False,
        "persistence": {"aof": None, "rdb": None},
        "evictionPolicy": None,
        "redisVersion": None,
        "address": None,
        "sentinel": view,
        "cluster": cluster,
        "warnings": view_warnings(view) + cluster_warnings(cluster),
        "error": error,
    }


async def _measure(
    client: aioredis.Redis, cluster: bool = False
) -> tuple[float, ServerFacts, ClusterView | None]:
    start = time.perf_counter()
    await client.ping()
    latency_ms = round((time.perf_counter() - start) * 1000.0, 3)
    facts = await server_facts(client)
    # The view's own errors are in it; reaching here means a node answered.
    view = await cluster_view(client, timeout_s=1.0) if cluster else None
    return latency_ms, facts, view


def _reap(task: asyncio.Task[Any]) -> None:
    _background.discard(task)
    if not task.cancelled():
        task.exception()  # retrieved so asyncio does not log it


def _abandon(task: asyncio.Task[Any]) -> None:
    task.cancel()
    _background.add(task)
    task.add_done_callback(_reap)


async def probe(
    client: aioredis.Redis | None,
    settings: Settings,
    timeout_s: float = 2.0,
    sentinel: Sentinel | None = None,
) -> dict[str, Any]:
    """The health document; returns within ``timeout_s`` even if Redis hangs. ``address``:
    the master's ``host:port``; ``sentinel``: :func:`sentinel_view` (``None`` without)."""
    if client is None or settings.driver == "inmemory":
        return {
            "driver": "inmemory",
            "status": "ready",
            "latencyMs": 0.0,
            "durable": False,
            "persistence": {"aof": False, "rdb": False},
            "evictionPolicy": None,
            "redisVersion": None,
            "address": None,
            "sentinel": None,
            "cluster": None,
            "warnings": ["QUEUE_DRIVER=inmemory: jobs are lost when the process exits"],
        }
    loop = asyncio.get_running_loop()
    task = loop.create_task(_measure(client, settings.uses_cluster), name="conveyor.queue_health")
    viewing: asyncio.Task[SentinelView] | None = None
    if sentinel is not None:
        viewing = loop.create_task(
            sentinel_view(sentinel, settings, timeout_s * 0.8), name="conveyor.sentinel_view"
        )
    await asyncio.wait({task} if viewing is None else {task, viewing}, timeout=timeout_s)
    view: SentinelView | None = None
    if viewing is not None:
        if viewing.done():
            view = viewing.result()  # sentinel_view never raises
        else:
            _abandon(viewing)
            view = _unanswered_view(settings, f"no answer within {timeout_s:g} s")
    if not task.done():
        _abandon(task)
        where = connection.location(settings)
        error = f"Redis at {where} did not answer within {timeout_s:g} s"
        return _unreachable("bullmq", error, view)
    exc = task.exception()
    if exc is not None:
        if not isinstance(exc, connection.QUEUE_ERRORS):
            raise exc
        error = connection.translate(exc, settings, "probe").message
        return _unreachable("bullmq", error, view)
    latency_ms, facts, cview = task.result()
    warnings = view_warnings(view) + cluster_warnings(cview)
    if facts["evictionPolicy"] not in (None, "noeviction"):
        warnings.append(f"maxmemory-policy is {facts['evictionPolicy']}; BullMQ needs noeviction")
    if cview is not None:
        address = ",".join(cview["masters"]) or None
    elif sentinel is not None:
        address = connection.master_address(client)
    else:
        address = f"{settings.queue_redis_host}:{settings.queue_redis_port}"
    return {
        "driver": "bullmq",
        "status": "ready",
        "latencyMs": latency_ms,
        "durable": True,
        **facts,
        "address": address,
        "sentinel": view,
        "cluster": cview,
        "warnings": warnings,
    }
