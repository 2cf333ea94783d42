"""Schedules: validation (on every save), next fire times (time zones, DST), exactly-once
ticks and the tick instant on their executions, scoping."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import update

from conveyor.errors import NotFound, ScheduleInvalid
from conveyor.store import PlannedTicks, Store, next_fire_time, utcnow
from conveyor.store.schema import executions, schedules

NOOP = {"name": "wf", "steps": [{"id": "a", "type": "noop"}]}


def test_next_fire_time_time_zones_and_dst() -> None:
    after = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert next_fire_time("0 9 * * *", "Europe/Berlin", after) == datetime(
        2025, 1, 2, 8, 0, tzinfo=UTC
    )
    # Six fields: seconds first, as BullMQ's cron-parser (and Quartz, Spring) read them.
    assert next_fire_time("*/10 * * * * *", "UTC", after) == after.replace(second=10)
    assert next_fire_time("30 */5 * * * *", "UTC", after) == after.replace(second=30)
    # Spring forward in Berlin (2025-03-30 02:00 → 03:00): 02:30 does not exist, fires at the
    # transition (03:00 CEST = 01:00 UTC); the next day is 02:30 CEST again.
    spring = datetime(2025, 3, 29, 23, 0, tzinfo=UTC)
    first = next_fire_time("30 2 * * *", "Europe/Berlin", spring)
    assert first == datetime(2025, 3, 30, 1, 0, tzinfo=UTC)
    assert next_fire_time("30 2 * * *", "Europe/Berlin", first) == datetime(
        2025, 3, 31, 0, 30, tzinfo=UTC
    )
    # Several missing wall times collapse into the one firing at the transition.
    assert next_fire_time("*/20 2 * * *", "Europe/Berlin", spring) == datetime(
        2025, 3, 30, 1, 0, tzinfo=UTC
    )
    # An interval-like schedule (hour wildcard) keeps firing through the repeated hour.
    repeated = datetime(2025, 10, 26, 0, 45, tzinfo=UTC)  # 02:45 CEST, first pass
    assert next_fire_time("0 * * * *", "Europe/Berlin", repeated) == datetime(
        2025, 10, 26, 1, 0, tzinfo=UTC
    )  # 02:00 CET, the second pass
    # Fall back (2025-10-26 03:00 → 02:00): 02:30 exists twice and fires once.
    fall = datetime(2025, 10, 25, 22, 0, tzinfo=UTC)
    once = next_fire_time("30 2 * * *", "Europe/Berlin", fall)
    assert once == datetime(2025, 10, 26, 0, 30, tzinfo=UTC)
    assert next_fire_time("30 2 * * *", "Europe/Berlin", once) == datetime(
        2025, 10, 27, 1, 30, tzinfo=UTC
    )


async def test_crud_and_validation(store: Store) -> None:
    tenant = await store.tenants.create("acme")
    wf = await store.workflows.create(tenant.id, NOOP)
    with pytest.raises(ScheduleInvalid) as bad_cron:
        await store.schedules.create(tenant.id, wf.id, "61 * * * *")
    assert bad_cron.value.details["field"] == "cron"
    with pytest.raises(ScheduleInvalid) as bad_tz:
        await store.schedules.create(tenant.id, wf.id, "* * * * *", "Mars/Olympus")
    assert bad_tz.value.details["field"] == "timezone"
    with pytest.raises(NotFound):
        await store.schedules.create(tenant.id, "missing", "* * * * *")

    schedule = await store.schedules.create(
        tenant.id, wf.id, "0 9 * * 1-5", "America/New_York", name="weekday", input={"a": 1}
    )
    assert schedule.next_fire_at is not None and schedule.next_fire_at > utcnow()
    got = await store.schedules.get(tenant.id, schedule.id)
    assert got == schedule
    changed = await store.schedules.update(tenant.id, schedule.id, {"enabled": False})
    assert not changed.enabled and changed.next_fire_at is None
    changed = await store.schedules.update(
        tenant.id, schedule.id, {"enabled": True, "cron": "*/5 * * * *"}
    )
    assert changed.next_fire_at is not None and changed.cron == "*/5 * * * *"
    with pytest.raises(ScheduleInvalid):
        await store.schedules.update(tenant.id, schedule.id, {"timezone": "Nowhere"})
    with pytest.raises(ScheduleInvalid):
        await store.schedules.update(tenant.id, schedule.id, {"tenant_id": "x"})
    page = await store.schedules.list(tenant.id, workflow_id=wf.id)
    assert [s.id for s in page.items] == [schedule.id]

    other = await store.tenants.create("other")
    for call in (
        store.schedules.get(other.id, schedule.id),
        store.schedules.update(other.id, schedule.id, {"enabled": False}),
        store.schedules.delete(other.id, schedule.id),
    ):
        with pytest.raises(NotFound):
            await call
    assert (await store.schedules.list(other.id)).items == []

    await store.schedules.delete(tenant.id, schedule.id)
    with pytest.raises(NotFound):
        await store.schedules.get(tenant.id, schedule.id)


async def test_each_tick_fires_exactly_once(store: Store) -> None:
    tenant = await store.tenants.create("acme")
    wf = await store.workflows.create(tenant.id, NOOP)
    schedule = await store.schedules.create(tenant.id, wf.id, "* * * * * *", input={"k": 1})
    assert schedule.next_fire_at is not None
    later = schedule.next_fire_at + timedelta(seconds=5)
    due = await store.schedules.due(later)
    assert [s.id for s in due] == [schedule.id]

    tick = schedule.next_fire_at
    following = tick + timedelta(seconds=1)
    # Two "leaders" fire the same tick at once: one execution.
    fired = await asyncio.gather(
        *(store.schedules.fire(schedule, tick, next_fire_at=following) for _ in range(4))
    )
    winners = [f for f in fired if f is not None]
    assert len(winners) == 1 and winners[0].execution is not None
    execution = winners[0].execution
    assert execution.triggered_by == "schedule" and execution.schedule_id == schedule.id
    assert execution.input == {"k": 1} and execution.scheduled_for == tick
    listed = await store.executions.list(tenant.id)
    assert [e.id for e in listed.items] == [execution.id]
    # stored: read back by every path (the asyncpg fast path on Postgres, SQLAlchemy)
    assert listed.items[0].scheduled_for == tick
    assert (await store.executions.get(tenant.id, execution.id)).scheduled_for == tick
    stored = await store.executions.get(tenant.id, execution.id, with_steps=True)
    assert stored.scheduled_for == tick
    triggered, _created = await store.executions.create(tenant.id, wf.id)
    assert triggered.scheduled_for is None
    assert (await store.executions.get(tenant.id, triggered.id)).scheduled_for is None
    listed_ticks = await store.schedules.ticks(tenant.id, schedule.id)
    assert [(t.fire_time, t.execution_id, t.outcome) for t in listed_ticks] == [
        (tick, execution.id, "fired")
    ]
    current = await store.schedules.get(tenant.id, schedule.id)
    assert current.last_fired_at == tick and current.next_fire_at == following

    # A disabled workflow's tick is recorded without an execution.
    await store.workflows.set_enabled(tenant.id, wf.id, False)
    skipped = await store.schedules.fire(current, following, next_fire_at=None)
    assert skipped is not None and skipped.execution is None
    await store.schedules.skip(current, next_fire_at=following + timedelta(seconds=9))
    assert (await store.schedules.next_due_at()) == following + timedelta(seconds=9)

    # Deleting the workflow disables its schedules.
    await store.workflows.delete(tenant.id, wf.id)
    assert await store.schedules.due(later + timedelta(days=1)) == []


async def test_a_cron_that_never_fires_is_refused_on_every_save(store: Store) -> None:
    tenant = await store.tenants.create("acme")
    wf = await store.workflows.create(tenant.id, NOOP)
    for enabled in (True, False):  # validated even when nothing is computed from it
        with pytest.raises(ScheduleInvalid, match="never fires") as caught:
            await store.schedules.create(tenant.id, wf.id, "0 0 30 2 *", enabled=enabled)
        assert caught.value.details["field"] == "cron"
    schedule = await store.schedules.create(tenant.id, wf.id, "0 9 * * *", enabled=False)
    for changes in ({"cron": "0 0 30 2 *"}, {"cron": "0 0 0 31 4 *", "enabled": True}):
        with pytest.raises(ScheduleInvalid, match="never fires"):
            await store.schedules.update(tenant.id, schedule.id, changes)
    # A row saved before this validation existed: enabling it is refused, not a crash.
    async with store.engine.begin() as conn:
        await conn.execute(
            update(schedules).where(schedules.c.id == schedule.id).values(cron="0 0 30 2 *")
        )
    with pytest.raises(ScheduleInvalid, match="never fires") as enabling:
        await store.schedules.update(tenant.id, schedule.id, {"enabled": True})
    assert enabling.value.details["field"] == "cron"
    fixed = await store.schedules.update(
        tenant.id, schedule.id, {"enabled": True, "cron": "0 0 29 2 *"}
    )
    assert fixed.next_fire_at is not None and (
        fixed.next_fire_at.month,
        fixed.next_fire_at.day,
    ) == (2, 29)


async def test_seconds_last_cron_is_refused_with_the_seconds_first_spelling(store: Store) -> None:
    tenant = await store.tenants.create("acme")
    wf = await store.workflows.create(tenant.id, NOOP)
    with pytest.raises(ScheduleInvalid, match=r"did you mean '30 \*/5 \* \* \* \*'\?") as caught:
        await store.schedules.create(tenant.id, wf.id, "*/5 * * * * 30")
    assert caught.value.details["field"] == "cron"
    schedule = await store.schedules.create(tenant.id, wf.id, "30 */5 * * * *")
    assert schedule.next_fire_at is not None and schedule.next_fire_at.second == 30


async def test_materialise_records_ticks_ahead_once_and_an_edit_cancels_them(
    store: Store,
) -> None:
    tenant = await store.tenants.create("acme")
    wf = await store.workflows.create(tenant.id, NOOP)
    schedule = await store.schedules.create(tenant.id, wf.id, "* * * * * *")
    assert schedule.next_fire_at is not None
    first = schedule.next_fire_at + timedelta(seconds=30)  # ahead: nothing due yet
    await _set_next(store, schedule.id, first)
    (loaded,) = await store.schedules.due(first)
    ahead = [first + timedelta(seconds=i) for i in range(3)]
    missed = first - timedelta(seconds=1)
    plan = PlannedTicks(
        schedule=loaded,
        ticks=[(missed, "collapsed"), *((at, "fired") for at in ahead)],
        next_fire_at=ahead[-1] + timedelta(seconds=1),
    )
    # Two "leaders" materialise the same window at once: one set of ticks and executions.
    results = await asyncio.gather(*(store.schedules.materialise([plan]) for _ in range(3)))
    winners = [fired for fired, moved in results if moved]
    assert len(winners) == 1
    fired = winners[0]
    assert [t.fire_time for t in fired] == ahead
    assert all(t.execution is not None and t.execution.scheduled_for == t.fire_time
               for t in fired)  # fmt: skip
    listed = await store.schedules.ticks(tenant.id, loaded.id)
    assert [(t.fire_time, t.outcome) for t in listed] == [
        *((at, "fired") for at in reversed(ahead)),
        (missed, "collapsed"),
    ]
    assert [t.fire_time for t in await store.schedules.ticks(tenant.id, loaded.id, limit=2,
                                                            before=ahead[1])] == [ahead[0], missed]  # fmt: skip
    assert await store.schedules.ticks("other-tenant", loaded.id) == []
    execution_ids = [t.execution.id for t in fired if t.execution is not None]
    staged = await store.schedules.staged(first - timedelta(seconds=5))
    assert sorted(e.id for e in staged) == sorted(execution_ids)
    current = await store.schedules.get(tenant.id, loaded.id)
    assert current.next_fire_at == plan.next_fire_at and current.last_fired_at == ahead[-1]

    # A stale plan (the schedule moved since it was loaded) writes nothing.
    again, moved = await store.schedules.materialise([plan])
    assert again == [] and moved == set()

    # An edit cancels the ticks materialised ahead (and their executions)...
    edited = await store.schedules.update(tenant.id, loaded.id, {"cron": "*/2 * * * * *"})
    statuses = await store.executions.status_of(execution_ids)
    assert set(statuses.values()) == {"cancelled"}
    outcomes = {t.fire_time: t.outcome for t in await store.schedules.ticks(tenant.id, loaded.id)}
    assert [outcomes[at] for at in ahead] == ["cancelled"] * 3
    assert await store.schedules.staged(first - timedelta(seconds=5)) == []
    # ... and the new expression's ticks are recorded again, even at the same instants.
    even = [at for at in ahead if at.second % 2 == 0]
    await _set_next(store, loaded.id, even[0])
    (reloaded,) = await store.schedules.due(first + timedelta(seconds=5))
    assert reloaded.cron == edited.cron
    refired, _moved = await store.schedules.materialise(
        [PlannedTicks(reloaded, [(at, "fired") for at in even], even[-1] + timedelta(seconds=2))]
    )
    assert [t.fire_time for t in refired] == even
    outcomes = {t.fire_time: t.outcome for t in await store.schedules.ticks(tenant.id, loaded.id)}
    assert all(outcomes[at] == ("fired" if at in even else "cancelled") for at in ahead)

    # Deleting the schedule cancels what it materialised ahead.
    await store.schedules.delete(tenant.id, loaded.id)
    refired_ids = [t.execution.id for t in refired if t.execution is not None]
    assert set((await store.executions.status_of(refired_ids)).values()) == {"cancelled"}


async def _set_next(store: Store, schedule_id: str, at: datetime) -> None:
    async with store.engine.begin() as conn:
        await conn.execute(
            update(schedules).where(schedules.c.id == schedule_id).values(next_fire_at=at)
        )


async def _materialised(
    store: Store, tenant: str, wf: str, ahead_s: list[int]
) -> tuple[str, list[str]]:
    """A schedule with ticks recorded ``ahead_s`` seconds after its next fire time (as a
    scheduler pass does); ``(schedule id, their execution ids)``."""
    created = await store.schedules.create(tenant, wf, "* * * * * *")
    s = await store.schedules.get(tenant, created.id)
    assert s.next_fire_at is not None
    ticks = [(s.next_fire_at + timedelta(seconds=i), "fired") for i in ahead_s]
    plan = PlannedTicks(schedule=s, ticks=ticks, next_fire_at=ticks[-1][0] + timedelta(seconds=1))
    fired, _moved = await store.schedules.materialise([plan])
    return s.id, [f.execution.id for f in fired if f.execution is not None]


async def test_a_disabled_or_deleted_workflow_cancels_the_ticks_materialised_ahead(
    store: Store,
) -> None:
    """Ticks recorded ahead (their executions queued, due in seconds) of a workflow that is
    then disabled, or deleted, do not run: their executions are cancelled, as an edit or a
    deletion of the schedule itself cancels them."""
    tenant = (await store.tenants.create("acme")).id
    disabled = (await store.workflows.create(tenant, NOOP)).id
    deleted = (await store.workflows.create(tenant, NOOP)).id
    _s1, first = await _materialised(store, tenant, disabled, [5, 6, 7])
    _s2, second = await _materialised(store, tenant, deleted, [5, 6])
    await store.workflows.set_enabled(tenant, disabled, False)
    await store.workflows.delete(tenant, deleted)
    statuses = await store.executions.status_of([*first, *second])
    assert set(statuses.values()) == {"cancelled"}, statuses


async def test_an_edit_leaves_a_tick_whose_execution_started_fired(store: Store) -> None:
    """An edit cancels the ticks recorded ahead whose executions have not started; one whose
    instant passed while the edit waited for the schedule (its execution started) stays
    ``fired`` — marked cancelled, the next pass would record it again and it would fire twice."""
    tenant = (await store.tenants.create("acme")).id
    wf = (await store.workflows.create(tenant, NOOP)).id
    sid, (started, later) = await _materialised(store, tenant, wf, [5, 6])
    async with store.engine.begin() as conn:
        await conn.execute(
            update(executions).where(executions.c.id == started).values(status="running")
        )
    await store.schedules.update(tenant, sid, {"name": "renamed"})
    assert await store.executions.status_of([started, later]) == {
        started: "running",
        later: "cancelled",
    }
    outcomes = {t.execution_id: t.outcome for t in await store.schedules.ticks(tenant, sid)}
    assert outcomes[started] == "fired" and outcomes[later] == "cancelled"


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_a_schedule_deleted_during_a_pass_leaves_none_of_its_ticks_to_fire(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scheduler pass is recording a schedule's ticks (it holds the schedule's row) when
    the schedule is deleted: the deletion waits for the pass, then cancels what it recorded."""
    tenant = (await store.tenants.create("acme")).id
    wf = (await store.workflows.create(tenant, NOOP)).id
    created = await store.schedules.create(tenant, wf, "* * * * * *")
    s = await store.schedules.get(tenant, created.id)
    assert s.next_fire_at is not None
    ticks = [(s.next_fire_at + timedelta(seconds=i), "fired") for i in (3, 4, 5)]
    plan = PlannedTicks(schedule=s, ticks=ticks, next_fire_at=ticks[-1][0] + timedelta(seconds=1))
    inside = asyncio.Event()
    live = store.schedules._live_workflows

    async def slow_pass(conn: Any, ids: Any) -> Any:
        inside.set()
        await asyncio.sleep(0.5)  # the pass holds the schedule's row meanwhile
        return await live(conn, ids)

    monkeypatch.setattr(store.schedules, "_live_workflows", slow_pass)
    materialising = asyncio.create_task(store.schedules.materialise([plan]))
    await inside.wait()
    await store.schedules.delete(tenant, s.id)
    fired, _moved = await materialising
    ids = [f.execution.id for f in fired if f.execution is not None]
    assert len(ids) == 3
    assert set((await store.executions.status_of(ids)).values()) == {"cancelled"}


async def test_a_pass_planned_before_an_edit_records_nothing(store: Store) -> None:
    """A pass read the schedule, then an edit committed that leaves its next fire time where
    it was (its input): the pass's plan, made from the old input, is not applied — nothing
    recorded, the schedule not moved — and the next pass plans from the edited schedule."""
    tenant = (await store.tenants.create("acme")).id
    wf = (await store.workflows.create(tenant, NOOP)).id
    created = await store.schedules.create(tenant, wf, "0 0 1 1 *", input={"v": "old"})
    read = await store.schedules.get(tenant, created.id)  # what the pass's due() returned
    assert read.next_fire_at is not None
    await store.schedules.update(tenant, created.id, {"input": {"v": "new"}})
    stale = PlannedTicks(
        schedule=read,
        ticks=[(read.next_fire_at, "fired")],
        next_fire_at=read.next_fire_at + timedelta(days=365),
    )
    fired, moved = await store.schedules.materialise([stale])
    assert (fired, moved) == ([], set())
    edited = await store.schedules.get(tenant, created.id)
    assert edited.next_fire_at == read.next_fire_at and edited.input == {"v": "new"}
