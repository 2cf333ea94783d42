"""Leader election: Postgres session advisory lock and Redis owner-token lock (real servers)."""

from __future__ import annotations

import asyncio
import time

import asyncpg  # type: ignore[import-untyped]
import redis.asyncio as aioredis

from conveyor.store import asyncpg_dsn
from conveyor.workers.leader import (
    LeaderElection,
    PostgresAdvisoryLock,
    RedisLock,
)
from tests.conftest import REDIS_HOST, REDIS_PORT


async def test_postgres_lock_is_exclusive_and_released(fresh_pg_url: str) -> None:
    dsn = asyncpg_dsn(fresh_pg_url)
    a = PostgresAdvisoryLock(dsn, "scheduler", "a")
    b = PostgresAdvisoryLock(dsn, "scheduler", "b")
    try:
        assert await a.try_acquire()
        assert not await b.try_acquire()
        assert await a.keep()
        assert await b.current_holder() == "a"
        await a.release()
        assert not a.held
        assert await b.try_acquire()
        assert await a.current_holder() == "b"
    finally:
        await a.release()
        await b.release()


async def test_postgres_lock_lost_when_session_terminated(fresh_pg_url: str) -> None:
    dsn = asyncpg_dsn(fresh_pg_url)
    a = PostgresAdvisoryLock(dsn, "scheduler", "a")
    b = PostgresAdvisoryLock(dsn, "scheduler", "b")
    election = LeaderElection(a, poll_s=0.05, renew_s=5.0)
    task = asyncio.create_task(election.run())
    admin = await asyncpg.connect(dsn)
    try:
        deadline = time.monotonic() + 5
        while not election.is_leader:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        pid = await admin.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1", a.application_name
        )
        assert pid
        await admin.execute("SELECT pg_terminate_backend($1)", pid)
        # the termination listener drops leadership at once, without waiting for a renewal
        deadline = time.monotonic() + 1.0
        while a.held:
            assert time.monotonic() < deadline, "still believes it leads"
            await asyncio.sleep(0.01)
        assert await b.try_acquire()
        await asyncio.sleep(0.3)
        assert not election.is_leader  # reconnected but the lock is b's now
        await b.release()
        deadline = time.monotonic() + 5
        while not election.is_leader:  # and it takes over once b lets go
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
        assert election.acquisitions == 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await election.release()
        await b.release()
        await admin.close()


async def test_postgres_lock_checked_at_the_moment_its_session_dies_is_lost_not_fatal(
    fresh_pg_url: str,
) -> None:
    """A check sent just as the backend is terminated (before the connection noticed) gets
    asyncpg's ``InternalClientError`` ("cannot switch to state …"): the lock is lost, the
    process goes on (it was a dead election loop and a scheduler exit)."""
    dsn = asyncpg_dsn(fresh_pg_url)
    a = PostgresAdvisoryLock(dsn, "scheduler", "a")
    admin = await asyncpg.connect(dsn)
    try:
        assert await a.try_acquire()
        assert a._conn is not None
        await admin.execute("SELECT pg_terminate_backend($1)", a._conn.get_server_pid())
        assert await a.keep() is False  # at once: the termination not yet read
        assert not a.held and a.lost.is_set()
        assert await a.try_acquire()  # a new session takes the lock again
    finally:
        await a.release()
        await admin.close()


async def test_redis_lock_owner_checks(redis_prefix: str) -> None:
    client = aioredis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    key = f"{redis_prefix}:conveyor:scheduler:leader"
    a = RedisLock(client, key, "a", ttl_ms=600)
    b = RedisLock(client, key, "b", ttl_ms=600)
    try:
        assert await a.try_acquire()
        assert not await b.try_acquire()
        assert await a.keep()
        assert await b.current_holder() == "a"
        # b can neither renew nor release a's lock
        assert not await b.keep()
        await b.release()
        assert await client.get(key) == b"a"
        # a stops believing before the key can expire
        await asyncio.sleep(0.6)
        assert not a.held
        assert await b.try_acquire()
        assert not await a.keep()  # a's renewal must not steal b's lock
        assert await client.get(key) == b"b"
        await a.release()
        assert await client.get(key) == b"b"
        await b.release()
        assert await client.get(key) is None
    finally:
        await client.aclose()


async def test_election_renews_redis_lock(redis_prefix: str) -> None:
    client = aioredis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    key = f"{redis_prefix}:conveyor:scheduler:leader"
    lock = RedisLock(client, key, "a", ttl_ms=400)
    election = LeaderElection(lock, poll_s=0.05, renew_s=0.1)
    task = asyncio.create_task(election.run())
    try:
        await asyncio.sleep(1.0)  # well past the ttl: renewals keep it
        assert election.is_leader and election.acquisitions == 1
        assert await client.get(key) == b"a"
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await election.release()
        assert await client.get(key) is None
        await client.aclose()
