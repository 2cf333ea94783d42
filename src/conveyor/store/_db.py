"""Database URLs, engines and pools.

``DATABASE_URL`` is what operators write (``postgresql://…`` or ``sqlite:///path``); this module
turns it into a SQLAlchemy async engine (asyncpg / aiosqlite) and, on Postgres, the raw asyncpg
pool the engine's hot path uses (:mod:`conveyor.store.pg`).

SQLite is opened in WAL mode with a busy timeout, foreign keys on and ``synchronous=FULL``;
every transaction starts with ``BEGIN IMMEDIATE`` so concurrent writers queue on the busy
timeout instead of failing to upgrade a read lock; single statements run without a
transaction (:func:`autocommit`), so reads never wait for the write lock.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import event
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DisconnectionError
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import StaticPool

from conveyor.settings import Settings
from conveyor.store._errors import is_connection_error
from conveyor.store._types import dumps

log = logging.getLogger(__name__)

__all__ = [
    "asyncpg_dsn",
    "autocommit",
    "create_engine",
    "create_pg_pool",
    "dialect_of",
    "sqlalchemy_url",
    "sqlite_path",
]

SQLITE_BUSY_TIMEOUT_MS = 10000
AUTOCOMMIT_OPTION = "conveyor_autocommit"
"""SQLite execution option: no BEGIN, every statement commits on its own (reads then do not
take the write lock)."""


def autocommit(engine: AsyncEngine) -> AsyncEngine:
    """A view of ``engine`` whose statements each commit on their own (one statement is
    atomic by itself). Postgres: AUTOCOMMIT isolation, no BEGIN/COMMIT round trips."""
    if engine.dialect.name == "postgresql":
        return engine.execution_options(isolation_level="AUTOCOMMIT")
    return engine.execution_options(**{AUTOCOMMIT_OPTION: True})


def dialect_of(database_url: str) -> str:
    """``postgresql`` or ``sqlite``."""
    return "sqlite" if database_url.startswith("sqlite") else "postgresql"


def sqlalchemy_url(database_url: str) -> str:
    """``postgresql://`` → ``postgresql+asyncpg://``; ``sqlite:///p`` → ``sqlite+aiosqlite:///p``."""
    for prefix in ("postgresql+asyncpg://", "postgresql://", "postgres://"):
        if database_url.startswith(prefix):
            return "postgresql+asyncpg://" + database_url[len(prefix) :]
    for prefix in ("sqlite+aiosqlite://", "sqlite://"):
        if database_url.startswith(prefix):
            return "sqlite+aiosqlite://" + database_url[len(prefix) :]
    raise ValueError(f"unsupported database URL scheme: {database_url.split(':', 1)[0]}")


def asyncpg_dsn(database_url: str) -> str:
    """The libpq-style DSN asyncpg accepts."""
    return "postgresql://" + sqlalchemy_url(database_url)[len("postgresql+asyncpg://") :]


def sqlite_path(database_url: str) -> Path | None:
    """The database file of a SQLite URL (``None`` for ``:memory:`` and for Postgres)."""
    if dialect_of(database_url) != "sqlite":
        return None
    rest = sqlalchemy_url(database_url)[len("sqlite+aiosqlite://") :]
    path = rest[1:] if rest.startswith("/") else rest
    path = path.split("?", 1)[0]
    if path in ("", ":memory:"):
        return None
    return Path(path)


def create_engine(settings: Settings, *, pool_size: int | None = None) -> AsyncEngine:
    """The SQLAlchemy async engine for ``settings.database_url`` (no connection is opened)."""
    url = sqlalchemy_url(settings.database_url)
    size = pool_size or settings.database_pool_size
    timeout_s = settings.database_connect_timeout_ms / 1000.0
    if dialect_of(url) == "postgresql":
        pg = create_async_engine(
            url,
            pool_size=size,
            max_overflow=0,
            pool_timeout=30,
            json_serializer=dumps,
            connect_args={"timeout": timeout_s, "command_timeout": 60},
        )
        _discard_broken_connections(pg)
        _replace_closed_connections(pg)
        return pg
    path = sqlite_path(url)
    kwargs: dict[str, Any] = {"json_serializer": dumps}
    if path is None:
        kwargs["poolclass"] = StaticPool
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        kwargs["pool_size"] = size
        kwargs["max_overflow"] = 0
    kwargs["connect_args"] = {"timeout": max(timeout_s, SQLITE_BUSY_TIMEOUT_MS / 1000.0)}
    engine = create_async_engine(url, **kwargs)
    _configure_sqlite(engine)
    return engine


def _replace_closed_connections(engine: AsyncEngine) -> None:
    """A pooled connection whose server side went away while it was idle (a backend killed,
    a server restarted: asyncpg has seen the socket close) is replaced at checkout, not used.

    Instead of SQLAlchemy's ``pool_pre_ping``, which costs every checkout three round trips
    (``BEGIN``, an empty query, ``ROLLBACK``: it starts a transaction for pgbouncer's sake):
    asyncpg's own view of the socket costs none. A connection that dies between the checkout
    and its statement fails that statement, and :func:`_discard_broken_connections` then
    replaces the pool's connections — as it would after a ping that passed a moment too early.
    """

    @event.listens_for(engine.sync_engine, "checkout")
    def _on_checkout(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
        if dbapi_connection.driver_connection.is_closed():
            raise DisconnectionError("the connection was closed while idle in the pool")


def _discard_broken_connections(engine: AsyncEngine) -> None:
    """Treat every connection-level driver error as a disconnect, so SQLAlchemy invalidates the
    connection (and the pool's others, killed alike) instead of handing it out again: asyncpg
    reports a backend killed mid-idle as ``InternalClientError``, which SQLAlchemy does not
    recognise as one."""

    @event.listens_for(engine.sync_engine, "handle_error")
    def _on_error(context: Any) -> None:
        if not context.is_disconnect and is_connection_error(context.original_exception):
            context.is_disconnect = True


def _configure_sqlite(engine: AsyncEngine) -> None:
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Take over transaction control from the driver: see _on_begin.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=FULL")
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if not conn.get_execution_options().get(AUTOCOMMIT_OPTION):
            conn.exec_driver_sql("BEGIN IMMEDIATE")


async def _no_reset(_connection: Any) -> None:
    """Release without a round trip (asyncpg still rolls back a transaction left open)."""
    return None


async def create_pg_pool(settings: Settings, *, pool_size: int | None = None) -> Any:
    """The raw asyncpg pool used by the engine's hot path (connections open on demand)."""
    return await asyncpg.create_pool(
        asyncpg_dsn(settings.database_url),
        min_size=0,
        max_size=pool_size or settings.database_pool_size,
        reset=_no_reset,
        timeout=settings.database_connect_timeout_ms / 1000.0,
        # A server-side limit instead of asyncpg's command_timeout: no timer per query.
        server_settings={"statement_timeout": "60000"},
        max_inactive_connection_lifetime=300.0,
    )


async def close_pg_pool(pool: Any, timeout_s: float = 5.0) -> None:
    """Close the pool, giving in-flight queries ``timeout_s`` before terminating them."""
    try:
        await asyncio.wait_for(pool.close(), timeout=timeout_s)
    except TimeoutError:
        log.warning("store.pool_close_timeout", extra={"timeout_s": timeout_s})
        pool.terminate()
