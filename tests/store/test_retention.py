"""Retention on SQLite and PostgreSQL: what a pass deletes (finished and old, per-tenant
overrides, the count cap) and what it never touches (queued, running, waiting, leased); step
runs, timers and schedule ticks go with their execution; batches and pauses; the dry run. The
clock is injected: nothing here sleeps."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as aioredis

from conveyor.errors import NotFound
from conveyor.queue import QueueFactory
from conveyor.runtime import MetricsPublisher
from conveyor.settings import Settings, load_settings
from conveyor.store import Store
from conveyor.store.schema import executions, schedule_ticks, step_runs, timers
from conveyor.workers.retention import Retention
from tests.conftest import REDIS_HOST, REDIS_PORT
from tests.store import _retention_seed as seed

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
DAY = timedelta(days=1)


def _retention(store: Store, **overrides: object) -> Retention:
    settings = store.settings.model_copy(update=overrides) if overrides else store.settings
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    r = Retention(store, settings, clock=lambda: NOW, sleep=sleep)
    r.slept = slept  # type: ignore[attr-defined]
    return r


async def test_a_pass_deletes_finished_old_executions_and_nothing_unfinished(
    store: Store,
) -> None:
    a = await seed.tenant(store, "acme", NOW - 60 * DAY)
    old = NOW - 15 * DAY  # past the 14-day default
    gone = {
        await seed.execution(store, a, "succeeded", created=old, finished=old, timer=True,
                             tick=True),
        await seed.execution(store, a, "failed", created=old - DAY, finished=old),
        await seed.execution(store, a, "cancelled", created=old, finished=old, steps=0),
    }  # fmt: skip
    kept = {
        # finished, but within the retention
        await seed.execution(store, a, "succeeded", created=old, finished=NOW - 13 * DAY,
                             tick=True),
        # never finished, however old: queued, running (a worker's lease), waiting on a timer
        await seed.execution(store, a, "queued", created=NOW - 90 * DAY, steps=0, tick=True),
        await seed.execution(store, a, "running", created=NOW - 90 * DAY,
                             lease_until=NOW + timedelta(seconds=30)),
        await seed.execution(store, a, "waiting", created=NOW - 90 * DAY, timer=True),
        # cancelled long ago while a worker still holds the lease: it lets go first
        await seed.execution(store, a, "cancelled", created=old, finished=old,
                             lease_until=NOW + timedelta(seconds=30)),
    }  # fmt: skip
    await seed.idle_tick(store, a, old, "collapsed")
    await seed.idle_tick(store, a, NOW - DAY, "skipped")

    report = await _retention(store).run_pass()

    assert await seed.ids(store) == kept
    assert report.pruned.as_dict() == {
        "executions": 3, "step_runs": 4, "timers": 1, "schedule_ticks": 2,
    }  # fmt: skip
    assert report.complete and report.tenants[a.id].executions == 3
    for eid in gone:
        assert await seed.children(store, eid) == (0, 0, 0)
    assert await seed.count(store, step_runs) == 2 + 0 + 2 + 2 + 2
    assert await seed.count(store, timers) == 1  # the waiting execution's pending timer
    assert await seed.count(store, schedule_ticks) == 3  # two executions' + the recent idle one

    again = await _retention(store).run_pass()  # nothing left to do
    assert again.pruned.total == 0 and await seed.ids(store) == kept


async def test_a_child_stays_while_its_parent_has_not_ended(store: Store) -> None:
    """A finished child (sub-workflow, parallel branch, foreach item) is not pruned while its
    parent waits: the parent reads it when it joins, and would start a missing item again."""
    a = await seed.tenant(store, "acme", NOW - 60 * DAY)
    old = NOW - 15 * DAY
    parent = await seed.execution(store, a, "waiting", created=old)
    child = await seed.execution(store, a, "succeeded", created=old, finished=old, parent=parent)
    report = await _retention(store).run_pass()
    assert report.pruned.executions == 0 and await seed.ids(store) == {parent, child}
    async with store.engine.begin() as conn:  # the parent joins and ends
        await conn.execute(
            executions.update()
            .where(executions.c.id == parent)
            .values(status="succeeded", finished_at=old)
        )
    report = await _retention(store).run_pass()
    assert report.pruned.executions == 2 and await seed.ids(store) == set()


async def test_tenant_override_and_count_cap(store: Store) -> None:
    plain = await seed.tenant(store, "plain", NOW - 60 * DAY)
    short = await seed.tenant(store, "short", NOW - 60 * DAY)
    capped = await seed.tenant(store, "capped", NOW - 60 * DAY)
    await store.retention.set_override(short.id, retention_s=86400, max_executions=None)
    await store.retention.set_override(capped.id, retention_s=None, max_executions=3)

    two_days = NOW - 2 * DAY
    plain_ids = {await seed.execution(store, plain, "succeeded", created=two_days,
                                      finished=two_days) for _ in range(5)}  # fmt: skip
    short_old = await seed.execution(store, short, "succeeded", created=two_days, finished=two_days)
    short_new = await seed.execution(
        store, short, "failed", created=NOW - timedelta(hours=2), finished=NOW - timedelta(hours=1)
    )
    capped_ids = [
        await seed.execution(store, capped, "succeeded", created=two_days,
                             finished=NOW - timedelta(hours=10 - i))
        for i in range(6)
    ]  # fmt: skip
    capped_waiting = await seed.execution(store, capped, "waiting", created=NOW - 30 * DAY)

    policies = {p.tenant_id: p for p in await _retention(store).policies()}
    assert policies[short.id].retention_s == 86400 and policies[short.id].overridden
    assert policies[capped.id].max_executions == 3 and policies[capped.id].retention_s == 14 * 86400
    assert not policies[plain.id].overridden and policies[plain.id].max_executions is None

    await _retention(store).run_pass()

    assert await seed.ids(store, plain.id) == plain_ids  # 2 days < 14 days
    assert await seed.ids(store, short.id) == {short_new}  # its own 1 day
    assert short_old not in await seed.ids(store)
    # the three newest finished ones stay, and the waiting one (never counted, never pruned)
    assert await seed.ids(store, capped.id) == {*capped_ids[3:], capped_waiting}


async def test_global_count_cap_setting(store: Store) -> None:
    t = await seed.tenant(store, "t", NOW - 60 * DAY)
    made = [
        await seed.execution(store, t, "succeeded", created=NOW - DAY,
                             finished=NOW - timedelta(minutes=60 - i), steps=1)
        for i in range(5)
    ]  # fmt: skip
    report = await _retention(store, execution_retention_max_per_tenant=2).run_pass()
    assert await seed.ids(store, t.id) == set(made[3:])
    assert report.pruned.executions == 3 and report.pruned.step_runs == 3


async def test_batches_are_small_and_paused_between(store: Store) -> None:
    t = await seed.tenant(store, "t", NOW - 60 * DAY)
    old = NOW - 20 * DAY
    for _ in range(5):
        await seed.execution(store, t, "succeeded", created=old, finished=old, steps=1)
    for i in range(3):
        await seed.idle_tick(store, t, old + timedelta(seconds=i))
    retention = _retention(store, retention_batch_size=2, retention_pause_ms=250)
    report = await retention.run_pass()
    assert report.pruned.executions == 5 and report.pruned.schedule_ticks == 3
    # executions: 2 + 2 + 1 (pause after each full batch); idle ticks: 2 + 1
    assert report.batches == 5
    assert retention.slept == [0.25, 0.25, 0.25]  # type: ignore[attr-defined]


async def test_a_pass_stops_between_batches_when_told(store: Store) -> None:
    t = await seed.tenant(store, "t", NOW - 60 * DAY)
    old = NOW - 20 * DAY
    for _ in range(4):
        await seed.execution(store, t, "succeeded", created=old, finished=old, steps=0)
    calls = iter([True, False])
    report = await _retention(store, retention_batch_size=2).run_pass(
        keep_going=lambda: next(calls, False)
    )
    assert not report.complete and report.pruned.executions == 2
    assert len(await seed.ids(store, t.id)) == 2


async def test_dry_run_counts_what_would_go_and_deletes_nothing(store: Store) -> None:
    a = await seed.tenant(store, "a", NOW - 60 * DAY)
    b = await seed.tenant(store, "b", NOW - 60 * DAY)
    old = NOW - 15 * DAY
    await seed.execution(store, a, "succeeded", created=old, finished=old, timer=True, tick=True)
    await seed.execution(store, a, "failed", created=old, finished=old, steps=3)
    await seed.execution(store, a, "running", created=old)
    await seed.idle_tick(store, a, old)
    await seed.execution(store, b, "succeeded", created=NOW, finished=NOW)
    before = await seed.ids(store)

    plans = {p.policy.tenant_id: p.pruned for p in await _retention(store).plan()}

    assert plans[a.id].as_dict() == {
        "executions": 2, "step_runs": 5, "timers": 1, "schedule_ticks": 2,
    }  # fmt: skip
    assert plans[b.id].total == 0
    assert await seed.ids(store) == before
    assert await seed.count(store, schedule_ticks) == 2


async def test_overrides_are_per_tenant_and_validated_by_existence(store: Store) -> None:
    t = await seed.tenant(store, "t", NOW)
    got = await store.retention.get_override(t.id)
    assert (got.retention_s, got.max_executions) == (None, None)
    await store.retention.set_override(t.id, retention_s=3600, max_executions=10)
    got = await store.retention.get_override(t.id)
    assert (got.retention_s, got.max_executions) == (3600, 10)
    await store.retention.set_override(t.id, retention_s=None, max_executions=None)
    assert (await store.retention.get_override(t.id)).retention_s is None
    with pytest.raises(NotFound):
        await store.retention.get_override("nope")
    with pytest.raises(NotFound):
        await store.retention.set_override("nope", retention_s=3600, max_executions=None)


async def test_rows_pruned_are_counted_in_metrics(store: Store, redis_prefix: str) -> None:
    t = await seed.tenant(store, "t", NOW - 60 * DAY)
    old = NOW - 20 * DAY
    for _ in range(3):
        await seed.execution(store, t, "succeeded", created=old, finished=old, steps=2)
    qs: Settings = load_settings(
        {}, queue_redis_host=REDIS_HOST, queue_redis_port=REDIS_PORT, queue_prefix=redis_prefix
    )
    async with QueueFactory(qs) as queues:
        metrics = MetricsPublisher(queues)
        await Retention(store, store.settings, metrics=metrics, clock=lambda: NOW).run_pass()
        await metrics.flush()
    client = aioredis.Redis(host=REDIS_HOST, port=REDIS_PORT, decode_responses=True)
    try:
        counters = await client.hgetall(f"{redis_prefix}:conveyor:metrics:counters")
    finally:
        await client.aclose()
    assert counters["retention_pruned_rows_total|table=executions"] == "3"
    assert counters["retention_pruned_rows_total|table=step_runs"] == "6"
