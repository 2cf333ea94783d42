"""Timer dispatchers as subprocesses: each timer fires exactly once, never early, also when one
of two dispatchers is SIGKILLed halfway."""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conveyor.queue import JobContext, QueueFactory, WorkflowExecute
from tests.scheduler._support import (
    base_env,
    migrate,
    processes,
    seed_timers,
    settings_for,
    timer_states,
)

pytestmark = pytest.mark.slow

MODULE = "conveyor.workers.timer_dispatcher"


class Deliveries:
    """A consumer of ``workflow.execute.us`` that records every job it is given."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, float, int]] = []

    async def process(self, payload: WorkflowExecute, ctx: JobContext) -> None:
        self.seen.append((ctx.id, time.time(), ctx.timestamp_ms))


async def test_thousand_timers_two_dispatchers_one_killed(
    settings_env: dict[str, str], redis_prefix: str, fresh_pg_url: str
) -> None:
    env = base_env(settings_env, fresh_pg_url)
    await migrate(env)
    start_at = datetime.now(UTC) + timedelta(seconds=4)
    rng = random.Random(7)
    dues = [start_at + timedelta(seconds=rng.uniform(0, 10)) for _ in range(1000)]
    dues = [d.replace(microsecond=d.microsecond // 1000 * 1000) for d in dues]  # ms precision
    seeded = dict(await seed_timers(env, dues))
    deliveries = Deliveries()
    async with QueueFactory(settings_for(env)) as queues:
        worker = queues.create_worker("workflow.execute.us", deliveries.process, concurrency=50)
        consume = asyncio.create_task(worker.run())
        try:
            with processes() as start:
                procs = [start(MODULE, env, f"timers{i}") for i in range(2)]
                await asyncio.sleep(start_at.timestamp() + 5 - time.time())  # halfway
                procs[0].kill()
                await asyncio.sleep(start_at.timestamp() + 10 + 4 - time.time())
                assert procs[1].terminate(timeout=10) == 0, procs[1].log()[-2000:]
                survivor_log = procs[1].log()
        finally:
            await worker.close(timeout_s=5)
            await asyncio.gather(consume, return_exceptions=True)
    per_id = Counter(job_id for job_id, _at, _ts in deliveries.seen)
    timer_jobs = {f"timer:{tid}" for tid in seeded}
    assert set(per_id) == timer_jobs, "a timer did not fire (or something else was enqueued)"
    assert max(per_id.values()) == 1, "a timer fired twice"
    early: list[Any] = []
    for job_id, delivered, _added_ms in deliveries.seen:
        due = seeded[job_id.removeprefix("timer:")].timestamp()
        if delivered < due:
            early.append((job_id, due, delivered))
    assert not early, f"fired early: {early[:5]}"
    states = await timer_states(env)
    assert {s for s, _f in states.values()} == {"fired"}
    assert "timers.fire_failed" not in survivor_log


async def test_sqlite_dispatchers_elect_one_and_hand_over_on_sigterm(
    settings_env: dict[str, str], redis_prefix: str, tmp_path: Any
) -> None:
    """On SQLite one dispatcher (Redis lock) claims; SIGTERM gives its claims back at once."""
    from tests.scheduler._support import processes_of

    env = base_env(settings_env, f"sqlite:///{tmp_path / 'c.db'}")
    await migrate(env)
    start_at = datetime.now(UTC) + timedelta(seconds=4)
    dues = [start_at + timedelta(milliseconds=20 * i) for i in range(200)]  # over 4 s
    seeded = dict(await seed_timers(env, dues))
    deliveries = Deliveries()
    async with QueueFactory(settings_for(env)) as queues:
        worker = queues.create_worker("workflow.execute.us", deliveries.process, concurrency=10)
        consume = asyncio.create_task(worker.run())
        try:
            with processes() as start:
                procs = [start(MODULE, env, f"timers{i}") for i in range(2)]
                await asyncio.sleep(start_at.timestamp() + 2 - time.time())
                docs = processes_of(redis_prefix, "timers")
                leaders = [d for d in docs if d.get("lockHeld")]
                assert len(docs) == 2 and len(leaders) == 1, docs
                leader = next(p for p in procs if p.pid == leaders[0]["pid"])
                assert leader.terminate(timeout=10) == 0
                await asyncio.sleep(start_at.timestamp() + 4 + 3 - time.time())
                assert "timers.stopped" in leader.log()
        finally:
            await worker.close(timeout_s=5)
            await asyncio.gather(consume, return_exceptions=True)
    per_id = Counter(job_id for job_id, _at, _ts in deliveries.seen)
    assert set(per_id) == {f"timer:{tid}" for tid in seeded}
    assert max(per_id.values()) == 1
    assert all(at >= seeded[j.removeprefix("timer:")].timestamp() for j, at, _ in deliveries.seen)
    # the hand-over left no gap: timers due after the SIGTERM fired within a second or so
    lateness = [at - seeded[j.removeprefix("timer:")].timestamp() for j, at, _ in deliveries.seen]
    assert max(lateness) < 2.0, max(lateness)
