"""Warm fleet slots: the fleet slot of a run that ended passes to the tenant's next run in the
same process without a Redis round trip, the cap still holds fleet-wide, a start rate or a
lowered cap goes through the acquire script, and an unused slot is given back (popping the
parked jobs) after ``WARM_SLOT_S``. In-process runners, real Postgres and Redis."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from conveyor.dispatch import FairnessLedger, TenantLimiter, keys
from conveyor.engine import Engine
from conveyor.queue import JobDeferred
from conveyor.settings import Settings
from conveyor.store import TenantLimits
from conveyor.workers import runner as runner_mod
from conveyor.workers.limits import ConcurrencyLimits, TenantLimitsBook
from conveyor.workers.runner import WARM_SLOT_S, ExecutionRunner
from tests.worker.conftest import Seeder, seeder
from tests.worker.test_runner import QUEUE, job

NOOP = [{"id": "n", "type": "noop"}]


class Counting:
    """Counts the acquire scripts a limiter sends."""

    def __init__(self, fleet: TenantLimiter) -> None:
        self.acquires: list[tuple[str, str | None]] = []
        inner = fleet.acquire

        async def acquire(tenant: str, job_id: str, *args: Any, **kw: Any) -> Any:
            self.acquires.append((job_id, kw.get("replaces")))
            return await inner(tenant, job_id, *args, **kw)

        fleet.acquire = acquire  # type: ignore[method-assign]


@asynccontextmanager
async def fleet_runners(
    settings: Settings, n: int = 1, overrides: list[TenantLimits] | None = None
) -> AsyncIterator[tuple[list[ExecutionRunner], Seeder]]:
    """``n`` runners sharing Redis (as ``n`` worker processes would), each with its limiter."""
    rows = overrides if overrides is not None else []

    async def load() -> list[TenantLimits]:
        return list(rows)

    async with seeder(settings) as s, Engine(s.store, settings, lease_ttl_s=5) as engine:
        runners = []
        for _ in range(n):
            book = TenantLimitsBook(settings, load)
            await book.refresh()
            runners.append(
                ExecutionRunner(
                    engine,
                    ConcurrencyLimits(8, 8),
                    FairnessLedger(s.queues, settings, [QUEUE]),
                    s.queues.create_queue,
                    fleet=TenantLimiter(s.queues.redis, settings.queue_prefix, lease_ttl_ms=5_000),
                    book=book,
                )
            )
        yield runners, s


async def leases(s: Seeder, tenant: str) -> list[str]:
    members = await s.queues.redis.zrange(keys.limit_leases(s.settings.queue_prefix, tenant), 0, -1)
    return sorted(m.decode() if isinstance(m, bytes) else str(m) for m in members)


async def executions(s: Seeder, tenant: str, n: int) -> list[str]:
    wf = await s.workflow(tenant, NOOP)
    return await s.executions(tenant, wf, [None] * n, dispatch=False)


def held(gate: asyncio.Event, engine: Any) -> Any:
    class Held:
        async def run(self, execution_id: str, *, abandon: asyncio.Event | None = None) -> Any:
            await gate.wait()
            return await engine.run(execution_id, abandon=abandon)

    return Held()


async def test_the_next_run_takes_the_ended_runs_slot_without_a_round_trip(
    wsettings: Settings,
) -> None:
    async with fleet_runners(wsettings.model_copy(update={"execution_tenant_concurrency": 2})) as (
        (runner,),
        s,
    ):
        assert runner.fleet is not None
        counting = Counting(runner.fleet)
        t = await s.tenant()
        ids = await executions(s, t, 3)
        assert (await runner.process(*job(ids[0], t)))["status"] == "succeeded"
        assert counting.acquires == [(ids[0], None)]
        assert runner.warm_slots == 1
        assert await leases(s, t) == [ids[0]]  # kept, not given back yet

        # the next two runs: the first takes the warm slot (no script), the second acquires
        gate = asyncio.Event()
        engine = runner._engine
        runner._engine = held(gate, engine)
        second = asyncio.create_task(runner.process(*job(ids[1], t)))
        third = asyncio.create_task(runner.process(*job(ids[2], t)))
        await asyncio.sleep(0.05)
        assert counting.acquires == [(ids[0], None), (ids[2], None)]
        assert runner.counters.slots_reused == 1
        # two running, two leases: the warm one (named after the run that took it) and ids[2]
        assert await leases(s, t) == sorted([ids[0], ids[2]])
        assert runner.warm_slots == 0
        gate.set()
        assert (await second)["status"] == "succeeded"
        assert (await third)["status"] == "succeeded"
        assert runner.warm_slots == 2

        # nobody takes them: given back once WARM_SLOT_S has passed, not before
        assert await runner.flush_releases(due_only=True) == 0
        await asyncio.sleep(WARM_SLOT_S + 0.01)
        assert await runner.flush_releases(due_only=True) == 2
        assert await leases(s, t) == []
        assert runner.fleet.held == {}


async def test_the_cap_holds_across_processes_and_a_warm_slot_frees_for_a_parked_job(
    wsettings: Settings,
) -> None:
    async with fleet_runners(
        wsettings.model_copy(update={"execution_tenant_concurrency": 1}), n=2
    ) as (
        (a, b),
        s,
    ):
        t = await s.tenant()
        ids = await executions(s, t, 3)
        assert (await a.process(*job(ids[0], t)))["status"] == "succeeded"
        assert a.warm_slots == 1
        # the warm slot counts against the cap: another process's run of the tenant is parked
        with pytest.raises(JobDeferred) as deferred:
            await b.process(*job(ids[1], t))
        assert deferred.value.parked
        assert "across all workers" in str(deferred.value.reason)
        # ... and when a's slot is given back, the parked job is popped for promotion
        await asyncio.sleep(WARM_SLOT_S + 0.01)
        assert await a.flush_releases(due_only=True) == 1
        assert a._fleet_promotions.get_nowait() == (t, QUEUE, ids[1])
        assert await leases(s, t) == []
        # a run in a that takes a warm slot is still one of the tenant's 1
        assert (await a.process(*job(ids[2], t)))["status"] == "succeeded"
        with pytest.raises(JobDeferred):
            await b.process(*job(ids[1], t))


@pytest.mark.parametrize(
    ("update", "override"),
    [
        pytest.param({"execution_tenant_start_rate": 1000.0}, None, id="start-rate"),
        pytest.param({}, TenantLimits(tenant_id="", concurrency=1), id="cap-lowered"),
        pytest.param({}, TenantLimits(tenant_id="", start_rate=1000.0), id="start-rate-set"),
    ],
)
async def test_a_start_rate_or_a_lowered_cap_goes_through_the_acquire_script(
    wsettings: Settings, update: dict[str, Any], override: TenantLimits | None
) -> None:
    rows: list[TenantLimits] = []
    settings = wsettings.model_copy(update={"execution_tenant_concurrency": 2, **update})
    async with fleet_runners(settings, overrides=rows) as ((runner,), s):
        assert runner.fleet is not None and runner.book is not None
        counting = Counting(runner.fleet)
        t = await s.tenant()
        ids = await executions(s, t, 2)
        assert (await runner.process(*job(ids[0], t)))["status"] == "succeeded"
        if override is not None:  # the limits changed since the slot was taken (a PUT)
            rows.append(dataclasses.replace(override, tenant_id=t))
            await runner.book.refresh()
        assert (await runner.process(*job(ids[1], t)))["status"] == "succeeded"
        # the ended run's lease is handed to the script (dropped there), not reused here
        assert counting.acquires == [(ids[0], None), (ids[1], ids[0])]
        assert runner.counters.slots_reused == 0
        assert ids[0] not in runner.fleet.held
        await runner.flush_releases()
        assert await leases(s, t) == []


async def test_a_lease_found_expired_is_not_kept_warm(wsettings: Settings) -> None:
    async with fleet_runners(wsettings) as ((runner,), s):
        t = await s.tenant()
        (eid,) = await executions(s, t, 1)
        assert (await runner.process(*job(eid, t)))["status"] == "succeeded"
        assert runner.warm_slots == 1
        runner.cool([eid])  # what run_fleet does with the leases its renewal found expired
        assert runner.warm_slots == 0
        assert await runner.flush_releases(due_only=True) == 1
        assert await leases(s, t) == []


async def test_run_releases_gives_warm_slots_back_after_their_time(wsettings: Settings) -> None:
    async with fleet_runners(wsettings) as ((runner,), s):
        t = await s.tenant()
        ids = await executions(s, t, 1)
        task = asyncio.create_task(runner.run_releases())
        try:
            assert (await runner.process(*job(ids[0], t)))["status"] == "succeeded"
            await asyncio.sleep(runner_mod.RELEASE_LINGER_S * 3)
            assert await leases(s, t) == ids  # still warm
            await _eventually(lambda: leases(s, t), [], within=WARM_SLOT_S + 1.0)
        finally:
            task.cancel()


async def _eventually(
    read: Callable[[], Awaitable[object]], expected: object, within: float
) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while (got := await read()) != expected:
        assert asyncio.get_running_loop().time() < deadline, got
        await asyncio.sleep(0.005)
