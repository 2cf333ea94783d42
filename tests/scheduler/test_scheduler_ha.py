"""Schedulers as subprocesses on real Postgres/Redis: one leads, each tick fires once, failover.

A per-second schedule (six fields, seconds first) gives a run of ticks in a few seconds. Leaders
are found through the heartbeat registry; kills are SIGKILL (no clean-up runs).
"""

from __future__ import annotations

import asyncio
import itertools
import time
from datetime import timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest

from tests.scheduler._support import (
    async_wait_until,
    base_env,
    executions_of,
    leader_of,
    migrate,
    processes,
    seed_schedule,
    ticks_of,
)

pytestmark = pytest.mark.slow

MODULE = "conveyor.workers.scheduler"
SECOND = timedelta(seconds=1)


def assert_each_tick_once(ticks: list[tuple[Any, ...]], executions: list[str]) -> None:
    fire_times = [t[0] for t in ticks]
    gaps = [b - a for a, b in itertools.pairwise(fire_times)]
    assert gaps and set(gaps) == {SECOND}, f"lost or doubled ticks: {fire_times}"
    # one execution per tick, no other execution of the schedule
    assert sorted(executions) == sorted(t[2] for t in ticks)


def first_tick_after(ticks: list[tuple[Any, ...]], instant: float) -> float:
    """Seconds from ``instant`` to the recording of the first tick due after it."""
    created = min(c.timestamp() for f, c, _e in ticks if f.timestamp() > instant)
    return float(created - instant)


async def failover_run(env: dict[str, str], prefix: str, count: int) -> dict[str, float]:
    await migrate(env)
    _tenant, sid = await seed_schedule(env, "* * * * * *")
    out: dict[str, float] = {}
    with processes() as start:
        procs = [start(MODULE, env, f"scheduler{i}") for i in range(count)]
        leader = await async_wait_until(lambda: leader_of(prefix), 30)
        await asyncio.sleep(2.5)
        victim = next(p for p in procs if p.pid == leader["pid"])
        killed_at = time.time()
        victim.kill()
        new = await async_wait_until(
            lambda: (d := leader_of(prefix)) is not None and d["pid"] != victim.pid and d, 10
        )
        out["takeover_s"] = time.time() - killed_at
        await asyncio.sleep(2.5)
        survivor = next(p for p in procs if p.pid == new["pid"])
        if count >= 3:  # SIGTERM: exit 0 promptly, the lock is released, a standby leads at once
            termed_at = time.time()
            assert survivor.terminate(timeout=10) == 0
            out["sigterm_exit_s"] = time.time() - termed_at
            third = await async_wait_until(
                lambda: (d := leader_of(prefix)) is not None and d["pid"] not in
                (victim.pid, survivor.pid) and d, 5,
            )  # fmt: skip
            out["handover_s"] = time.time() - termed_at
            assert third
            await asyncio.sleep(2.0)
        for p in procs:
            if p.alive():
                assert p.terminate(timeout=10) == 0, p.log()[-2000:]
    ticks = await ticks_of(env, sid)
    assert_each_tick_once(ticks, await executions_of(env, sid))
    out["failover_s"] = first_tick_after(ticks, killed_at)
    out["ticks"] = len(ticks)
    return out


async def test_three_schedulers_postgres_sigkill_and_sigterm(
    settings_env: dict[str, str], redis_prefix: str, fresh_pg_url: str
) -> None:
    env = base_env(settings_env, fresh_pg_url)
    got = await failover_run(env, redis_prefix, 3)
    # the session lock dies with the process: a standby leads within a poll or two
    assert got["failover_s"] < 3.0, got
    assert got["sigterm_exit_s"] < 5.0 and got["handover_s"] < 2.0, got
    assert got["ticks"] >= 7


async def test_two_schedulers_redis_lock_on_sqlite(
    settings_env: dict[str, str], redis_prefix: str, tmp_path: Path
) -> None:
    env = base_env(settings_env, f"sqlite:///{tmp_path / 'c.db'}")
    got = await failover_run(env, redis_prefix, 2)
    # the Redis lock of a SIGKILLed leader expires after SCHEDULER_LOCK_TTL_MS (1.5 s here)
    assert got["failover_s"] < 4.0, got
    assert got["ticks"] >= 5


