"""Leader election for singleton loops (the scheduler; the timer dispatcher on SQLite).

Two lock strategies behind one :class:`LeaderLock` protocol:

* :class:`PostgresAdvisoryLock` (``preferredStrategy: "postgres"``): a *session* advisory lock
  taken on a dedicated connection. Postgres releases it the moment that session ends, so a
  SIGKILLed leader is replaced as soon as the kernel closes its socket. A termination listener
  notices our own session being killed (``pg_terminate_backend``, server restart) and drops
  leadership immediately; the periodic check also asks ``pg_locks`` whether we still hold it.
* :class:`RedisLock`: ``SET key token NX PX ttl``; renewal and release are Lua scripts that
  act only if the key still holds our token. The holder counts itself leader only until
  ``start of the last successful renewal + ttl`` (monotonic), so it stops acting before the
  key can expire and another process can take it.

:class:`LeaderElection` drives either lock: standbys try every ``poll_s``, the leader renews
every ``renew_s``; ``is_leader`` is what the leader loop checks before each action. Losing
the lock is never fatal: the process goes back to standby. Exactly-once firing does not rest
on the lock (see ``docs/scheduling.md``): the lock keeps the work on one process, the
database's unique constraints make a second believer harmless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from typing import Any, Literal, Protocol

import asyncpg  # type: ignore[import-untyped]
from redis.asyncio import Redis
from redis.exceptions import RedisClusterException, RedisError

from conveyor.dispatch import keys
from conveyor.store import ASYNCPG_CONNECTION_ERRORS

log = logging.getLogger(__name__)

Strategy = Literal["postgres", "redis"]

LOCK_NAMESPACE = 0x43564C4B
"""First key of every Conveyor advisory lock (``pg_locks.classid``)."""

_PG_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, *ASYNCPG_CONNECTION_ERRORS)
"""Any failure of the lock session's query (a session whose backend just died included:
asyncpg's "cannot switch to state …") loses the lock; the process goes back to standby."""
_SESSION_GONE = (OSError, asyncpg.exceptions.AdminShutdownError, *ASYNCPG_CONNECTION_ERRORS)
"""What a check raises on a session whose backend is gone (killed, or the server down)."""


class LeaderLock(Protocol):
    """One process's handle on a named lock."""

    strategy: Strategy
    holder_id: str
    lost: asyncio.Event
    """Set when the lock is found lost (e.g. the Postgres session was terminated)."""

    @property
    def held(self) -> bool:
        """True while this process may act as the holder."""

    async def try_acquire(self) -> bool:
        """Take the lock if free; True if held afterwards. Never raises on outages."""

    async def keep(self) -> bool:
        """Renew/verify the lock; False (and no longer held) if it was lost."""

    async def release(self) -> None:
        """Give the lock up (idempotent, bounded, never raises)."""

    async def current_holder(self) -> str | None:
        """The holder id of whoever holds the lock now, if known."""


def lock_key(name: str) -> int:
    """The second advisory-lock key of ``name``: a stable non-negative 31-bit hash."""
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


