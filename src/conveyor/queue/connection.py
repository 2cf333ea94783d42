"""Redis clients configured for production, and translation of Redis errors.

BullMQ's default client has no socket timeout and retries for minutes (a hard-coded
20-try exponential ``retry`` when given connection *options*), so Conveyor always hands
BullMQ a ready :class:`redis.asyncio.Redis` built here:

* connect and read timeouts, TCP keepalive probing every couple of seconds and
  ``TCP_USER_TIMEOUT`` so a half-open connection is noticed in seconds;
* a health check (PING) on connections idle for a while;
* a short, bounded retry so a blip is absorbed but an outage is reported quickly;
* ``decode_responses=True`` (BullMQ needs it), credentials, db and TLS from the settings.

With ``QUEUE_REDIS_SENTINELS`` the clients are Sentinel-managed (redis-py's
:class:`~redis.asyncio.sentinel.Sentinel`, ``master_for``): every new connection asks the
sentinels where the master is, so after a failover the next reconnect (the bounded retry, or
the caller's own loop) lands on the promoted replica, and a connection still open to a demoted
master is dropped on its first ``READONLY`` reply. Each client has its own pool; the
:class:`Sentinel` (its clients to the sentinels) is shared by a process's factory.

With ``QUEUE_REDIS_CLUSTER_NODES`` the clients are :class:`redis.asyncio.cluster.RedisCluster`
(which bullmq accepts as its connection): each command goes to the master of its key's slot,
the client follows ``MOVED`` redirections and re-reads the cluster's layout after a connection
error, so a replica promoted by the cluster is found on the next try. Queue names get a hash
tag there (:func:`bull_name`), so each queue's keys share one slot.

Roles: ``command`` (every non-blocking call), ``blocking`` (the worker's BZPOPMIN, which
blocks up to 10 s, so its read timeout is longer), ``events`` (QueueEvents' XREAD BLOCK)
and ``probe`` (readiness/health: one try, the caller bounds the time).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any, Literal, cast

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import MasterNotFoundError, Sentinel
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    ClusterDownError,
    NoPermissionError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from conveyor.errors import QueueError, QueueUnavailable
from conveyor.settings import Settings

ClientRole = Literal["command", "worker", "blocking", "events", "probe"]

BLOCKING_MAX_S = 10.0
"""The longest a BullMQ worker blocks in BZPOPMIN (its hard-coded ceiling)."""
EVENTS_BLOCK_MS = 5000
"""How long QueueEvents' XREAD blocks before re-checking whether it is closing."""
HEALTH_CHECK_INTERVAL_S = 10
KEEPALIVE_IDLE_S = 5
KEEPALIVE_INTERVAL_S = 2
KEEPALIVE_COUNT = 3


def keepalive_options() -> dict[int, int]:
    """TCP keepalive tuned so a dead peer is detected in ~11 s (platform permitting)."""
    opts: dict[int, int] = {}
    idle = getattr(socket, "TCP_KEEPIDLE", None) or getattr(socket, "TCP_KEEPALIVE", None)
    if idle is not None:
        opts[idle] = KEEPALIVE_IDLE_S
    if hasattr(socket, "TCP_KEEPINTVL"):
        opts[socket.TCP_KEEPINTVL] = KEEPALIVE_INTERVAL_S
    if hasattr(socket, "TCP_KEEPCNT"):
        opts[socket.TCP_KEEPCNT] = KEEPALIVE_COUNT
    if hasattr(socket, "TCP_USER_TIMEOUT"):
        # Unacknowledged writes give up after this long (ms) instead of ~15 minutes.
        opts[socket.TCP_USER_TIMEOUT] = 15000
    return opts


def _retry(role: ClientRole) -> Retry:
    if role in ("probe", "blocking", "events"):
        # probe: the caller owns the deadline; blocking/events: the consuming loop retries.
        return Retry(NoBackoff(), 0)
    if role == "worker":
        return Retry(ExponentialWithJitterBackoff(base=0.1, cap=1.0), 3)
    return Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), 2)


def _socket_timeout(settings: Settings, role: ClientRole) -> float:
    base = settings.queue_redis_socket_timeout_ms / 1000.0
    if role == "blocking":
        return BLOCKING_MAX_S + base
    if role == "events":
        return EVENTS_BLOCK_MS / 1000.0 + base
    return base


def tls_kwargs(settings: Settings, *, sentinel: bool = False) -> dict[str, Any]:
    """TLS options of the data connections (``QUEUE_REDIS_TLS``), or with ``sentinel`` of the
    connections to the sentinels (``QUEUE_REDIS_SENTINEL_TLS``); both verify with the same CA
    file (or not at all with ``QUEUE_REDIS_TLS_INSECURE``)."""
    if not (settings.queue_redis_sentinel_tls if sentinel else settings.queue_redis_tls):
        return {}
    kwargs: dict[str, Any] = {"ssl": True, "ssl_min_version": ssl.TLSVersion.TLSv1_2}
    if settings.queue_redis_tls_ca_file:
        kwargs["ssl_ca_certs"] = settings.queue_redis_tls_ca_file
    if settings.queue_redis_tls_insecure:
        kwargs["ssl_cert_reqs"] = "none"
        kwargs["ssl_check_hostname"] = False
    return kwargs