async def test_terminated_postgres_session_stops_the_leader(
    settings_env: dict[str, str], redis_prefix: str, fresh_pg_url: str
) -> None:
    env = base_env(settings_env, fresh_pg_url)
    await migrate(env)
    _tenant, sid = await seed_schedule(env, "* * * * * *")
    admin = await asyncpg.connect(fresh_pg_url)
    try:
        with processes() as start:
            procs = [start(MODULE, env, f"scheduler{i}") for i in range(2)]
            leader = await async_wait_until(lambda: leader_of(redis_prefix), 30)
            await asyncio.sleep(1.5)
            victim = next(p for p in procs if p.pid == leader["pid"])
            pid = await admin.fetchval(
                "SELECT pid FROM pg_stat_activity WHERE application_name LIKE $1",
                f"conveyor:scheduler:%-{victim.pid}-%",
            )
            assert pid, "the leader's lock session is not visible"
            await admin.execute("SELECT pg_terminate_backend($1)", pid)
            await async_wait_until(lambda: "leader.session_terminated" in victim.log(), 3)
            assert victim.alive()  # a lost lock is not fatal: it goes back to standby
            # exactly one process leads afterwards (whichever won the lock)
            await async_wait_until(lambda: leader_of(redis_prefix), 5)
            await asyncio.sleep(2.0)
            for p in procs:
                assert p.terminate(timeout=10) == 0
            log = victim.log()
            lost_at = log.index("leader.lost")
            assert lost_at > log.index("leader.acquired")
    finally:
        await admin.close()
    ticks = await ticks_of(env, sid)
    assert_each_tick_once(ticks, await executions_of(env, sid))


async def test_misfire_after_long_downtime_fires_once_or_skips(
    settings_env: dict[str, str], tmp_path: Path
) -> None:
    """Ticks missed for an hour: ``fire_once`` runs one (the latest), ``skip`` none; no burst."""
    from sqlalchemy import update

    from conveyor.store import Store
    from conveyor.store.schema import schedules
    from tests.scheduler._support import settings_for

    env = base_env(settings_env, f"sqlite:///{tmp_path / 'c.db'}")
    await migrate(env)
    _t, once = await seed_schedule(env, "*/10 * * * * *", misfire_policy="fire_once")
    _t, skip = await seed_schedule(env, "*/10 * * * * *", misfire_policy="skip")
    down_since = (time.time() // 10) * 10 - 3600  # the scheduler was down for an hour
    async with Store(settings_for(env), pool_size=1) as store, store.engine.begin() as conn:
        from datetime import UTC, datetime

        await conn.execute(update(schedules).values(
            next_fire_at=datetime.fromtimestamp(down_since, UTC)))  # fmt: skip
    with processes() as start:
        proc = start(MODULE, env, "scheduler")
        await async_wait_until(lambda: "scheduler.misfire" in proc.log(), 30)
        started = time.time()
        await asyncio.sleep(1.0)
        assert proc.terminate(timeout=10) == 0
        log = proc.log()
    once_ticks = await ticks_of(env, once)
    fired_once = [t for t in once_ticks if t[2] is not None]
    # the latest missed tick, then only regular ticks recorded ahead (the window moves on while
    # the test waits): one every 10 s, never a burst of the missed ones
    assert fired_once and fired_once[0][0].timestamp() > started - 12, fired_once  # not oldest
    gaps = {(b[0] - a[0]).total_seconds() for a, b in pairwise(fired_once)}
    assert gaps <= {10.0}, fired_once
    assert fired_once[-1][0].timestamp() <= time.time() + 11  # only within the look-ahead window
    # every missed tick is recorded (without an execution): nothing is lost silently
    missed = [t for t in once_ticks if t[2] is None]
    assert [t[0].timestamp() for t in missed] == [down_since + 10 * i for i in range(len(missed))]
    assert missed[-1][0] + 10 * SECOND == fired_once[0][0] and len(missed) >= 359
    skip_ticks = await ticks_of(env, skip)
    assert all(f.timestamp() > started - 12 for f, _c, e in skip_ticks if e is not None)
    skipped = [t[0].timestamp() for t in skip_ticks if t[2] is None]
    assert skipped == [down_since + 10 * i for i in range(len(skipped))] and len(skipped) >= 360
    assert log.count("scheduler.misfire") == 2
