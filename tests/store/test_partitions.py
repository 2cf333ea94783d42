"""PostgreSQL daily partitions of executions and step runs (migration 0013,
:mod:`conveyor.store.partitions`): a retention pass creates the days ahead and drops a day
once everything in it is due — never a day holding an unfinished execution or one a tenant
keeps longer, whose due rows go one by one instead; ids no partition covers land in the
default partition; idempotency keys hold across partitions. The clock is injected: nothing
sleeps. Each test has a database of its own (partitions outlive a truncate)."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select, text, update

from conveyor.errors import Conflict
from conveyor.store import Execution, Store, new_id
from conveyor.store.partitions import day_bound, day_of, partition_name
from conveyor.store.schema import execution_keys, executions
from conveyor.store.triggers import insert_values, new_execution
from conveyor.workers.retention import Retention
from tests.store import _retention_seed as seed
from tests.store._fixtures import settings_for

D = date(2031, 3, 10)
T = datetime(2031, 3, 10, 9, 0, tzinfo=UTC)
DAY = timedelta(days=1)
HOUR = timedelta(hours=1)


class Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


def _retention(store: Store, clock: Clock) -> Retention:
    async def sleep(seconds: float) -> None:
        return None

    return Retention(store, store.settings, clock=clock, sleep=sleep)


async def _names(store: Store) -> set[str]:
    return {p.name for p in await store.partitions.list()}


async def _home(store: Store, execution_id: str) -> str:
    """The partition that holds ``execution_id``."""
    async with store.engine.connect() as conn:
        found = await conn.execute(
            text("SELECT tableoid::regclass::text FROM executions WHERE id = :id"),
            {"id": execution_id},
        )
        return str(found.scalar_one())


def _days(first: date, n: int) -> list[date]:
    return [first + timedelta(days=i) for i in range(n)]


async def _orphans(store: Store) -> int:
    """Step runs whose execution is gone (no foreign key refuses them: migration 0014)."""
    async with store.engine.connect() as conn:
        found = await conn.execute(text(
            "SELECT count(*) FROM step_runs s "
            "WHERE NOT EXISTS (SELECT 1 FROM executions e WHERE e.id = s.execution_id)"))  # fmt: skip
        return int(found.scalar_one())


def test_day_bounds_follow_new_id() -> None:
    at = datetime(2031, 3, 10, 23, 59, 59, 999000, tzinfo=UTC)
    eid = new_id(at)
    assert day_of(eid) == D
    assert day_bound(D) <= eid < day_bound(D + DAY)
    assert day_bound(D + DAY) <= new_id(at + timedelta(milliseconds=1))
    assert day_of("not-an-id") is None and day_of("e") is None


async def test_days_ahead_created_and_due_days_dropped_on_time(pg: Store) -> None:
    clock = Clock(T)
    retention = _retention(pg, clock)
    first = await retention.run_pass()
    expected = {partition_name(t, d) for t in ("executions", "step_runs") for d in _days(D, 4)}
    assert set(first.partitions_created) == expected and expected <= await _names(pg)
    assert (await retention.run_pass()).partitions_created == []  # already there

    a = await seed.tenant(pg, "acme", T - 60 * DAY)  # the 14-day default
    b = await seed.tenant(pg, "bank", T - 60 * DAY)
    await pg.retention.set_override(b.id, retention_s=30 * 86400, max_executions=None)

    def at(day: int) -> datetime:
        return T + day * DAY

    # day D: all finished (one with a timer and its tick)
    a1 = await seed.execution(pg, a, "succeeded", created=at(0), finished=at(0) + HOUR,
                              timer=True, tick=True, id_at=at(0))  # fmt: skip
    a2 = await seed.execution(pg, a, "failed", created=at(0), finished=at(0) + HOUR, id_at=at(0))
    # day D+1: one waiting for a month, one finished
    a3 = await seed.execution(pg, a, "waiting", created=at(1), timer=True, id_at=at(1))
    a4 = await seed.execution(pg, a, "succeeded", created=at(1), finished=at(1) + HOUR,
                              id_at=at(1))  # fmt: skip
    # day D+2: bank keeps 30 days; acme's goes after 14
    b1 = await seed.execution(pg, b, "succeeded", created=at(2), finished=at(2) + HOUR,
                              id_at=at(2))  # fmt: skip
    a5 = await seed.execution(pg, a, "cancelled", created=at(2), finished=at(2) + HOUR,
                              id_at=at(2))  # fmt: skip
    assert await _home(pg, a1) == partition_name("executions", D)
    assert await _home(pg, b1) == partition_name("executions", D + 2 * DAY)

    clock.at = at(14)  # nothing is 14 days old yet
    report = await retention.run_pass()
    assert report.partitions_dropped == [] and report.pruned.total == 0
    assert set(first.partitions_created) <= await _names(pg)

    clock.at = at(16) + 12 * HOUR
    assert await retention.plan_days() == [D]  # the dry run (conveyor prune --dry-run)
    assert partition_name("executions", D) in await _names(pg)
    report = await retention.run_pass()
    assert report.partitions_dropped == [D]  # D+1: a waiting execution; D+2: bank's
    names = await _names(pg)
    assert partition_name("executions", D) not in names
    assert partition_name("step_runs", D) not in names
    assert {partition_name(t, D + DAY) for t in ("executions", "step_runs")} <= names
    assert {partition_name("executions", d) for d in _days(D + 16 * DAY, 4)} <= names  # ahead
    assert await seed.ids(pg) == {a3, b1}  # a4 and a5 went row by row
    assert report.pruned.as_dict() == {
        "executions": 4, "step_runs": 8, "timers": 1, "schedule_ticks": 1,
    }  # fmt: skip
    assert report.tenants[a.id].executions == 4 and b.id not in report.tenants
    for gone in (a1, a2, a4, a5):
        assert await seed.children(pg, gone) == (0, 0, 0)
    assert await _orphans(pg) == 0
    assert await seed.children(pg, a3) == (2, 1, 0)

    clock.at = at(33)  # bank's execution is 31 days old: D+2 goes; D+1 still waits
    report = await retention.run_pass()
    assert D + 2 * DAY in report.partitions_dropped and D + DAY not in report.partitions_dropped
    assert await seed.ids(pg) == {a3}
    assert partition_name("executions", D + DAY) in await _names(pg)

    async with pg.engine.begin() as conn:  # the month-long wait ends
        await conn.execute(
            update(executions)
            .where(executions.c.id == a3)
            .values(status="succeeded", finished_at=at(33))
        )
    clock.at = at(47) + HOUR
    report = await retention.run_pass()
    assert D + DAY in report.partitions_dropped and await seed.ids(pg) == set()
    assert partition_name("executions", D + DAY) not in await _names(pg)
    assert await seed.count(pg, executions) == 0


async def test_a_day_without_its_own_step_runs_partition_takes_its_step_runs_along(
    pg: Store,
) -> None:
    """A day whose step runs are not in a partition of their own (it was dropped by hand, or
    made with other bounds): they are deleted by id range when the day's executions go, since
    no foreign key cascades to them; a step_runs partition of other bounds is not dropped."""
    clock = Clock(T)
    retention = _retention(pg, clock)
    await retention.run_pass()
    steps_d, steps_d1 = partition_name("step_runs", D), partition_name("step_runs", D + DAY)
    async with pg.engine.begin() as conn:  # D: no step_runs partition; D+1: one for D+1, D+2
        for name in (steps_d, steps_d1, partition_name("step_runs", D + 2 * DAY)):
            await conn.execute(text(f"ALTER TABLE step_runs DETACH PARTITION {name}"))
            await conn.execute(text(f"DROP TABLE {name}"))
        await conn.execute(text(
            f"CREATE TABLE {steps_d1} PARTITION OF step_runs FOR VALUES FROM "
            f"('{day_bound(D + DAY)}') TO ('{day_bound(D + 3 * DAY)}')"))  # fmt: skip
    a = await seed.tenant(pg, "acme", T - 60 * DAY)
    done = [
        await seed.execution(pg, a, "succeeded", created=T + i * DAY, finished=T + i * DAY,
                             steps=3, id_at=T + i * DAY)
        for i in (0, 0, 1)
    ]  # fmt: skip
    keep = await seed.execution(pg, a, "waiting", created=T + 2 * DAY, steps=2,
                                id_at=T + 2 * DAY)  # fmt: skip

    clock.at = T + 17 * DAY
    report = await retention.run_pass()
    assert D in report.partitions_dropped and D + DAY in report.partitions_dropped
    assert await seed.ids(pg) == {keep}
    assert report.pruned.executions == 3 and report.pruned.step_runs == 9
    assert await _orphans(pg) == 0
    assert steps_d1 in await _names(pg)  # D+1's executions went; D+2's step runs live there
    assert await seed.children(pg, keep) == (2, 0, 0)
    for gone in done:
        assert await seed.children(pg, gone) == (0, 0, 0)


async def test_a_leased_execution_keeps_its_day(pg: Store) -> None:
    clock = Clock(T)
    retention = _retention(pg, clock)
    await retention.run_pass()
    a = await seed.tenant(pg, "acme", T - 60 * DAY)
    kept = await seed.execution(pg, a, "cancelled", created=T, finished=T, id_at=T,
                                lease_until=T + 30 * DAY)  # fmt: skip
    clock.at = T + 20 * DAY
    report = await retention.run_pass()
    assert D not in report.partitions_dropped and await seed.ids(pg) == {kept}
    assert D + DAY in report.partitions_dropped  # empty days ahead of it, once due, go
    clock.at = T + 31 * DAY  # the worker let go (its lease expired)
    report = await retention.run_pass()
    assert D in report.partitions_dropped and await seed.ids(pg) == set()


async def test_a_child_whose_parent_waits_keeps_its_day(pg: Store) -> None:
    """A foreach item (or branch, or sub-workflow) finished long ago stays while its parent,
    created a day later, still waits: the parent reads it when it joins."""
    clock = Clock(T)
    retention = _retention(pg, clock)
    await retention.run_pass()
    a = await seed.tenant(pg, "acme", T - 60 * DAY)
    parent = await seed.execution(pg, a, "waiting", created=T + DAY, id_at=T + DAY)
    child = await seed.execution(pg, a, "succeeded", created=T, finished=T, id_at=T,
                                 parent=parent)  # fmt: skip
    clock.at = T + 20 * DAY
    report = await retention.run_pass()
    assert D not in report.partitions_dropped and await seed.ids(pg) == {parent, child}
    async with pg.engine.begin() as conn:  # the parent joins and ends
        await conn.execute(
            update(executions)
            .where(executions.c.id == parent)
            .values(status="succeeded", finished_at=T + DAY)
        )
    report = await retention.run_pass()
    assert {D, D + DAY} <= set(report.partitions_dropped) and await seed.ids(pg) == set()


async def test_ids_no_day_covers_go_to_default_and_a_late_day_starts_above_them(
    pg: Store,
) -> None:
    a = await seed.tenant(pg, "acme", T)
    early = await seed.execution(pg, a, "queued", created=T, id_at=T, steps=1)
    odd = await seed.execution(pg, a, "queued", created=T, steps=0)
    async with pg.engine.begin() as conn:  # an id that is not a time-ordered one
        await conn.execute(update(executions).where(executions.c.id == odd).values(id="e-1"))
    assert await _home(pg, early) == "executions_default"
    assert await _home(pg, "e-1") == "executions_default"

    created = await pg.partitions.ensure(T, 0)  # late: D's rows are in default already
    assert set(created) == {partition_name("executions", D), partition_name("step_runs", D)}
    day = next(p for p in await pg.partitions.list() if p.name == partition_name("executions", D))
    assert day.lower is not None and day.lower > early and day.upper == day_bound(D + DAY)
    later = await seed.execution(pg, a, "queued", created=T, id_at=T + HOUR)
    assert await _home(pg, later) == partition_name("executions", D)
    assert await _home(pg, early) == "executions_default"  # stays, still readable
    assert (await pg.executions.get(a.id, early, with_steps=True)).steps[0].step_id == "s0"


async def test_idempotency_keys_hold_across_partitions(pg: Store) -> None:
    a = await seed.tenant(pg, "acme", T)
    await pg.partitions.ensure(T, 2)

    def make(at: datetime, key: str = "k-1") -> Execution:
        return new_execution(tenant_id=a.id, workflow_id=a.workflow_id, version=1, region="us",
                             input=None, triggered_by="api", now=at, idempotency_key=key,
                             execution_id=new_id(at))  # fmt: skip

    first, second = make(T), make(T + DAY)
    assert day_of(first.id) != day_of(second.id)
    assert await pg.statements.insert_execution(first) is True
    assert await pg.statements.insert_execution(second) is False  # another day, same key
    found = await pg.statements.execution_by_key(a.id, "k-1")
    assert found is not None and found.id == first.id
    async with pg.engine.begin() as conn:  # any INSERT of a taken key inserts nothing
        third = make(T + 2 * DAY)
        result = await conn.execute(executions.insert().values(insert_values(third)))
        assert result.rowcount == 0
    assert await seed.ids(pg) == {first.id}

    # a retry's key: the retry is made once, in today's partition; asked again, replayed
    async with pg.engine.begin() as conn:
        await conn.execute(
            update(executions).where(executions.c.id == first.id).values(status="failed")
        )
    retry, created = await pg.executions.retry_from(a.id, first.id, idempotency_key="r-1")
    again, created_again = await pg.executions.retry_from(a.id, first.id, idempotency_key="r-1")
    assert created and not created_again and again.id == retry.id
    with pytest.raises(Conflict):  # a key used for something else
        await pg.executions.retry_from(a.id, first.id, idempotency_key="k-1")

    async with pg.engine.begin() as conn:  # the execution goes: its key is free again
        await conn.execute(executions.delete().where(executions.c.id == first.id))
    assert await pg.statements.insert_execution(second) is True
    async with pg.engine.connect() as conn:
        keys = (await conn.execute(select(execution_keys.c.idempotency_key,
                                          execution_keys.c.execution_id))).all()  # fmt: skip
    assert sorted(map(tuple, keys)) == sorted([("k-1", second.id), ("r-1", retry.id)])


# --- the in-place migration ------------------------------------------------------------------
_SUMS = {
    "executions": "SELECT count(*), md5(string_agg(x::text, '|' ORDER BY x.id)) FROM executions x",
    "step_runs": "SELECT count(*), md5(string_agg(x::text, '|' ORDER BY x.execution_id, x.seq)) "
    "FROM step_runs x",
    "timers": "SELECT count(*), md5(string_agg(x::text, '|' ORDER BY x.id)) FROM timers x",
    "events": "SELECT count(*), md5(string_agg(x::text, '|' ORDER BY x.id)) FROM events x",
    "event_waits": "SELECT count(*), md5(string_agg(x::text, '|' ORDER BY x.execution_id)) "
    "FROM event_waits x",
    "schedule_ticks": "SELECT count(*), md5(string_agg(x::text, '|' ORDER BY x.fire_time)) "
    "FROM schedule_ticks x",
}


async def _sums(store: Store) -> dict[str, tuple[object, ...]]:
    """Per table: rows and the md5 of all of them (every column, in order)."""
    async with store.engine.connect() as conn:
        return {t: tuple((await conn.execute(text(q))).one()) for t, q in _SUMS.items()}


async def _relkind(store: Store, table: str) -> str:
    async with store.engine.connect() as conn:
        found = await conn.execute(text("SELECT relkind::text FROM pg_class WHERE relname = :t"),
                                   {"t": table})  # fmt: skip
        return str(found.scalar_one())


async def _seed_0011(store: Store, days: list[datetime]) -> None:
    """Per day 40 executions (two step runs each, a timer for every 4th, a key for every 10th (from the 5th),
    one waiting on an event with one event and the tick that created it), and one execution
    whose id is not time-ordered — written at revision 0012."""
    a = await seed.tenant(store, "acme", T - 60 * DAY)
    for i, at in enumerate(days):
        for n in range(40):
            eid = await seed.execution(store, a, "succeeded" if n else "waiting", created=at,
                                       finished=None if n == 0 else at, timer=n % 4 == 1,
                                       tick=n == 0, id_at=at + n * HOUR / 6)  # fmt: skip
            if n % 10 == 5:
                async with store.engine.begin() as conn:
                    await conn.execute(update(executions).where(executions.c.id == eid)
                                       .values(idempotency_key=f"key-{i}-{n}"))  # fmt: skip
            if n == 0:
                async with store.engine.begin() as conn:
                    await conn.execute(text(
                        "INSERT INTO events (id, tenant_id, workflow_id, execution_id, name, "
                        "payload, source, received_at) VALUES (:id, :t, :w, :e, 'paid', "
                        "'{\"n\": 1}', 'api', :at)"), {"id": new_id(at), "t": a.id,
                        "w": a.workflow_id, "e": eid, "at": at})  # fmt: skip
                    await conn.execute(text(
                        "INSERT INTO event_waits (execution_id, tenant_id, workflow_id, name, "
                        "seq, created_at) VALUES (:e, :t, :w, 'paid', 1, :at)"),
                        {"t": a.id, "w": a.workflow_id, "e": eid, "at": at})  # fmt: skip
    legacy = await seed.execution(store, a, "succeeded", created=T, finished=T)
    async with store.engine.begin() as conn:  # step runs and timer follow (ON UPDATE: none)
        await conn.execute(text("ALTER TABLE step_runs DROP CONSTRAINT "
                                "fk_step_runs_execution_id_executions"))  # fmt: skip
        await conn.execute(text("UPDATE step_runs SET execution_id = 'e' WHERE execution_id = :i"),
                           {"i": legacy})  # fmt: skip
        await conn.execute(update(executions).where(executions.c.id == legacy).values(id="e"))
        await conn.execute(text(
            "ALTER TABLE step_runs ADD CONSTRAINT fk_step_runs_execution_id_executions "
            "FOREIGN KEY (execution_id) REFERENCES executions (id) ON DELETE CASCADE"))  # fmt: skip


async def test_0013_partitions_in_place_keeping_every_row(fresh_pg_url: str) -> None:
    from tests.store.test_migrations import _at

    days = [T + i * DAY for i in (0, 1, 2, 5, 9)]
    async with Store(settings_for(fresh_pg_url), pool_size=2, fast_path=False) as store:
        await _at(store, "upgrade", "0012")
        await _seed_0011(store, days)
        before = await _sums(store)
        assert before["executions"][0] == 5 * 40 + 1 and before["step_runs"][0] == 2 * 201
        assert before["events"][0] == before["event_waits"][0] == 5

        await store.migrate()
        await store.check_schema()
        assert await _sums(store) == before
        assert await _relkind(store, "executions") == await _relkind(store, "step_runs") == "p"
        names = await _names(store)
        for at in days:  # a partition per day with executions, with that day's rows
            day = at.date()
            assert {partition_name("executions", day), partition_name("step_runs", day)} <= names
            async with store.engine.connect() as conn:
                n = await conn.execute(
                    text(f"SELECT count(*) FROM {partition_name('executions', day)}")
                )
                assert n.scalar_one() == 40
        today = datetime.now(UTC).date()  # and today to 3 days ahead
        assert {partition_name("executions", d) for d in _days(today, 4)} <= names
        assert await _home(store, "e") == "executions_default"
        assert await seed.count(store, execution_keys) == 20
        with pytest.raises(Conflict):  # the foreign keys hold
            async with store.executions._tx() as conn:
                await conn.execute(text(
                    "INSERT INTO timers (id, tenant_id, execution_id, workflow_id, region, seq, "
                    "due_at, status, created_at) SELECT 'x', tenant_id, 'nope', workflow_id, 'us', "
                    "0, now(), 'pending', now() FROM executions LIMIT 1"))  # fmt: skip

        await _at(store, "downgrade", "0012")  # back to plain tables, every row kept
        assert await _sums(store) == before
        assert await _relkind(store, "executions") == "r"
        assert not any(n.startswith("executions_p") for n in await _names(store))
        await store.migrate()
        assert await _sums(store) == before


async def test_0013_on_sqlite_adds_only_the_keys_table(tmp_path: Path) -> None:
    from tests.store.test_migrations import _at

    async with Store(settings_for(f"sqlite:///{tmp_path}/c.db"), pool_size=1) as store:
        await _at(store, "upgrade", "0012")
        a = await seed.tenant(store, "acme", T)
        eid = await seed.execution(store, a, "succeeded", created=T, finished=T, id_at=T)
        await store.migrate()
        await store.check_schema()
        assert await seed.ids(store) == {eid} and await seed.count(store, execution_keys) == 0
        assert await store.partitions.list() == []
        await _at(store, "downgrade", "0012")
        assert await seed.ids(store) == {eid}
