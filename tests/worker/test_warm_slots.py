"""Warm fleet slots: the fleet slot of a run that ended passes to the tenant's next run in the
same process without a Redis round trip, the cap still holds fleet-wide (also when a job comes
back while its old slot runs another job), a start rate, a lowered cap, a lease found expired,
a job parked before or a slot passed on long enough go through the acquire script, and an
unused slot is given back (popping the parked jobs) after ``WARM_SLOT_S``. In-process
runners, real Postgres and Redis."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, cast

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from conveyor.dispatch import FairnessLedger, TenantLimiter, keys
from conveyor.dispatch.limits import parked_member
from conveyor.engine import Engine
from conveyor.queue import JobContext, JobDeferred, Queue, WorkflowExecute
from conveyor.settings import Settings
from conveyor.store import TenantLimits
from conveyor.workers import runner as runner_mod
from conveyor.workers.limits import ConcurrencyLimits, TenantLimitsBook
from conveyor.workers.runner import ExecutionRunner
from tests.helpers import redis_server
from tests.worker._support import Gate
from tests.worker.conftest import Seeder, seeder
from tests.worker.test_runner import QUEUE, job

NOOP = [{"id": "n", "type": "noop"}]
WARM_S = 0.5
"""The warm time in these tests (long enough for a slow CI between two steps of a test)."""


@pytest.fixture(autouse=True)
def warm_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner_mod, "WARM_SLOT_S", WARM_S)


class Counting:
    """Records the acquire scripts a limiter sends (then sends them): (job id, the lease it
    replaces)."""

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


def capped(settings: Settings, cap: int, **update: Any) -> Settings:
    return settings.model_copy(update={"execution_tenant_concurrency": cap, **update})


async def leases(s: Seeder, tenant: str) -> list[str]:
    """The tenant's lease members in Redis, each as the job id of the run that took it."""
    members = await s.queues.redis.zrange(keys.limit_leases(s.settings.queue_prefix, tenant), 0, -1)
    names = (m.decode() if isinstance(m, bytes) else str(m) for m in members)
    return sorted(name.split("@")[0] for name in names)


async def executions(s: Seeder, tenant: str, n: int) -> list[str]:
    wf = await s.workflow(tenant, NOOP)
    return await s.executions(tenant, wf, [None] * n, dispatch=False)


async def first_run(runner: ExecutionRunner, s: Seeder, n: int) -> tuple[Counting, str, list[str]]:
    """A tenant with ``n`` executions, the first of them run (its slot now warm); the acquires
    counted from the start."""
    assert runner.fleet is not None
    counting = Counting(runner.fleet)
    t = await s.tenant()
    ids = await executions(s, t, n)
    assert (await runner.process(*job(ids[0], t)))["status"] == "succeeded"
    return counting, t, ids


def parked_job(execution_id: str, tenant: str) -> tuple[WorkflowExecute, JobContext]:
    """A job whose data says it was parked by a limit before."""
    payload, ctx = job(execution_id, tenant)
    return payload, JobContext(ctx.id, ctx.name, ctx.queue_name, 0, ctx.timestamp_ms, parked=True)


async def test_the_next_run_takes_the_ended_runs_slot_without_a_round_trip(
    wsettings: Settings,
) -> None:
    async with fleet_runners(capped(wsettings, 2)) as ((runner,), s):
        assert runner.fleet is not None
        counting, t, ids = await first_run(runner, s, 3)
        assert counting.acquires == [(ids[0], None)]
        assert runner.warm_slots == 1
        assert await leases(s, t) == [ids[0]]  # kept, not given back yet
        assert await runner.flush_releases(due_only=True) == 0  # not due yet

        # the next two runs: the first takes the warm slot (no script), the second acquires
        gate = Gate(runner)
        second = asyncio.create_task(runner.process(*job(ids[1], t)))
        third = asyncio.create_task(runner.process(*job(ids[2], t)))
        await asyncio.sleep(0.05)
        assert counting.acquires == [(ids[0], None), (ids[2], None)]
        assert runner.counters.slots_reused == 1
        # two running, two leases: the warm one (named after the run that took it) and ids[2]'s
        assert await leases(s, t) == sorted([ids[0], ids[2]])
        assert runner.warm_slots == 0
        gate.open.set()
        assert (await second)["status"] == "succeeded"
        assert (await third)["status"] == "succeeded"
        assert runner.warm_slots == 2

        # nobody takes them: given back once their warm time has passed
        await asyncio.sleep(WARM_S + 0.05)
        assert await runner.flush_releases(due_only=True) == 2
        assert await leases(s, t) == []
        assert runner.fleet.held == {}