class PostgresAdvisoryLock:
    """A session advisory lock on a dedicated asyncpg connection.

    Every use of the connection is serialised (one query at a time on one connection); the
    termination listener is bound to the connection that holds the lock.
    """

    strategy: Strategy = "postgres"

    def __init__(self, dsn: str, name: str, holder_id: str, *, timeout_s: float = 2.0) -> None:
        self.dsn = dsn
        self.name = name
        self.holder_id = holder_id
        self.key = lock_key(name)
        self.timeout_s = timeout_s
        self.lost = asyncio.Event()
        self._conn: asyncpg.Connection | None = None
        self._held = False
        self._op = asyncio.Lock()

    @property
    def held(self) -> bool:
        return self._held and self._conn is not None and not self._conn.is_closed()

    @property
    def application_name(self) -> str:
        return f"conveyor:{self.name}:{self.holder_id}"[:63]

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            conn = await asyncpg.connect(
                self.dsn,
                timeout=self.timeout_s,
                command_timeout=self.timeout_s,
                server_settings={"application_name": self.application_name},
            )
            conn.add_termination_listener(self._on_terminated)
            self._conn = conn
        return self._conn

    def _on_terminated(self, conn: Any) -> None:
        if conn is self._conn and self._held:
            self._held = False
            self.lost.set()
            log.warning("leader.session_terminated", extra={"lock": self.name})

    async def try_acquire(self) -> bool:
        async with self._op:
            if self.held:
                return True
            try:
                conn = await self._connection()
                got = await conn.fetchval(
                    "SELECT pg_try_advisory_lock($1, $2)", LOCK_NAMESPACE, self.key
                )
            except _PG_ERRORS as exc:
                log.warning("leader.acquire_failed", extra={"lock": self.name, "error": repr(exc)})
                self._drop()
                return False
            self._held = bool(got)
            if self._held:
                self.lost.clear()
            return self._held

    async def keep(self) -> bool:
        async with self._op:
            conn = self._conn
            still = 0
            if self.held and conn is not None:
                try:
                    still = await conn.fetchval(
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
                        " AND pid = pg_backend_pid() AND classid = $1 AND objid = $2"
                        " AND objsubid = 2",
                        LOCK_NAMESPACE,
                        self.key,
                    )
                except _PG_ERRORS as exc:
                    # the session was killed: the check may fail on it before asyncpg calls
                    # the termination listener (which then finds the lock already let go)
                    gone = conn.is_closed() or isinstance(exc, _SESSION_GONE)
                    log.warning(
                        "leader.session_terminated" if gone else "leader.check_failed",
                        extra={"lock": self.name, "error": repr(exc)},
                    )
            if still:
                return True
            if self._held:
                self.lost.set()
            self._held = False
            self._drop()  # a new session is opened by the next try_acquire
            return False

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()

    async def release(self) -> None:
        async with self._op:
            conn, held = self._conn, self._held
            self._held = False
            self._conn = None
            if conn is None or conn.is_closed():
                return
            try:
                if held:
                    await asyncio.wait_for(
                        conn.execute("SELECT pg_advisory_unlock($1, $2)", LOCK_NAMESPACE, self.key),
                        self.timeout_s,
                    )
                await asyncio.wait_for(conn.close(), self.timeout_s)
            except _PG_ERRORS:
                conn.terminate()

    async def current_holder(self) -> str | None:
        async with self._op:
            try:
                conn = await self._connection()
                app = await conn.fetchval(
                    "SELECT a.application_name FROM pg_locks l"
                    " JOIN pg_stat_activity a ON a.pid = l.pid"
                    " WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 2"
                    " AND l.database = (SELECT oid FROM pg_database"
                    " WHERE datname = current_database())"
                    " AND l.classid = $1 AND l.objid = $2 LIMIT 1",
                    LOCK_NAMESPACE,
                    self.key,
                )
            except _PG_ERRORS:
                return None
        if not app:
            return None
        return str(app).removeprefix(f"conveyor:{self.name}:")


