"""``store.insights``, the operators' cross-tenant reads, on SQLite and PostgreSQL: the search
of executions by every filter with cursor pages, the last hour's activity per minute (both
backends give the same figures), the next due timers and a workflow's versions."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import update

from conveyor.store import ExecutionFilter, Store, new_id, utcnow
from conveyor.store.insights import percentile
from conveyor.store.schema import executions, timers

NOOP: dict[str, Any] = {"name": "noop", "steps": [{"id": "a", "type": "noop"}]}


async def _setup(store: Store) -> dict[str, Any]:
    a = await store.tenants.create("a")
    b = await store.tenants.create("b")
    wa1 = (await store.workflows.create(a.id, NOOP)).id
    wa2 = (await store.workflows.create(a.id, {**NOOP, "name": "two"})).id
    wb = (await store.workflows.create(b.id, NOOP)).id
    ids: dict[str, list[str]] = {"a1": [], "a2": [], "b": []}
    for key, tenant, workflow in (("a1", a.id, wa1), ("a2", a.id, wa2), ("b", b.id, wb)):
        for _ in range(3):
            execution, _created = await store.executions.create(tenant, workflow, {"n": 1})
            ids[key].append(execution.id)
    return {"a": a.id, "b": b.id, "wa1": wa1, "wa2": wa2, "wb": wb, "ids": ids}


async def _search(store: Store, limit: int = 50, **where: Any) -> list[str]:
    page = await store.insights.search_executions(ExecutionFilter(**where), limit=limit)
    return [e.id for e in page.items]


async def test_search_by_every_filter(store: Store) -> None:
    s = await _setup(store)
    ids = s["ids"]
    everything = [*ids["a1"], *ids["a2"], *ids["b"]][::-1]
    assert await _search(store) == everything
    assert await _search(store, tenant_id=s["a"]) == [*ids["a1"], *ids["a2"]][::-1]
    assert await _search(store, workflow_id=s["wa2"]) == ids["a2"][::-1]
    assert await _search(store, workflow_id=s["wa2"], tenant_id=s["b"]) == []
    assert await _search(store, workflow_id="absent") == []
    await store.executions.cancel(s["b"], ids["b"][1])
    assert await _search(store, status="cancelled") == [ids["b"][1]]
    assert await _search(store, tenant_id=s["a"], status="cancelled") == []
    created = (await store.executions.get(s["a"], ids["a2"][0])).created_at
    assert await _search(store, since=created, until=created + timedelta(microseconds=1)) == [
        ids["a2"][0]
    ]
    assert await _search(store, until=created) == ids["a1"][::-1]
    tenant_names, workflow_names = await store.insights.names([s["a"], "absent"], [s["wa2"]])
    assert tenant_names == {s["a"]: "a"} and workflow_names == {s["wa2"]: "two"}
    assert await store.insights.names([], []) == ({}, {})


async def test_search_by_schedule_and_cursor_pages(store: Store) -> None:
    s = await _setup(store)
    schedule = await store.schedules.create(s["a"], s["wa1"], cron="* * * * *", timezone="UTC")
    async with store.engine.begin() as conn:
        await conn.execute(
            update(executions)
            .where(executions.c.id.in_(s["ids"]["a1"][:2]))
            .values(schedule_id=schedule.id)
        )
    assert await _search(store, schedule_id=schedule.id) == s["ids"]["a1"][:2][::-1]
    assert await _search(store, schedule_id=schedule.id, workflow_id=s["wa2"]) == []
    assert await _search(store, schedule_id=schedule.id, tenant_id=s["b"]) == []
    seen: list[str] = []
    cursor = None
    while True:
        page = await store.insights.search_executions(ExecutionFilter(), limit=4, cursor=cursor)
        seen += [e.id for e in page.items]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == await _search(store) and len(seen) == 9


async def test_activity_per_minute_is_the_same_on_both_backends(store: Store) -> None:
    s = await _setup(store)
    now = utcnow()
    minute = now.replace(second=0, microsecond=0)
    plan = [  # (execution, queued, started after ms, finished, status)
        (s["ids"]["a1"][0], minute - timedelta(minutes=5), 10, "succeeded"),
        (s["ids"]["a1"][1], minute - timedelta(minutes=5), 30, "failed"),
        (s["ids"]["a1"][2], minute - timedelta(minutes=5), 50, "succeeded"),
        (s["ids"]["a2"][0], minute, 20, None),
        (s["ids"]["b"][0], minute - timedelta(hours=2), 5, "succeeded"),  # before the hour
    ]
    # A schedule's tick recorded 8 s ahead of its instant: runnable at the instant.
    tick = minute - timedelta(minutes=1)
    ahead = {"queued_at": tick - timedelta(seconds=8), "created_at": tick - timedelta(seconds=8),
             "scheduled_for": tick, "started_at": tick + timedelta(milliseconds=7),
             "status": "running"}  # fmt: skip
    async with store.engine.begin() as conn:
        for execution_id, queued, after_ms, status in plan:
            started = queued + timedelta(milliseconds=after_ms)
            values: dict[str, Any] = {"queued_at": queued, "started_at": started,
                                      "created_at": queued, "status": status or "running"}  # fmt: skip
            if status:
                values["finished_at"] = started + timedelta(seconds=1)
            await conn.execute(
                update(executions).where(executions.c.id == execution_id).values(**values)
            )
        await conn.execute(
            update(executions).where(executions.c.id == s["ids"]["b"][1]).values(**ahead)
        )
    activity = await store.insights.activity(now)
    assert len(activity.minutes) == 60 and activity.minutes[-1] == minute
    assert activity.started[-6] == 3 and activity.started[-1] == 1 and sum(activity.started) == 5
    assert activity.p50_ms[-2] == pytest.approx(7.0)
    assert activity.succeeded[-6] == 2 and activity.failed[-6] == 1
    assert activity.p50_ms[-6] == pytest.approx(30.0)
    assert activity.p99_ms[-6] == pytest.approx(49.6)
    assert activity.p50_ms[-1] == pytest.approx(20.0) and activity.p50_ms[-3] is None


async def test_upcoming_timers_and_versions(store: Store) -> None:
    s = await _setup(store)
    now = utcnow()
    async with store.engine.begin() as conn:
        for i, (status, after_s) in enumerate([("pending", 30), ("pending", 10), ("fired", 1)]):
            await conn.execute(
                timers.insert().values(
                    id=new_id(), tenant_id=s["a"], execution_id=s["ids"]["a1"][i],
                    workflow_id=s["wa1"], region="us", seq=0, status=status,
                    due_at=now + timedelta(seconds=after_s), created_at=now,
                )
            )  # fmt: skip
    upcoming = await store.insights.upcoming_timers(5)
    assert [t.execution_id for t in upcoming] == [s["ids"]["a1"][1], s["ids"]["a1"][0]]
    await store.workflows.update(s["a"], s["wa1"], {**NOOP, "name": "renamed"})
    versions = await store.insights.versions(s["a"], s["wa1"])
    assert [v.version for v in versions] == [2, 1]
    assert await store.insights.versions(s["b"], s["wa1"]) == []


@pytest.mark.parametrize(
    ("q", "values", "expected"),
    [(0.5, [1.0, 2.0, 3.0, 4.0], 2.5), (0.99, [float(i) for i in range(1, 101)], 99.01),
     (0.5, [7.0], 7.0), (0.5, [], None)],
)  # fmt: skip
def test_percentile_interpolates_like_postgres(
    q: float, values: list[float], expected: float | None
) -> None:
    assert percentile(values, q) == (pytest.approx(expected) if expected is not None else None)