def _client_kwargs(settings: Settings, role: ClientRole) -> dict[str, Any]:
    password = settings.queue_redis_password
    return {
        "db": settings.queue_redis_db,
        "username": settings.queue_redis_username,
        "password": password.get_secret_value() if password is not None else None,
        "socket_connect_timeout": settings.queue_redis_connect_timeout_ms / 1000.0,
        "socket_timeout": _socket_timeout(settings, role),
        "socket_keepalive": True,
        "socket_keepalive_options": keepalive_options(),
        "health_check_interval": 0 if role == "probe" else HEALTH_CHECK_INTERVAL_S,
        "retry": _retry(role),
        "decode_responses": True,
        **tls_kwargs(settings),
    }


def make_sentinel(settings: Settings) -> Sentinel:
    """Clients to the sentinels of ``QUEUE_REDIS_SENTINELS`` (no I/O until used). A sentinel
    that does not answer within the connect timeout is skipped for the next one."""
    password = settings.queue_redis_sentinel_password
    timeout = settings.queue_redis_connect_timeout_ms / 1000.0
    sentinel_kwargs: dict[str, Any] = {
        "username": settings.queue_redis_sentinel_username,
        "password": password.get_secret_value() if password is not None else None,
        "socket_connect_timeout": timeout,
        "socket_timeout": timeout,
        "socket_keepalive": True,
        "socket_keepalive_options": keepalive_options(),
        "decode_responses": True,
        **tls_kwargs(settings, sentinel=True),
    }
    return Sentinel(list(settings.queue_redis_sentinels), sentinel_kwargs=sentinel_kwargs)


def bull_name(queue: str, cluster: bool) -> str:
    """The name BullMQ knows ``queue`` by: the queue's own name, or on Redis Cluster the name
    in braces, a hash tag (``bull:{executions-us}:wait``): every key of the queue in one slot
    (BullMQ's scripts touch several at once), each queue in a slot of its own."""
    return f"{{{queue}}}" if cluster else queue


def make_cluster_client(settings: Settings, role: ClientRole = "command") -> RedisCluster:
    """A Redis Cluster client for ``role`` from ``QUEUE_REDIS_CLUSTER_NODES`` (no I/O until
    used; the other nodes are discovered from the first that answers)."""
    kwargs = _client_kwargs(settings, role)
    del kwargs["db"]  # a cluster has database 0 only (the settings checked it)
    retry = kwargs.pop("retry")
    nodes = [ClusterNode(host, port) for host, port in settings.queue_redis_cluster_nodes]
    return RedisCluster(
        startup_nodes=nodes,
        retry=retry,
        # One re-read of the layout per failed try; the caller's loop retries beyond that.
        reinitialize_steps=1,
        **kwargs,
    )


def make_client(
    settings: Settings, role: ClientRole = "command", sentinel: Sentinel | None = None
) -> aioredis.Redis:
    """A Redis client for ``role``; creating it does no I/O. With ``QUEUE_REDIS_SENTINELS``
    pass the process's ``sentinel`` (:func:`make_sentinel`): the client then follows the
    master it names. With ``QUEUE_REDIS_CLUSTER_NODES`` it is a :class:`RedisCluster`
    (typed as a ``Redis``: it has the same commands, pipelines and scripts)."""
    if settings.uses_cluster:
        cluster: Any = make_cluster_client(settings, role)
        return cast(aioredis.Redis, cluster)
    kwargs = _client_kwargs(settings, role)
    if not settings.uses_sentinel:
        return aioredis.Redis(
            host=settings.queue_redis_host, port=settings.queue_redis_port, **kwargs
        )
    if sentinel is None:
        raise ValueError("QUEUE_REDIS_SENTINELS is set: pass the Sentinel from make_sentinel()")
    assert settings.queue_redis_sentinel_master is not None  # the settings checked it
    client: aioredis.Redis = sentinel.master_for(settings.queue_redis_sentinel_master, **kwargs)
    return client


def master_address(client: aioredis.Redis) -> str | None:
    """``host:port`` of the master a Sentinel-managed ``client`` last resolved (``None``
    before its first connection, or for a plain client)."""
    address = getattr(client.connection_pool, "master_address", None)
    return None if address is None else f"{address[0]}:{address[1]}"