async def test_the_cap_holds_across_processes_and_a_warm_slot_frees_for_a_parked_job(
    wsettings: Settings,
) -> None:
    async with fleet_runners(capped(wsettings, 1), n=2) as ((a, b), s):
        t = await s.tenant()
        ids = await executions(s, t, 3)
        assert (await a.process(*job(ids[0], t)))["status"] == "succeeded"
        assert a.warm_slots == 1
        # the warm slot counts against the cap: another process's run of the tenant is parked
        with pytest.raises(JobDeferred) as deferred:
            await b.process(*job(ids[1], t))
        assert deferred.value.parked
        assert "across all workers" in str(deferred.value.reason)
        # a run in a takes the warm slot over: still one of the tenant's 1
        gate = Gate(a)
        running = asyncio.create_task(a.process(*job(ids[2], t)))
        await asyncio.sleep(0.05)
        assert a.counters.slots_reused == 1
        with pytest.raises(JobDeferred):
            await b.process(*job(ids[1], t))
        gate.open.set()
        assert (await running)["status"] == "succeeded"
        # ... and when a's slot is given back, the parked job is popped for promotion
        assert await a.flush_releases() == 1
        assert a._fleet_promotions.get_nowait() == (t, QUEUE, ids[1])
        assert await leases(s, t) == []


async def test_a_job_that_comes_back_does_not_share_its_old_slot(wsettings: Settings) -> None:
    """Job X ended here (its slot warm); run Y takes X's slot over; X comes back (redelivered,
    deferred and due again) while Y runs: its acquire must count Y's slot — a lease named
    after the job alone would let X in on it, two runs on one slot of a cap of 1."""
    async with fleet_runners(capped(wsettings, 1), n=2) as ((a, b), s):
        t = await s.tenant()
        x, y = await executions(s, t, 2)
        assert (await a.process(*job(x, t)))["status"] == "succeeded"
        gate = Gate(a)
        running = asyncio.create_task(a.process(*job(y, t)))
        await asyncio.sleep(0.05)
        assert a.counters.slots_reused == 1
        for runner in (b, a):  # in another process, and in this one
            with pytest.raises(JobDeferred) as deferred:
                await runner.process(*job(x, t))
            assert deferred.value.parked
        assert await leases(s, t) == [x]  # one lease: the slot y took over
        gate.open.set()
        assert (await running)["status"] == "succeeded"
        await a.flush_releases()
        assert await leases(s, t) == []


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
    async with fleet_runners(capped(wsettings, 2, **update), overrides=rows) as ((runner,), s):
        assert runner.fleet is not None and runner.book is not None
        counting, t, ids = await first_run(runner, s, 2)
        (first,) = runner.fleet.held
        if override is not None:  # the limits changed since the slot was taken (a PUT)
            rows.append(dataclasses.replace(override, tenant_id=t))
            await runner.book.refresh()
        assert (await runner.process(*job(ids[1], t)))["status"] == "succeeded"
        # the ended run's lease is handed to the script (dropped there), not reused here
        assert counting.acquires == [(ids[0], None), (ids[1], first)]
        assert runner.counters.slots_reused == 0
        assert first not in runner.fleet.held
        await runner.flush_releases()
        assert await leases(s, t) == []


