"""Ticks materialised ahead (``SCHEDULER_LOOKAHEAD_MS``), in process, on real SQLite/Postgres
and Redis.

* Ticks due within the window are recorded ahead and staged as BullMQ delayed jobs that become
  runnable at (never before) their instant; each execution's ``scheduled_for`` is its tick.
* A leader that dies after recording and before enqueueing loses nothing and doubles nothing:
  the next leader re-stages what it recorded (same job ids); the reconciler would too, with
  the delay still due.
* A schedule disabled, deleted or edited inside the window: the ticks recorded ahead are
  ``cancelled`` with their executions; an edited cron fires by the new expression.
* Misfires are recorded per tick (``collapsed``/``skipped``), counted, logged and listed by
  ``GET /api/schedules/{id}/ticks``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import update

from conveyor.dispatch import execution_queue_name, keys
from conveyor.errors import QueueUnavailable
from conveyor.queue import WorkflowExecute
from conveyor.store import Store
from conveyor.store.schema import schedules
from conveyor.workers.reconcile import Reconciler
from conveyor.workers.scheduler import Scheduler
from tests.scheduler._support import base_env, migrate, seed_schedule, settings_for, ticks_of
from tests.scheduler.test_scheduler_in_process import ADMIN_TOKEN, _data, api_client, leading

pytestmark = pytest.mark.slow


@pytest.fixture(params=["sqlite", "postgres"])
def env(
    request: pytest.FixtureRequest, settings_env: dict[str, str], tmp_path: Path
) -> dict[str, str]:
    """A migrated database (SQLite file or a Postgres database of this test's own)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'c.db'}"
    else:
        url = request.getfixturevalue("fresh_pg_url")
    environment = base_env(settings_env, url, ADMIN_TOKEN=ADMIN_TOKEN)
    asyncio.run(migrate(environment))
    return environment


async def _job(scheduler: Scheduler, execution_id: str, region: str = "us") -> dict[str, Any]:
    """BullMQ's hash of the execution's job (empty if there is none)."""
    name = execution_queue_name(region)
    key = keys.job(scheduler.settings.queue_prefix, name, execution_id)
    raw: dict[Any, Any] = await scheduler.queues.redis.hgetall(key)
    return {str(k): v for k, v in raw.items()}


def _runnable_ms(job: dict[str, Any]) -> int:
    """When BullMQ makes the job runnable: its timestamp plus its delay."""
    return int(job["timestamp"]) + int(job.get("delay") or 0)


async def _assert_staged_on_time(scheduler: Scheduler, ticks: list[Any]) -> None:
    """Every recorded tick's job exists and is not runnable before the tick instant."""
    for fire_time, _created, execution_id in ticks:
        job = await _job(scheduler, execution_id)
        assert job, f"no job for the tick at {fire_time}"
        assert _runnable_ms(job) >= fire_time.timestamp() * 1000, (fire_time, job)


async def test_ticks_are_materialised_ahead_as_delayed_jobs_due_at_their_instant(
    env: dict[str, str],
) -> None:
    tenant, sid = await seed_schedule(env, "* * * * * *")
    async with leading(settings_for(env)) as scheduler:
        started = datetime.now(UTC)
        assert await scheduler.fire_due(3.0) >= 3
        ticks = await ticks_of(env, sid)
        ahead = [t for t in ticks if t[0] > started + timedelta(seconds=1)]
        assert len(ahead) >= 2  # recorded before their instant
        assert all(created < fire_time for fire_time, created, _e in ahead)
        await _assert_staged_on_time(scheduler, ticks)
        state = await scheduler.dispatcher.queue("us").get_job_state(ahead[-1][2])
        assert state == "delayed"
        for fire_time, _created, execution_id in ticks:
            execution = await scheduler.store.executions.get(tenant, execution_id)
            assert execution.scheduled_for == fire_time and execution.status == "queued"
        info = await scheduler.info()
        assert info["ticksInWindow"] >= 1 and info["lookaheadMs"] == 10000
        # The next pass records nothing twice: the schedule moved past the window.
        await scheduler.fire_due(3.0)
        again = await ticks_of(env, sid)
        assert [t[0] for t in again[: len(ticks)]] == [t[0] for t in ticks]
        assert len({t[0] for t in again}) == len(again)


async def test_a_leader_dying_between_recording_and_enqueueing_loses_and_doubles_nothing(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _tenant, sid = await seed_schedule(env, "* * * * * *")
    settings = settings_for(env)

    async def dies(payloads: list[WorkflowExecute], **_: Any) -> list[str]:
        raise QueueUnavailable("the leader died before enqueueing")

    async with leading(settings) as old:
        monkeypatch.setattr(old.dispatcher, "enqueue_many", dies)
        await old.fire_due(3.0)
        recorded = await ticks_of(env, sid)
        assert len(recorded) >= 3
        assert [await _job(old, e) for _f, _c, e in recorded] == [{}] * len(recorded)
    monkeypatch.undo()

    async with leading(settings) as new:  # takes over: re-stages, then goes on
        assert await new.restage() == len(recorded)
        await _assert_staged_on_time(new, recorded)
        await new.restage()  # idempotent: same job ids
        await new.fire_due(3.0)
        ticks = await ticks_of(env, sid)
        await _assert_staged_on_time(new, ticks)
    fire_times = [t[0] for t in ticks]
    assert fire_times == sorted(set(fire_times)) and fire_times[: len(recorded)] == [
        t[0] for t in recorded
    ]
    assert all(b - a == timedelta(seconds=1) for a, b in itertools.pairwise(fire_times))
    async with Store(settings, pool_size=1) as store:
        execs = await store.executions.status_of([t[2] for t in ticks])
    assert len(execs) == len(ticks)  # one execution per tick


async def test_the_reconciler_stages_a_lost_tick_job_with_its_delay(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    _tenant, sid = await seed_schedule(env, "* * * * * *")
    settings = settings_for(env)

    async def dies(payloads: list[WorkflowExecute], **_: Any) -> list[str]:
        raise QueueUnavailable("the leader died before enqueueing")

    async with leading(settings) as scheduler:
        monkeypatch.setattr(scheduler.dispatcher, "enqueue_many", dies)
        await scheduler.fire_due(4.0)
        monkeypatch.undo()
        recorded = await ticks_of(env, sid)
        reconciler = Reconciler(scheduler.store, scheduler.queues, scheduler.dispatcher, settings)
        # as a pass would see them once they are older than RECONCILE_MIN_AGE_MS
        later = datetime.now(UTC) + timedelta(seconds=settings.reconcile_min_age_ms / 1000 + 1)
        recovered = await reconciler.run_once(later)
        assert sorted(recovered) == sorted(t[2] for t in recorded)
        await _assert_staged_on_time(scheduler, recorded)
        future = [t for t in recorded if t[0].timestamp() > time.time() + 0.5]
        queue = scheduler.dispatcher.queue("us")
        assert future and [await queue.get_job_state(t[2]) for t in future] == ["delayed"] * len(
            future
        )


async def test_the_window_grows_before_a_boundary_it_could_not_record_in_time(
    env: dict[str, str],
) -> None:
    """``SCHEDULER_LOOKAHEAD_MS`` is the least look-ahead: when the schedules with a tick within
    ``SCHEDULER_LOOKAHEAD_MAX_MS`` would take longer to record at the measured rate, the
    leader starts earlier (twice that time ahead), never further than the maximum."""
    # Seeding and the pass below must fall in one minute: a schedule seeded before a minute
    # boundary that the pass comes after has two ticks within its 60 s window (a CI run on a
    # loaded machine counted 32).
    into_minute = time.time() % 60
    if into_minute > 50:
        await asyncio.sleep(60.05 - into_minute)
    for _ in range(20):
        await seed_schedule(env, "* * * * *")  # a tick within the next minute, always
    async with leading(settings_for(env)) as scheduler:
        assert await scheduler.window() == 10.0  # 20 ticks at 1,000/s: the setting suffices
        scheduler.rate = 1.0  # as measured on a slow machine: 20 ticks take 20 s
        assert await scheduler.window() == 10.0  # the count is read at most once a second
        scheduler._window_read = -math.inf
        assert await scheduler.window() == 40.0
        scheduler.rate, scheduler._window_read = 0.1, -math.inf
        assert await scheduler.window() == 60.0  # SCHEDULER_LOOKAHEAD_MAX_MS
        assert (await scheduler.info())["windowMs"] == 60000
        assert await scheduler.fire_due(await scheduler.window()) == 20  # next minute's ticks
        scheduler._measured(1000, 0.5)  # a pass of 1,000 ticks in 0.5 s
        assert 0.1 < scheduler.rate < 2000


async def test_the_reconciler_leaves_what_a_worker_finished_between_its_two_looks(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pass reads the stranded rows, then their jobs: a worker that ran an execution in
    between (its job completed, then trimmed) must not have it enqueued again — only what is
    still stranded after its job was seen gone is."""
    from conveyor.store.schema import executions

    _tenant, sid = await seed_schedule(env, "* * * * * *")
    settings = settings_for(env)
    async with leading(settings) as scheduler:
        await scheduler.fire_due(3.0)
        recorded = await ticks_of(env, sid)
        finished, lost = recorded[0][2], recorded[1][2]
        queue = scheduler.dispatcher.queue("us")
        for execution_id in (finished, lost):  # both jobs gone (as after removeOnComplete)
            await queue.remove(execution_id)
        reconciler = Reconciler(scheduler.store, scheduler.queues, scheduler.dispatcher, settings)
        look = reconciler._job_gone

        async def worker_finishes_meanwhile(execution: Any) -> tuple[bool, str | None]:
            if execution.id == finished:  # the worker commits its result right now
                async with scheduler.store.engine.begin() as conn:
                    await conn.execute(
                        update(executions)
                        .where(executions.c.id == finished)
                        .values(status="succeeded", finished_at=datetime.now(UTC))
                    )
            return await look(execution)

        monkeypatch.setattr(reconciler, "_job_gone", worker_finishes_meanwhile)
        later = datetime.now(UTC) + timedelta(seconds=settings.reconcile_min_age_ms / 1000 + 1)
        recovered = await reconciler.run_once(later)
        assert lost in recovered
        assert finished not in recovered
        assert await queue.get_job_state(finished) is None  # not run a second time
        assert await queue.get_job_state(lost) is not None  # enqueued again


async def test_a_schedule_disabled_or_deleted_inside_the_window_does_not_fire(
    env: dict[str, str],
) -> None:
    tenant, disabled = await seed_schedule(env, "* * * * * *")
    tenant2, deleted = await seed_schedule(env, "* * * * * *")
    async with leading(settings_for(env)) as scheduler:
        await scheduler.fire_due(4.0)
        store = scheduler.store
        before = {sid: await ticks_of(env, sid) for sid in (disabled, deleted)}
        cut = datetime.now(UTC)
        await store.schedules.update(tenant, disabled, {"enabled": False})
        await store.schedules.delete(tenant2, deleted)
        await scheduler.fire_due(4.0)
        for sid in (disabled, deleted):
            ahead = [t for t in before[sid] if t[0] > cut + timedelta(milliseconds=200)]
            assert ahead
            statuses = await store.executions.status_of([t[2] for t in ahead])
            assert set(statuses.values()) == {"cancelled"}
        outcomes = {t.fire_time: t.outcome for t in await store.schedules.ticks(tenant, disabled)}
        assert {
            outcomes[t[0]] for t in before[disabled] if t[0] > cut + timedelta(seconds=0.2)
        } == {"cancelled"}
        assert max(outcomes) <= max(t[0] for t in before[disabled])  # nothing new recorded
        assert await ticks_of(env, deleted) == []


async def test_an_edited_cron_inside_the_window_fires_by_the_new_expression(
    env: dict[str, str],
) -> None:
    tenant, sid = await seed_schedule(env, "* * * * * *")
    async with leading(settings_for(env)) as scheduler:
        await scheduler.fire_due(4.0)
        store = scheduler.store
        edited_at = datetime.now(UTC)
        await store.schedules.update(tenant, sid, {"cron": "*/2 * * * * *"})
        await scheduler.fire_due(4.0)
        ticks = await store.schedules.ticks(tenant, sid)
        later = [t for t in ticks if t.fire_time > edited_at + timedelta(milliseconds=200)]
        fired = [t for t in later if t.outcome == "fired"]
        assert fired and all(t.fire_time.second % 2 == 0 for t in fired)
        assert {t.outcome for t in later if t.fire_time.second % 2} == {"cancelled"}
        for t in fired:
            assert t.execution_id is not None
            execution = await store.executions.get(tenant, t.execution_id)
            assert execution.status == "queued" and execution.scheduled_for == t.fire_time
            assert _runnable_ms(await _job(scheduler, t.execution_id)) >= (
                t.fire_time.timestamp() * 1000
            )


async def test_misfires_are_recorded_counted_and_listed_by_the_api(
    env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    settings = settings_for(env)
    caplog.set_level(logging.WARNING, logger="conveyor.workers.scheduler")
    async with api_client(settings) as (client, auth):
        wf = _data(await client.post("/api/workflows", headers=auth,
                                     json={"name": "n", "steps": [{"id": "a", "type": "noop"}]}),
                   201)["id"]  # fmt: skip
        sched = _data(await client.post("/api/schedules", headers=auth,
                                        json={"workflowId": wf, "cron": "* * * * * *"}), 201)  # fmt: skip
        missed_since = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=40)
        async with Store(settings, pool_size=1) as store, store.engine.begin() as conn:
            await conn.execute(
                update(schedules)
                .where(schedules.c.id == sched["id"])
                .values(next_fire_at=missed_since)
            )
        async with leading(settings) as scheduler:
            await scheduler.fire_due(0.5)
            assert scheduler.misfires >= 39
            assert (await scheduler.info())["misfiresPerMinute"] == scheduler.misfires
            await scheduler.metrics.flush()
            counters = await scheduler.queues.redis.hgetall(
                keys.metrics_counters(settings.queue_prefix)
            )
        misfire_fields = [f for f in counters if str(f).startswith("scheduler_misfires_total|")]
        assert len(misfire_fields) == 1 and "fire_once" in str(misfire_fields[0])
        assert int(counters[misfire_fields[0]]) == scheduler.misfires
        assert [r for r in caplog.records if r.getMessage() == "scheduler.misfire"]

        path = f"/api/schedules/{sched['id']}/ticks"
        items: list[dict[str, Any]] = []
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": 25} | ({"cursor": cursor} if cursor else {})
            page = _data(await client.get(path, params=params, headers=auth), 200)
            items += page["items"]
            cursor = page["nextCursor"]
            if cursor is None:
                break
        times = [datetime.fromisoformat(i["fireTime"]) for i in items]
        assert times == sorted(set(times), reverse=True)
        by_outcome: dict[str, int] = {}
        for item in items:
            by_outcome[item["outcome"]] = by_outcome.get(item["outcome"], 0) + 1
        assert by_outcome["collapsed"] == scheduler.misfires
        assert min(times) == missed_since
        collapsed = [i for i in items if i["outcome"] == "collapsed"]
        assert all(i["executionId"] is None for i in collapsed)
        latest_missed = max(datetime.fromisoformat(i["fireTime"]) for i in collapsed)
        fired = [i for i in items if i["outcome"] == "fired"]
        assert fired and all(i["executionId"] for i in fired)
        assert min(datetime.fromisoformat(i["fireTime"]) for i in fired) > latest_missed
        r = await client.get("/api/schedules/nope/ticks", headers=auth)
        assert r.status_code == 404


def test_the_lookahead_setting_is_validated_and_shown_in_status() -> None:
    from conveyor.cli.tables import render
    from conveyor.errors import ConfigError
    from conveyor.settings import load_settings

    assert load_settings({}).scheduler_lookahead_ms == 10000
    for value in ("50", "60001", "400"):  # 400 < the default poll interval (500)
        with pytest.raises(ConfigError, match="SCHEDULER_LOOKAHEAD_MS"):
            load_settings({"SCHEDULER_LOOKAHEAD_MS": value})
    text = render({"scheduler": {"preferredStrategy": "redis", "lockHolder": "s1", "lagMs": 0,
                                 "ticksInWindow": 42, "lookaheadMs": 5000,
                                 "misfiresPerMinute": 3}})  # fmt: skip
    assert "in window    42 (next 5000ms)" in text and "misfires/min 3" in text


async def test_the_reconciler_walks_a_backlog_larger_than_a_pass(env: dict[str, str]) -> None:
    """A backlog of queued executions with live jobs, more than one pass looks at, and behind
    it an execution whose enqueue was lost: each pass goes on where the last stopped (checked,
    the oldest rows would be due again at once, and the lost one never looked at) — it is
    enqueued again within a walk through the backlog, and the walk then starts over."""
    settings = settings_for(env)
    async with leading(settings) as scheduler:
        store = scheduler.store
        tenant = (await store.tenants.create("t")).id
        wf = (await store.workflows.create(tenant, {"name": "w", "steps": [
            {"id": "n", "type": "noop"}]})).id  # fmt: skip
        backlog = []
        for _ in range(8):
            execution, _created = await store.executions.create(tenant, wf)
            await scheduler.dispatcher.enqueue(WorkflowExecute(
                execution_id=execution.id, tenant_id=tenant, workflow_id=wf, region="us"))  # fmt: skip
            backlog.append(execution.id)
        lost, _created = await store.executions.create(tenant, wf)  # its enqueue never happened
        reconciler = Reconciler(store, scheduler.queues, scheduler.dispatcher, settings, limit=3)
        step = timedelta(seconds=settings.reconcile_min_age_ms / 1000 + 1)
        at = datetime.now(UTC)
        recovered: list[str] = []
        for _ in range(3):  # 3 + 3 + (2 + the lost one)
            at += step  # each pass: everything checked before is due again
            recovered += await reconciler.run_once(at)
        assert recovered == [lost.id]
        assert await reconciler.run_once(at + step) == []  # nothing after the last page
        assert reconciler._after is None, "the walk starts over"
        queue = scheduler.dispatcher.queue("us")
        assert await queue.get_job_state(lost.id) in ("waiting", "prioritized")