def location(settings: Settings) -> str:
    """How error messages and logs name the Redis in use (never with credentials)."""
    scheme = "rediss" if settings.queue_redis_tls else "redis"
    if settings.uses_cluster:
        nodes = ",".join(_host_port(h, p) for h, p in settings.queue_redis_cluster_nodes)
        return f"{scheme}+cluster://{nodes}"
    if settings.uses_sentinel:
        sentinels = ",".join(_host_port(h, p) for h, p in settings.queue_redis_sentinels)
        master = settings.queue_redis_sentinel_master
        return f"{scheme}+sentinel://{sentinels}/{master}/{settings.queue_redis_db}"
    return f"{scheme}://{settings.queue_redis_host}:{settings.queue_redis_port}/{settings.queue_redis_db}"


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    ClusterDownError,
    RedisClusterException,
    RedisTimeoutError,
    OSError,
    asyncio.TimeoutError,
)


def is_connection_error(exc: BaseException) -> bool:
    return isinstance(exc, CONNECTION_ERRORS)


def is_missing_script(result: object) -> bool:
    """``NOSCRIPT`` (an EVALSHA of a script the server does not have), as a plain pipeline
    raises it or as a cluster pipeline reports it; ``result`` may be any pipeline result."""
    if isinstance(result, NoScriptError):
        return True
    if not isinstance(result, ResponseError):
        return False
    text = str(result)
    return "NOSCRIPT" in text.upper() or "no matching script" in text.lower()


def translate(exc: BaseException, settings: Settings, action: str = "talk to") -> QueueError:
    """Turn a redis-py/OS error into Conveyor's exception tree, with a clear one-line message."""
    where = location(settings)
    text = str(exc) or type(exc).__name__
    if isinstance(exc, MasterNotFoundError):
        refused = any(m in text for m in ("Authentication", "WRONGPASS", "NOAUTH", "invalid user"))
        hint = (
            "the sentinels refused the credentials (check QUEUE_REDIS_SENTINEL_USERNAME/"
            "QUEUE_REDIS_SENTINEL_PASSWORD)"
            if refused
            else "no sentinel answered with a healthy master (a failover in progress, or check "
            "QUEUE_REDIS_SENTINELS/QUEUE_REDIS_SENTINEL_MASTER)"
        )
        return QueueUnavailable(f"Redis at {where} is unreachable: {hint}: {text[:500]}")
    if isinstance(exc, AuthenticationError | AuthenticationWrongNumberOfArgsError) or any(
        marker in text for marker in ("WRONGPASS", "NOAUTH", "invalid password", "invalid username")
    ):
        who = (
            f" for user {settings.queue_redis_username!r}" if settings.queue_redis_username else ""
        )
        return QueueUnavailable(
            f"Redis at {where} refused the credentials{who} "
            f"(check QUEUE_REDIS_USERNAME/QUEUE_REDIS_PASSWORD): {text}"
        )
    if isinstance(exc, NoPermissionError):
        return QueueUnavailable(f"Redis at {where} denied a command BullMQ needs (ACL): {text}")
    if isinstance(exc, RedisClusterException) and "not enabled" in text:
        return QueueUnavailable(
            f"Redis at {where} is not a cluster (QUEUE_REDIS_CLUSTER_NODES names a Redis "
            f"without cluster mode: use QUEUE_REDIS_HOST/QUEUE_REDIS_PORT): {text}"
        )
    if isinstance(exc, RedisClusterException) and "cannot be connected" in text:
        return QueueUnavailable(
            f"Redis Cluster at {where} is unreachable: no node of QUEUE_REDIS_CLUSTER_NODES "
            f"answered: {text}"
        )
    if isinstance(exc, ClusterDownError | RedisClusterException):
        return QueueUnavailable(
            f"Redis Cluster at {where} cannot serve a slot now (a failover in progress?): {text}"
        )
    if isinstance(exc, asyncio.TimeoutError | RedisTimeoutError):
        return QueueUnavailable(
            f"Redis at {where} did not answer in time: could not {action} it ({text})"
        )
    if isinstance(exc, RedisConnectionError | OSError):
        hint = " (TLS handshake failed: check QUEUE_REDIS_TLS and the CA)" if "SSL" in text else ""
        return QueueUnavailable(f"Redis at {where} is unreachable{hint}: {text}")
    if isinstance(exc, ResponseError) and text.startswith(
        ("OOM", "READONLY", "LOADING", "MASTERDOWN")
    ):
        return QueueUnavailable(f"Redis at {where} cannot accept writes now: {text}")
    if isinstance(exc, RedisError):
        return QueueError(f"Redis at {where} failed: {text}")
    return QueueError(f"could not {action} Redis at {where}: {exc!r}")


QUEUE_ERRORS: tuple[type[BaseException], ...] = (
    RedisError,
    RedisClusterException,  # not a RedisError: no node reachable, a slot not covered
    OSError,
    asyncio.TimeoutError,
)
"""What a queue operation may raise that :func:`translate` turns into a QueueError."""