async def test_a_job_parked_before_and_an_old_slot_go_through_the_acquire_script(
    wsettings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with fleet_runners(capped(wsettings, 2)) as ((runner,), s):
        assert runner.fleet is not None
        counting, t, ids = await first_run(runner, s, 3)
        (first,) = runner.fleet.held
        # a job that was parked before: its acquire drops its entry in the parked set
        assert (await runner.process(*parked_job(ids[1], t)))["status"] == "succeeded"
        assert counting.acquires[-1] == (ids[1], first)
        (second,) = runner.fleet.held
        # a slot passed on for WARM_SLOT_MAX_AGE_S: the next run's acquire swaps it (no job
        # of the tenant is parked) for a lease of its own, in the script
        monkeypatch.setattr(runner_mod, "WARM_SLOT_MAX_AGE_S", 0.0)
        assert (await runner.process(*job(ids[2], t)))["status"] == "succeeded"
        assert counting.acquires[-1] == (ids[2], second)
        assert runner.counters.slots_reused == 0
        assert second not in runner.fleet.held
        assert await runner.flush_releases() == 1  # the third run's, warm
        assert await leases(s, t) == []


async def test_an_old_slot_at_the_cap_is_swapped_not_parked(
    wsettings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cap 1, the tenant's only slot passed on long enough: the next run takes it over in the
    acquire script. (Given back and asked for apart, both leases were held for a moment: the
    run was parked behind its own slot, and a fleet whose cap is its total concurrency parked
    jobs for nothing.)"""
    async with fleet_runners(capped(wsettings, 1)) as ((runner,), s):
        assert runner.fleet is not None
        counting, t, ids = await first_run(runner, s, 2)
        (first,) = runner.fleet.held
        monkeypatch.setattr(runner_mod, "WARM_SLOT_MAX_AGE_S", 0.0)
        assert (await runner.process(*job(ids[1], t)))["status"] == "succeeded"
        assert counting.acquires[-1] == (ids[1], first)
        assert runner.counters.parked_fleet == 0
        assert await leases(s, t) == [ids[1]]  # the second run's lease, warm; the first's gone


async def test_an_old_slot_goes_to_the_oldest_parked_job_and_the_run_queues_behind_it(
    wsettings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Cap 1, process A passes the slot on, a job on process B is parked for it: when the slot
    is old enough, A's next run hands it over — parked behind B's job, which the same script
    pops for promotion (so no acquire can take the slot between a release and the pop) — and a
    tenant busy in one process does not starve its jobs parked elsewhere."""
    async with fleet_runners(capped(wsettings, 1), n=2) as ((a, b), s):
        assert a.fleet is not None and b.fleet is not None
        counting, t, ids = await first_run(a, s, 3)
        (first,) = a.fleet.held
        with pytest.raises(JobDeferred) as parked:  # B at the cap: parked
            await b.process(*job(ids[1], t))
        assert parked.value.parked
        await asyncio.sleep(0.005)  # parked a few ms apart: their order in the set is certain
        monkeypatch.setattr(runner_mod, "WARM_SLOT_MAX_AGE_S", 0.0)
        with pytest.raises(JobDeferred) as behind:
            await a.process(*job(ids[2], t))
        assert behind.value.parked
        assert counting.acquires[-1] == (ids[2], first)
        assert await leases(s, t) == []  # the slot is free, for B's job
        assert a._fleet_promotions.get_nowait() == (t, QUEUE, ids[1])  # popped with the freeing
        assert a._fleet_promotions.empty()
        parked_key = keys.limit_parked(s.settings.queue_prefix, t)
        members = await s.queues.redis.zrange(parked_key, 0, -1)
        assert members == [parked_member(QUEUE, ids[2])]  # A's run, until a slot frees
        assert await a.flush_releases() == 0  # nothing left to give back


@pytest.mark.parametrize(("parked_ahead", "parks"), [(1, False), (2, True)])
async def test_a_hand_off_takes_the_slot_when_the_leases_and_the_parked_jobs_leave_one(
    wsettings: Settings, monkeypatch: pytest.MonkeyPatch, parked_ahead: int, parks: bool
) -> None:
    """Cap 3; besides the old slot, one lease of another worker and ``parked_ahead`` parked
    entries (jobs parked elsewhere, or entries since gone stale): 1 + 1 < 3 leaves a slot, and
    the run takes it over; 1 + 2 = 3 does not, and the run parks behind them — the script
    popping them into the two free slots, oldest first."""
    async with fleet_runners(capped(wsettings, 3)) as ((a,), s):
        assert a.fleet is not None
        counting, t, ids = await first_run(a, s, 2)
        (first,) = a.fleet.held
        redis = s.queues.redis
        far = 4_102_444_800_000  # 2100: not expired in this test
        await redis.zadd(keys.limit_leases(s.settings.queue_prefix, t), {"other-worker": far})
        parked_key = keys.limit_parked(s.settings.queue_prefix, t)
        ahead = [parked_member(QUEUE, f"elsewhere-{i}") for i in range(parked_ahead)]
        await redis.zadd(parked_key, {m: i + 1 for i, m in enumerate(ahead)})
        monkeypatch.setattr(runner_mod, "WARM_SLOT_MAX_AGE_S", 0.0)
        if not parks:
            assert (await a.process(*job(ids[1], t)))["status"] == "succeeded"
            assert counting.acquires[-1] == (ids[1], first)
            assert a.counters.parked_fleet == 0
            assert await redis.zrange(parked_key, 0, -1) == ahead  # left alone
            return
        with pytest.raises(JobDeferred) as behind:
            await a.process(*job(ids[1], t))
        assert behind.value.parked
        assert counting.acquires[-1] == (ids[1], first)
        popped = [a._fleet_promotions.get_nowait() for _ in range(2)]
        assert popped == [(t, QUEUE, "elsewhere-0"), (t, QUEUE, "elsewhere-1")]  # 2 slots free
        assert a._fleet_promotions.empty()
        assert await redis.zrange(parked_key, 0, -1) == [parked_member(QUEUE, ids[1])]


async def test_a_hand_off_does_not_count_the_jobs_own_parked_entry(
    wsettings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A job with an entry in the parked set whose data lacks the parked note (the note's write
    failed, or a reply was lost): its own entry is not a job ahead of it — the hand-off gives
    it the slot (and drops the entry)."""
    async with fleet_runners(capped(wsettings, 1)) as ((a,), s):
        _counting, t, ids = await first_run(a, s, 2)
        parked_key = keys.limit_parked(s.settings.queue_prefix, t)
        await s.queues.redis.zadd(parked_key, {parked_member(QUEUE, ids[1]): 1})
        monkeypatch.setattr(runner_mod, "WARM_SLOT_MAX_AGE_S", 0.0)
        assert (await a.process(*job(ids[1], t)))["status"] == "succeeded"
        assert a.counters.parked_fleet == 0
        assert await s.queues.redis.zcard(parked_key) == 0


async def test_a_slot_dropped_by_a_rate_refusal_goes_to_the_parked_jobs(
    wsettings: Settings,
) -> None:
    """Cap 1 and a start rate of one a minute: A's second run drops the first run's unreleased
    lease in its acquire and is refused by the rate (after the cap's part, so the script pops
    nothing); the slot it freed still reaches B's job parked at the cap, through a release."""
    settings = capped(wsettings, 1, execution_tenant_start_rate=1 / 60)
    async with fleet_runners(settings, n=2) as ((a, b), s):
        assert a.fleet is not None
        counting, t, ids = await first_run(a, s, 3)
        (first,) = a.fleet.held
        with pytest.raises(JobDeferred) as parked:  # A's ended run still holds the slot
            await b.process(*job(ids[1], t))
        assert parked.value.parked and "tenant limit" in str(parked.value.reason)
        with pytest.raises(JobDeferred) as rate:
            await a.process(*job(ids[2], t))
        assert "start rate" in str(rate.value.reason)
        assert counting.acquires[-1] == (ids[2], first)
        assert await leases(s, t) == []
        assert await a.flush_releases() == 1
        assert a._fleet_promotions.get_nowait() == (t, QUEUE, ids[1])
        assert a._fleet_promotions.empty()


async def test_a_lease_found_expired_is_never_passed_on(wsettings: Settings) -> None:
    async with fleet_runners(wsettings) as ((runner,), s):
        assert runner.fleet is not None
        counting, t, ids = await first_run(runner, s, 3)
        # an ended run's slot, found expired by the renewal: given back at once
        runner.cool(list(runner.fleet.held))
        assert runner.warm_slots == 0
        assert await runner.flush_releases(due_only=True) == 1
        # a running run's slot found expired: given back when the run ends, not passed on
        gate = Gate(runner)
        running = asyncio.create_task(runner.process(*job(ids[1], t)))
        await asyncio.sleep(0.05)
        runner.cool(list(runner.fleet.held))
        gate.open.set()
        assert (await running)["status"] == "succeeded"
        assert runner.warm_slots == 0
        assert (await runner.process(*job(ids[2], t)))["status"] == "succeeded"
        assert [j for j, _ in counting.acquires] == ids
        assert runner.counters.slots_reused == 0


async def test_an_acquire_that_failed_gives_the_old_slot_back(wsettings: Settings) -> None:
    """Redis goes away (a throwaway server, stopped) while a run's acquire hands the ended run's
    slot over: the job is deferred, and the old slot — maybe dropped by the script, no longer
    renewed — is never passed on: it is given back with the next flush."""
    with redis_server() as server:
        settings = capped(wsettings, 2, queue_redis_port=server.port)
        async with fleet_runners(settings) as ((runner,), s):
            assert runner.fleet is not None
            _counting, t, ids = await first_run(runner, s, 2)
            (first,) = runner.fleet.held
            server.stop()
            with pytest.raises(JobDeferred) as deferred:
                await runner.process(*parked_job(ids[1], t))  # a parked one asks Redis
            assert "tenant limits unavailable" in str(deferred.value.reason)
            assert first not in runner.fleet.held
            assert runner.warm_slots == 0
            old, new = runner._releases  # and the lease the script may have taken
            assert old.slot is not None and old.slot.lease == first
            assert new.slot is not None and new.slot.lease.startswith(f"{ids[1]}@")
            assert old.due == new.due == 0.0  # due at once, not warm


async def test_an_acquire_whose_reply_was_lost_gives_its_new_lease_back(
    wsettings: Settings,
) -> None:
    """The acquire script ran and took a lease for the job, but its reply never came (Redis
    dropped the connection after running it): the job is deferred, and the lease it may hold
    — not renewed by anyone — is given back with the next flush instead of holding one of the
    tenant's fleet slots until it expires."""
    async with fleet_runners(capped(wsettings, 2)) as ((runner,), s):
        fleet = runner.fleet
        assert fleet is not None
        inner = fleet.acquire

        async def reply_lost(*args: Any, **kw: Any) -> Any:
            await inner(*args, **kw)
            raise RedisConnectionError("Connection closed by server.")

        fleet.acquire = reply_lost  # type: ignore[method-assign]
        t = await s.tenant()
        (eid,) = await executions(s, t, 1)
        with pytest.raises(JobDeferred) as deferred:
            await runner.process(*job(eid, t))
        assert "tenant limits unavailable" in str(deferred.value.reason)
        assert await leases(s, t) == [eid], "the script took the lease"
        assert await runner.flush_releases() == 1
        assert await leases(s, t) == []
        assert not fleet.held


async def test_run_releases_gives_slots_back_in_time(wsettings: Settings) -> None:
    async with fleet_runners(wsettings) as ((runner,), s):
        assert runner.fleet is not None
        t = await s.tenant()
        ids = await executions(s, t, 2)
        task = asyncio.create_task(runner.run_releases())
        try:
            assert (await runner.process(*job(ids[0], t)))["status"] == "succeeded"
            await asyncio.sleep(runner_mod.RELEASE_LINGER_S * 5)
            assert await leases(s, t) == ids[:1]  # still warm
            await _eventually(lambda: leases(s, t), [], within=WARM_S + 1.0)
            # a release that is not warm does not wait for a warm one's time
            assert (await runner.process(*job(ids[1], t)))["status"] == "succeeded"
            await asyncio.sleep(runner_mod.RELEASE_LINGER_S * 5)
            assert await leases(s, t) == ids[1:]
            runner.cool(list(runner.fleet.held))
            await _eventually(lambda: leases(s, t), [], within=WARM_S / 2)
        finally:
            task.cancel()


async def _eventually(
    read: Callable[[], Awaitable[object]], expected: object, within: float
) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while (got := await read()) != expected:
        assert asyncio.get_running_loop().time() < deadline, got
        await asyncio.sleep(0.005)


class _Racing:
    """A queue whose first ``promote`` answers as it did while the job was still active (on
    its way to the delayed set); the job is delayed by the time its state is read."""

    def __init__(self, queue: Any, calls: list[str]) -> None:
        self._queue = queue
        self._calls = calls

    async def promote(self, job_id: str) -> bool:
        self._calls.append(job_id)
        if len(self._calls) == 1:
            return False
        return bool(await self._queue.promote(job_id))

    async def get_job_state(self, job_id: str) -> str | None:
        return await self._queue.get_job_state(job_id)  # type: ignore[no-any-return]


async def test_a_parked_job_that_reaches_the_delayed_set_mid_promotion_is_promoted(
    wsettings: Settings,
) -> None:
    """A release pops a parked job whose deferral is still on its way: the first promote finds
    it active, and it is delayed when its state is read. It is promoted then — not passed over
    as "no longer parked", which left it to wait its fallback delay (5 s or more)."""
    async with fleet_runners(capped(wsettings, 1)) as ((runner,), s):
        t = await s.tenant()
        (eid,) = await executions(s, t, 1)
        queue = s.queues.create_queue(QUEUE)
        payload, _ctx = job(eid, t)
        job_id = await queue.add(payload, job_id=eid, delay_ms=60_000)
        assert await queue.get_job_state(job_id) == "delayed"
        calls: list[str] = []
        real = runner._queue_for
        runner._queue_for = lambda name: cast(Queue, _Racing(real(name), calls))
        assert await runner._promote_one(QUEUE, job_id)
        assert calls == [job_id, job_id]
        assert await queue.get_job_state(job_id) in ("waiting", "prioritized")


async def test_a_worker_stopping_promotes_the_parked_jobs_its_last_releases_popped(
    wsettings: Settings,
) -> None:
    """Cap 1: process A's run ended (its slot warm), a job on process B is parked for the
    slot. A stops: its last flush gives the slot back and pops B's job — no longer in the
    fleet's parked set, so no other worker would promote it — and A promotes it before it
    goes, instead of leaving it to its fallback delay (5 s or more)."""
    async with fleet_runners(capped(wsettings, 1), n=2) as ((a, b), s):
        _counting, t, ids = await first_run(a, s, 2)
        queue = s.queues.create_queue(QUEUE)
        payload, _ctx = job(ids[1], t)
        await queue.add(payload, job_id=ids[1], delay_ms=60_000)  # as B's park leaves it
        with pytest.raises(JobDeferred) as parked:  # B at the cap: parked
            await b.process(*job(ids[1], t))
        assert parked.value.parked
        assert await queue.get_job_state(ids[1]) == "delayed"

        assert await a.flush_releases() == 1  # what a stopping worker does, in order
        assert not a._fleet_promotions.empty(), "the release popped B's job"
        assert await a.promote_popped() == 1
        assert a._fleet_promotions.empty()
        assert await queue.get_job_state(ids[1]) in ("waiting", "prioritized")
        parked_key = keys.limit_parked(s.settings.queue_prefix, t)
        assert await s.queues.redis.zrange(parked_key, 0, -1) == []


async def test_two_runs_of_one_job_here_each_give_their_own_slot_back(wsettings: Settings) -> None:
    """The same job runs twice in one process at once (its lock was lost and the job fetched
    again before the first run was abandoned): each run holds a fleet slot of its own and gives
    back its own — keyed by job id, the second run's slot replaced the first's, the first
    run's end gave back the second's (still running), and the first lease was renewed by this
    process, holding one of the tenant's slots, until the process stopped."""
    async with fleet_runners(capped(wsettings, 2)) as ((runner,), s):
        fleet = runner.fleet
        assert fleet is not None
        t = await s.tenant()
        (eid,) = await executions(s, t, 1)
        gate = Gate(runner)
        first = asyncio.create_task(runner.process(*job(eid, t)))
        second = asyncio.create_task(runner.process(*job(eid, t)))
        await asyncio.sleep(0.05)
        assert len(fleet.held) == 2, "each run took a lease of its own"
        gate.open.set()
        await asyncio.gather(first, second, return_exceptions=True)
        assert await runner.flush_releases() == 2
        assert await leases(s, t) == []
        assert not fleet.held


async def test_a_lease_given_back_while_its_renewal_was_on_its_way_stays_given_back(
    wsettings: Settings,
) -> None:
    """Redis lost its scripts (a restart) and has had the release script loaded since (by
    another worker), not the renewal's: a renewal and a release of the same lease go in one
    batch, Redis runs the release and refuses the renewal, which is sent again once loaded —
    after the release — and puts the lease back. The worker gives it back again: no slot of
    the tenant is held by nobody until the lease expires. A throwaway ``redis-server``."""
    with redis_server() as server:
        settings = capped(wsettings, 2, queue_redis_port=server.port)
        async with fleet_runners(settings) as ((runner,), s):
            fleet = runner.fleet
            assert fleet is not None
            _counting, t, ids = await first_run(runner, s, 1)
            assert await leases(s, t) == [ids[0]]  # its slot, warm
            redis = s.queues.redis
            await redis.script_flush()
            await redis.script_load(keys.LIMIT_RELEASE_SCRIPT)
            renewal = asyncio.ensure_future(runner.renew_leases())
            release = asyncio.ensure_future(runner.flush_releases())  # the same batch
            await asyncio.gather(renewal, release)
            assert await leases(s, t) == [ids[0]], "the late renewal put the lease back"
            assert await runner.flush_releases() == 1  # given back again
            assert await leases(s, t) == []
            assert not fleet.held


async def test_a_popped_job_whose_promotion_met_a_redis_error_is_tried_again(
    wsettings: Settings,
) -> None:
    """A parked job popped into a free slot is no longer in the fleet's parked set: if its
    promotion meets a Redis error, the promoter tries it again (after 0.5 s) instead of
    dropping it — dropped, it waited its fallback delay (5 s or more)."""
    async with fleet_runners(capped(wsettings, 1)) as ((runner,), s):
        t = await s.tenant()
        (eid,) = await executions(s, t, 1)
        queue = s.queues.create_queue(QUEUE)
        payload, _ctx = job(eid, t)
        await queue.add(payload, job_id=eid, delay_ms=60_000)  # parked: delayed
        real = runner._promote_one
        calls: list[str] = []

        async def flaky(queue_name: str, job_id: str) -> bool:
            calls.append(job_id)
            if len(calls) == 1:
                raise RedisConnectionError("Connection closed by server.")
            return await real(queue_name, job_id)

        runner._promote_one = flaky  # type: ignore[method-assign]
        runner._fleet_promotions.put_nowait((t, QUEUE, eid))
        promoter = asyncio.create_task(runner.run_fleet_promoter())
        try:
            for _ in range(100):
                if await queue.get_job_state(eid) in ("waiting", "prioritized"):
                    break
                await asyncio.sleep(0.02)
        finally:
            promoter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await promoter
        assert calls == [eid, eid]
        assert await queue.get_job_state(eid) in ("waiting", "prioritized")
