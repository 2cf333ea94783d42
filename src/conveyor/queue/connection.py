"""Redis clients configured for production, and translation of Redis errors.

BullMQ's default client has no socket timeout and retries for minutes (a hard-coded
20-try exponential ``retry`` when given connection *options*), so Conveyor always hands
BullMQ a ready :class:`redis.asyncio.Redis` built here:

* connect and read timeouts, TCP keepalive probing every couple of seconds and
  ``TCP_USER_TIMEOUT`` so a half-open connection is noticed in seconds;
* a health check (PING) on connections idle for a while;
* a short, bounded retry so a blip is absorbed but an outage is reported quickly;
* ``decode_responses=True`` (BullMQ needs it), credentials, db and TLS from the settings.

Roles: ``command`` (every non-blocking call), ``blocking`` (the worker's BZPOPMIN, which
blocks up to 10 s, so its read timeout is longer), ``events`` (QueueEvents' XREAD BLOCK)
and ``probe`` (readiness/health: one try, the caller bounds the time).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.exceptions import (
    AuthenticationError,
    AuthenticationWrongNumberOfArgsError,
    NoPermissionError,
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


def tls_kwargs(settings: Settings) -> dict[str, Any]:
    if not settings.queue_redis_tls:
        return {}
    kwargs: dict[str, Any] = {"ssl": True, "ssl_min_version": ssl.TLSVersion.TLSv1_2}
    if settings.queue_redis_tls_ca_file:
        kwargs["ssl_ca_certs"] = settings.queue_redis_tls_ca_file
    if settings.queue_redis_tls_insecure:
        kwargs["ssl_cert_reqs"] = "none"
        kwargs["ssl_check_hostname"] = False
    return kwargs


def make_client(settings: Settings, role: ClientRole = "command") -> aioredis.Redis:
    """A Redis client for ``role``; creating it does no I/O."""
    password = settings.queue_redis_password
    return aioredis.Redis(
        host=settings.queue_redis_host,
        port=settings.queue_redis_port,
        db=settings.queue_redis_db,
        username=settings.queue_redis_username,
        password=password.get_secret_value() if password is not None else None,
        socket_connect_timeout=settings.queue_redis_connect_timeout_ms / 1000.0,
        socket_timeout=_socket_timeout(settings, role),
        socket_keepalive=True,
        socket_keepalive_options=keepalive_options(),
        health_check_interval=0 if role == "probe" else HEALTH_CHECK_INTERVAL_S,
        retry=_retry(role),
        decode_responses=True,
        **tls_kwargs(settings),
    )


def location(settings: Settings) -> str:
    scheme = "rediss" if settings.queue_redis_tls else "redis"
    return f"{scheme}://{settings.queue_redis_host}:{settings.queue_redis_port}/{settings.queue_redis_db}"


CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    asyncio.TimeoutError,
)


def is_connection_error(exc: BaseException) -> bool:
    return isinstance(exc, CONNECTION_ERRORS)


def translate(exc: BaseException, settings: Settings, action: str = "talk to") -> QueueError:
    """Turn a redis-py/OS error into Conveyor's exception tree, with a clear one-line message."""
    where = location(settings)
    text = str(exc) or type(exc).__name__
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


QUEUE_ERRORS: tuple[type[BaseException], ...] = (RedisError, OSError, asyncio.TimeoutError)
"""What a queue operation may raise that :func:`translate` turns into a QueueError."""