class RedisLock:
    """``SET NX PX`` with an owner token; renew and release only by the owner (Lua)."""

    strategy: Strategy = "redis"

    def __init__(self, redis: Redis, key: str, holder_id: str, *, ttl_ms: int = 4000) -> None:
        self.redis = redis
        self.key = key
        self.holder_id = holder_id
        self.ttl_ms = ttl_ms
        self.lost = asyncio.Event()
        self._valid_until = 0.0
        self._renew: Any = None
        self._release: Any = None

    @property
    def held(self) -> bool:
        return time.monotonic() < self._valid_until

    def _validity(self, started: float) -> float:
        # stop acting a little before the key can expire on the server
        return started + self.ttl_ms / 1000.0 * 0.9

    async def try_acquire(self) -> bool:
        if self.held:
            return True
        started = time.monotonic()
        try:
            got = await self.redis.set(self.key, self.holder_id, nx=True, px=self.ttl_ms)
        except (RedisError, RedisClusterException, OSError) as exc:
            log.warning("leader.acquire_failed", extra={"lock": self.key, "error": repr(exc)})
            return False
        if got:
            self._valid_until = self._validity(started)
            self.lost.clear()
        return bool(got)

    async def keep(self) -> bool:
        if not self.held:
            self._lose()
            return False
        if self._renew is None:
            self._renew = self.redis.register_script(keys.RENEW_LOCK_SCRIPT)
        started = time.monotonic()
        try:
            ok = await self._renew(keys=[self.key], args=[self.holder_id, self.ttl_ms])
        except (RedisError, RedisClusterException, OSError) as exc:
            log.warning("leader.renew_failed", extra={"lock": self.key, "error": repr(exc)})
            return self.held  # still valid until the deadline; the next renewal may succeed
        if not ok:
            self._lose()
            return False
        self._valid_until = self._validity(started)
        return True

    def _lose(self) -> None:
        if self._valid_until:
            self.lost.set()
        self._valid_until = 0.0

    async def release(self) -> None:
        was = self._valid_until > 0
        self._valid_until = 0.0
        if not was:
            return
        if self._release is None:
            self._release = self.redis.register_script(keys.RELEASE_LOCK_SCRIPT)
        try:
            await asyncio.wait_for(self._release(keys=[self.key], args=[self.holder_id]), 2.0)
        except (RedisError, RedisClusterException, OSError, TimeoutError) as exc:
            log.warning("leader.release_failed", extra={"lock": self.key, "error": repr(exc)})

    async def current_holder(self) -> str | None:
        try:
            value = await self.redis.get(self.key)
        except (RedisError, RedisClusterException, OSError):
            return None
        if value is None:
            return None
        return value.decode() if isinstance(value, bytes) else str(value)


class LeaderElection:
    """Keeps trying to lead; ``is_leader`` says whether this process may act right now."""

    def __init__(self, lock: LeaderLock, *, poll_s: float, renew_s: float) -> None:
        self.lock = lock
        self.poll_s = poll_s
        self.renew_s = renew_s
        self.changed = asyncio.Event()
        """Set whenever leadership is gained or lost (cleared by :meth:`wait_change`)."""
        self.acquisitions = 0
        self.leader_since: float | None = None
        self._was_leader = False

    @property
    def is_leader(self) -> bool:
        return self.lock.held

    async def step(self) -> bool:
        """One election round: renew if leading, else try to take the lock."""
        held = await self.lock.keep() if self._was_leader else await self.lock.try_acquire()
        if held != self._was_leader:
            self._was_leader = held
            self.changed.set()
            if held:
                self.acquisitions += 1
                self.leader_since = time.time()
                log.info("leader.acquired", extra=self._extra())
            else:
                self.leader_since = None
                log.warning("leader.lost", extra=self._extra())
        return held

    def _extra(self) -> dict[str, Any]:
        return {"strategy": self.lock.strategy, "holder": self.lock.holder_id}

    async def run(self) -> None:
        """Election loop until cancelled (spawn it as a supervised task)."""
        while True:
            if await self.step():
                # renew on time, or at once when the lock reports its loss (session killed)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.lock.lost.wait(), timeout=self.renew_s)
            else:
                self.lock.lost.clear()
                await asyncio.sleep(self.poll_s)

    async def wait_change(self, seconds: float) -> None:
        """Sleep until leadership changes or ``seconds`` pass."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.changed.wait(), timeout=seconds)
        self.changed.clear()

    async def release(self) -> None:
        await self.lock.release()
        if self._was_leader:
            self._was_leader = False
            self.leader_since = None
            log.info("leader.released", extra=self._extra())
