"""Scheduler failover: time from SIGKILL of the leading scheduler to the first tick recorded by
the new leader; and whether any tick was lost or fired twice.

Two ``conveyor scheduler`` processes (default settings) run a per-second schedule against a
fresh Postgres database. Each round SIGKILLs the current leader at a random instant, records
when the first tick row was written after the kill (the ticks of the look-ahead window,
``SCHEDULER_LOOKAHEAD_MS``, were recorded and staged by the old leader: they run on time
whatever the failover takes, as long as it is shorter than the window), then starts a
replacement standby. Both
lock strategies run in the same invocation: the Postgres session advisory lock (the preferred
strategy on Postgres, released by the server when the session dies) and, as the baseline, the
Redis lock (``SCHEDULER_LOCK_STRATEGY=redis``: a SIGKILLed owner's key must expire first,
``SCHEDULER_LOCK_TTL_MS``). Afterwards the recorded ticks must be every second, each once, each
with its one execution. Creates and drops its own databases and deletes its Redis keys.

    .venv/bin/python bench/scheduler_failover.py [--rounds 3]

Last line: JSON with ``failover_s`` (Postgres strategy, worst round), ``lost``,
``duplicated`` (both strategies), plus ``redis_failover_s``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from sqlalchemy import func, select

from _procs import Procs, holder_pid, pg_leader_pid
from conveyor.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
ADMIN_DSN = os.environ.get("TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
SECOND = timedelta(seconds=1)
SCHEDULER = "conveyor.workers.scheduler"


async def leader_pid(settings: Settings, admin: asyncpg.Connection, db: str) -> int | None:
    """The pid of the lock holder (``scheduler-<host>-<pid>-<rand>``), either strategy."""
    if settings.scheduler_lock_strategy != "redis":
        return await pg_leader_pid(admin, db)
    client = aioredis.Redis(host=settings.queue_redis_host, port=settings.queue_redis_port)
    try:
        value = await client.get(f"{settings.queue_prefix}:conveyor:scheduler:leader")
    finally:
        await client.aclose()
    return holder_pid(value.decode() if value else None)


async def wait_holder(settings: Settings, admin: asyncpg.Connection, db: str,
                      not_pid: int | None = None) -> tuple[int, float]:  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        pid = await leader_pid(settings, admin, db)
        if pid is not None and pid != not_pid:
            return pid, time.time()
        await asyncio.sleep(0.02)
    raise RuntimeError("no scheduler took the lock")


async def ticks(settings: Settings) -> tuple[list[Any], int]:
    """All recorded ``(fire_time, created_at)`` and the number of scheduled executions."""
    from conveyor.store import Store
    from conveyor.store.schema import executions, schedule_ticks

    async with Store(settings, pool_size=1) as store, store.engine.connect() as conn:
        rows = (await conn.execute(
            select(schedule_ticks.c.fire_time, schedule_ticks.c.created_at)
            .order_by(schedule_ticks.c.fire_time))).all()  # fmt: skip
        runs = (await conn.execute(
            select(func.count()).select_from(executions)
            .where(executions.c.schedule_id.is_not(None)))).scalar_one()  # fmt: skip
    return [tuple(r) for r in rows], int(runs)


async def scenario(strategy: str, rounds: int, admin: asyncpg.Connection) -> dict[str, Any]:
    from conveyor.store import Store, migrate

    db = f"conveyor_bench_{uuid.uuid4().hex[:10]}"
    prefix = f"benchsf{uuid.uuid4().hex[:8]}"
    await admin.execute(f'CREATE DATABASE "{db}"')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QUEUE_", "SCHEDULER_"))}
    env.update(DATABASE_URL=ADMIN_DSN.rsplit("/", 1)[0] + "/" + db, QUEUE_PREFIX=prefix,
               LOG_FORMAT="json", SCHEDULER_LOCK_STRATEGY=strategy,
               PYTHONPATH=str(ROOT / "src"))  # fmt: skip
    settings = load_settings(env)
    logdir = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    group = Procs(env, logdir)
    rng = random.Random(strategy)
    failovers: list[float] = []
    try:
        await migrate(settings)
        async with Store(settings, pool_size=1) as store:
            tenant = await store.tenants.create("bench")
            wf = await store.workflows.create(tenant.id, {"name": "t", "steps": [
                {"id": "n", "type": "noop"}]})  # fmt: skip
            await store.schedules.create(tenant.id, wf.id, "* * * * * *")
        group.start(SCHEDULER)
        group.start(SCHEDULER)
        leader, _at = await wait_holder(settings, admin, db)
        for _ in range(rounds):
            await asyncio.sleep(2.0 + rng.random())
            killed_at = time.time()
            group.kill(leader)
            leader, _took = await wait_holder(settings, admin, db, not_pid=leader)
            recorded, _runs = await ticks(settings)
            while not any(c.timestamp() > killed_at for _f, c in recorded):
                await asyncio.sleep(0.05)
                recorded, _runs = await ticks(settings)
            first = min(c.timestamp() for _f, c in recorded if c.timestamp() > killed_at)
            failovers.append(first - killed_at)
            group.start(SCHEDULER)  # a new standby for the next round
        await asyncio.sleep(2.0)
    finally:
        group.stop_all()
        recorded, runs = await ticks(settings)
        client = aioredis.Redis(host=settings.queue_redis_host, port=settings.queue_redis_port)
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()
        await admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    fire_times = [f for f, _c in recorded]
    span = int((fire_times[-1] - fire_times[0]).total_seconds()) + 1
    lost = span - len(set(fire_times))
    duplicated = (len(fire_times) - len(set(fire_times))) + max(0, runs - len(fire_times))
    return {"failovers": failovers, "lost": lost, "duplicated": duplicated,
            "ticks": len(fire_times)}  # fmt: skip


def line(name: str, r: dict[str, Any]) -> str:
    f = r["failovers"]
    return (f"{name:>28}: failover median {sorted(f)[len(f) // 2]:.2f} s, max {max(f):.2f} s "
            f"over {len(f)} kills; ticks {r['ticks']}, lost {r['lost']}, "
            f"duplicated {r['duplicated']}")  # fmt: skip


async def run(rounds: int) -> dict[str, Any]:
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        pg = await scenario("postgres", rounds, admin)
        rd = await scenario("redis", rounds, admin)
    finally:
        await admin.close()
    print("per-second schedule, 2 schedulers, SIGKILL of the leader; failover = kill -> first")
    print("tick due after the kill written by the new leader (includes waiting for its instant)")
    print(line("postgres advisory lock", pg))
    print(line("redis lock (baseline, TTL)", rd))
    print(f"ratio redis/postgres (max) = {max(rd['failovers']) / max(pg['failovers']):.1f}x")
    return {
        "failover_s": round(max(pg["failovers"]), 3),
        "lost": pg["lost"] + rd["lost"],
        "duplicated": pg["duplicated"] + rd["duplicated"],
        "redis_failover_s": round(max(rd["failovers"]), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args.rounds))))


if __name__ == "__main__":
    main()
