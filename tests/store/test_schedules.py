"""Schedules: validation, next fire times (time zones, DST), exactly-once ticks, scoping."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from conveyor.errors import NotFound, ScheduleInvalid
from conveyor.store import Store, next_fire_time, utcnow

NOOP = {"name": "wf", "steps": [{"id": "a", "type": "noop"}]}


def test_next_fire_time_time_zones_and_dst() -> None:
    after = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert next_fire_time("0 9 * * *", "Europe/Berlin", after) == datetime(
        2025, 1, 2, 8, 0, tzinfo=UTC
    )
    # croniter: the optional 6th field is seconds.
    assert next_fire_time("* * * * * */10", "UTC", after) == after.replace(second=10)
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
    assert execution.input == {"k": 1}
    listed = await store.executions.list(tenant.id)
    assert [e.id for e in listed.items] == [execution.id]
    assert await store.schedules.ticks(tenant.id, schedule.id) == [(tick, execution.id)]
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
