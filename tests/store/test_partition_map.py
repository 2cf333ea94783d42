"""The run store's batches on the daily partitions (:class:`conveyor.store.pg.runs.PartitionMap`):
a batch whose executions one day's partitions hold is sent on those partitions (planned for one
table, not for every partition), and writes exactly what the statement on the parent tables
writes; a batch over two days, ids in the default partition, a day created after the map was
read and a day dropped since all go to the parent tables — nothing is ever written to a guess,
nothing is lost. Each test has a database of its own (partitions outlive a truncate)."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, date, datetime, timedelta

from sqlalchemy import text

from conveyor.errors import DatabaseUnavailable, LeaseLost, StoreError
from conveyor.store import Claim, ExecutionWrite, StepWrite, Store
from conveyor.store.partitions import partition_name
from conveyor.store.pg import PgRunStore
from conveyor.store.pg.runs import _CLAIM_MANY, _WRITE_MANY
from tests.store import _retention_seed as seed
from tests.store._fixtures import row_trigger

D = date(2031, 3, 10)
T = datetime(2031, 3, 10, 9, 0, tzinfo=UTC)
DAY = timedelta(days=1)
LEASE = timedelta(seconds=30)


def _succeeded_on(day: date) -> tuple[str, str, str]:
    """What :func:`_homes` says of an execution of ``day`` claimed and written in full."""
    return partition_name("executions", day), "succeeded", partition_name("step_runs", day)


def _runs(store: Store) -> PgRunStore:
    assert isinstance(store.runs, PgRunStore)
    return store.runs


async def _queued(store: Store, owner: seed.Tenant, at: datetime, n: int) -> list[str]:
    return sorted(
        [await seed.execution(store, owner, "queued", created=at, id_at=at, steps=0)
         for _ in range(n)]
    )  # fmt: skip


async def _claim_all(runs: PgRunStore, ids: list[str]) -> list[Claim]:
    claims = await asyncio.gather(*(runs.claim(e, T, T + LEASE) for e in ids))
    assert all(c is not None for c in claims)
    return [c for c in claims if c is not None]


async def _finish_all(runs: PgRunStore, claims: list[Claim]) -> list[str]:
    def write(claim: Claim) -> ExecutionWrite:
        return ExecutionWrite(status="succeeded", next_step=1, steps_run=1, now=T,
                              lease_expires_at=None, output={"n": 1}, output_json='{"n":1}',
                              finished_at=T)  # fmt: skip

    def step(claim: Claim) -> StepWrite:
        return StepWrite(seq=0, step_id="s", step_type="noop", status="succeeded", attempts=1,
                         input=None, input_json=None, output={"id": claim.execution_id},
                         output_json=f'{{"id":"{claim.execution_id}"}}', output_truncated=False,
                         error=None, error_json=None, started_at=T, finished_at=T)  # fmt: skip

    return list(await asyncio.gather(*(runs.write(c, write(c), [step(c)]) for c in claims)))


async def _homes(store: Store, ids: list[str]) -> dict[str, tuple[str, str, str | None]]:
    """id -> (its executions partition, its status, its step run's partition)."""
    async with store.engine.connect() as conn:
        rows = await conn.execute(
            text(
                "SELECT e.id, e.tableoid::regclass::text, e.status, s.tableoid::regclass::text "
                "FROM executions e LEFT JOIN step_runs s ON s.execution_id = e.id "
                "WHERE e.id = ANY(:ids)"
            ),
            {"ids": ids},
        )
        return {r[0]: (r[1], r[2], r[3]) for r in rows}


async def test_a_batch_of_one_days_executions_is_sent_on_that_days_partitions(
    pg: Store,
) -> None:
    await pg.partitions.ensure(T, 1)
    owner = await seed.tenant(pg, "acme", T)
    today = await _queued(pg, owner, T, 3)
    tomorrow = await _queued(pg, owner, T + DAY, 1)
    runs = _runs(pg)
    executions, step_runs = partition_name("executions", D), partition_name("step_runs", D)
    assert await runs.partitions.holding("executions", today[0], today[-1]) == executions
    assert await runs.partitions.holding("step_runs", today[0], today[-1]) == step_runs
    assert await runs.partitions.holding("executions", today[0], tomorrow[0]) is None
    on_day = await runs._statement(_WRITE_MANY, today)
    assert f'UPDATE "{executions}" e' in on_day and f'INSERT INTO "{step_runs}" ' in on_day
    assert await runs._statement(_WRITE_MANY, [today[0], tomorrow[0]]) is _WRITE_MANY
    assert f'UPDATE "{executions}" e' in await runs._statement(_CLAIM_MANY, today[:2])
    odd = [today[0], today[0][:-1] + "Z", today[-1]]  # not an id new_id makes: the parent
    assert await runs._statement(_CLAIM_MANY, odd) is _CLAIM_MANY

    # one day's batch and a batch over two days: both claimed and written in full
    batches = runs.claims.batches, runs.writes.batches
    runs._targeted.clear()
    claims = await _claim_all(runs, today)
    assert await _finish_all(runs, claims) == ["succeeded"] * 3
    assert set(runs._targeted) == {
        (_CLAIM_MANY, executions, None),
        (_WRITE_MANY, executions, step_runs),
    }, "the day's batches were sent on its partitions"
    both = await _claim_all(runs, [*tomorrow, *(await _queued(pg, owner, T, 1))])
    assert await _finish_all(runs, both) == ["succeeded"] * 2
    assert (runs.claims.batches, runs.writes.batches) == (batches[0] + 2, batches[1] + 2)
    homes = await _homes(pg, [*today, *[c.execution_id for c in both]])
    assert len(homes) == 5 and all(status == "succeeded" for _e, status, _s in homes.values())
    for eid in today:
        assert homes[eid] == _succeeded_on(D) == (executions, "succeeded", step_runs)
    assert homes[tomorrow[0]] == _succeeded_on(D + DAY)


async def test_ids_of_the_default_partition_and_of_a_day_created_since_go_to_the_parent(
    pg: Store,
) -> None:
    owner = await seed.tenant(pg, "acme", T)
    early = await _queued(pg, owner, T, 2)  # no day yet: the default partition
    runs = _runs(pg)
    assert await runs.partitions.holding("executions", early[0], early[-1]) is None
    await pg.partitions.ensure(T + DAY, 0)  # created after the map was read
    later = await _queued(pg, owner, T + DAY, 2)
    assert await runs._statement(_CLAIM_MANY, later) is _CLAIM_MANY

    assert await _finish_all(runs, await _claim_all(runs, early)) == ["succeeded"] * 2
    assert await _finish_all(runs, await _claim_all(runs, later)) == ["succeeded"] * 2
    homes = await _homes(pg, [*early, *later])
    assert {homes[e] for e in early} == {("executions_default", "succeeded", "step_runs_default")}
    day = _succeeded_on(D + DAY)
    assert {homes[e] for e in later} == {day}

    runs.partitions._due = 0.0  # read again (every refresh_s): the new day is known
    assert await runs.partitions.holding("executions", later[0], later[-1]) == day[0]


async def test_a_day_dropped_since_the_map_was_read_is_refused_and_sent_to_the_parent(
    pg: Store,
) -> None:
    await pg.partitions.ensure(T, 0)
    owner = await seed.tenant(pg, "acme", T)
    gone = await _queued(pg, owner, T, 2)
    runs = _runs(pg)
    claims = await _claim_all(runs, gone)
    assert await runs.partitions.holding("executions", gone[0], gone[-1]) is not None
    async with pg.engine.begin() as conn:  # gone (a retention pass detaches, then drops)
        for table in ("step_runs", "executions"):
            await conn.execute(text(f"DROP TABLE {partition_name(table, D)} CASCADE"))

    # the batch on the dropped day's partitions fails; sent again on the parent tables, each
    # execution is told what the parent says: it is gone (nothing written, nothing raised
    # but that)
    results = await asyncio.gather(
        *(runs.write(c, ExecutionWrite(status="succeeded", next_step=1, steps_run=1, now=T,
                                       lease_expires_at=None, finished_at=T), [])
          for c in claims),
        return_exceptions=True,
    )  # fmt: skip
    assert [type(r) for r in results] == [LeaseLost, LeaseLost]
    # refused: the parent tables for a while (one failure a minute if partitions cannot be
    # named, not one a batch), then the catalog is read again
    assert await runs.partitions.holding("executions", gone[0], gone[-1]) is None
    assert runs.partitions._due > time.monotonic() + runs.partitions.refresh_s - 5


async def test_a_wrong_map_costs_a_statement_never_a_row(pg: Store) -> None:
    """Whatever the map says — a day dropped and made again with other bounds, ids whose order
    the database's collation sees otherwise — the executions a statement on the named
    partitions did not find are asked again on the parent tables: claimed and written."""
    await pg.partitions.ensure(T, 1)
    owner = await seed.tenant(pg, "acme", T)
    today = await _queued(pg, owner, T, 3)
    runs = _runs(pg)
    assert await runs.partitions.holding("executions", today[0], today[-1]) is not None
    wrong = {table: [(today[0], today[-1] + "0", partition_name(table, D + DAY))]
             for table in ("executions", "step_runs")}  # fmt: skip
    runs.partitions._ranges = wrong
    runs.partitions._lowers = {table: [today[0]] for table in wrong}
    on_wrong = await runs._statement(_WRITE_MANY, today)
    assert partition_name("executions", D + DAY) in on_wrong
    claims = await _claim_all(runs, today)
    assert await _finish_all(runs, claims) == ["succeeded"] * 3
    homes = await _homes(pg, today)
    assert {homes[e] for e in today} == {_succeeded_on(D)}


async def test_a_detached_day_is_not_written_through_its_old_name(pg: Store) -> None:
    """An operator detaches a day (to archive it) after the map was read: the statement on
    its name matches nothing (each partition must still be attached), and the parent — which
    no longer has those executions — says so: nothing claimed, nothing written outside
    ``executions``."""
    await pg.partitions.ensure(T, 0)
    owner = await seed.tenant(pg, "acme", T)
    archived = await _queued(pg, owner, T, 2)
    runs = _runs(pg)
    name = partition_name("executions", D)
    assert await runs.partitions.holding("executions", archived[0], archived[-1]) == name
    async with pg.engine.begin() as conn:
        await conn.execute(text(f"ALTER TABLE executions DETACH PARTITION {name}"))
    claims = await asyncio.gather(*(runs.claim(e, T, T + LEASE) for e in archived))
    assert claims == [None, None]
    async with pg.engine.connect() as conn:
        leases = await conn.execute(text(f"SELECT lease, status FROM {name}"))
        assert {tuple(r) for r in leases} == {(0, "queued")}, "the archived rows are untouched"


async def test_a_batch_refused_for_one_row_keeps_the_days_partitions(pg: Store) -> None:
    """A batch on a day's partitions that the database refuses for one of its rows (here a
    trigger's ``RAISE``; in life a deadlock, a timeout, a value) is not the partitions' fault:
    the executions are written one by one — the others land, the refused one is told why —
    and the next batches still go to the day's partitions (the map is not dropped for a
    minute, which would plan every batch on every partition meanwhile)."""
    await pg.partitions.ensure(T, 0)
    owner = await seed.tenant(pg, "acme", T)
    ids = await _queued(pg, owner, T, 3)
    runs = _runs(pg)
    claims = await _claim_all(runs, ids)

    def step(claim: Claim) -> StepWrite:
        name = "boom" if claim.execution_id == ids[1] else "s"
        return StepWrite(seq=0, step_id=name, step_type="noop", status="succeeded", attempts=1,
                         input=None, input_json=None, output=None, output_json=None,
                         output_truncated=False, error=None, error_json=None, started_at=T,
                         finished_at=T)  # fmt: skip

    done = ExecutionWrite(status="succeeded", next_step=1, steps_run=1, now=T,
                          lease_expires_at=None, finished_at=T)  # fmt: skip
    refuse = "IF NEW.step_id = 'boom' THEN RAISE EXCEPTION 'boom is refused'; END IF;"
    async with row_trigger(pg, "refuse_boom", "BEFORE INSERT ON step_runs", refuse):
        batches, refusals = runs.writes.batches, runs.partitions._refusals
        results = await asyncio.gather(
            *(runs.write(c, done, [step(c)]) for c in claims), return_exceptions=True
        )
        assert runs.writes.batches == batches + 1, "the three writes were one batch"
        assert results[0] == results[2] == "succeeded"
        assert isinstance(results[1], StoreError) and "boom is refused" in results[1].message
        assert runs.partitions._refusals == refusals, "the day's partitions were not refused"
        assert await runs.partitions.holding("executions", ids[0], ids[-1]) == partition_name(
            "executions", D
        )
        homes = await _homes(pg, ids)
        assert homes[ids[0]] == homes[ids[2]] == _succeeded_on(D)
        assert homes[ids[1]] == (partition_name("executions", D), "running", None)


async def test_a_claim_refused_for_one_execution_is_its_answer_alone(pg: Store) -> None:
    """A batch of claims the database refuses for one execution (a trigger's ``RAISE`` here; a
    deadlock or a timeout in life) is claimed one by one: the others are claimed and told so,
    the refused one alone gets the error — never an error for executions the store claimed
    (their runs would then wait out the lease before anyone could claim them again)."""
    await pg.partitions.ensure(T, 0)
    owner = await seed.tenant(pg, "acme", T)
    ids = await _queued(pg, owner, T, 3)
    refuse = (
        f"IF NEW.id = '{ids[0]}' AND NEW.lease <> OLD.lease THEN "
        "RAISE EXCEPTION 'claim is refused'; END IF;"
    )
    async with row_trigger(pg, "refuse_claim", "BEFORE UPDATE ON executions", refuse):
        runs = _runs(pg)
        batches, refusals = runs.claims.batches, runs.partitions._refusals
        results = await asyncio.gather(
            *(runs.claim(e, T, T + LEASE) for e in ids), return_exceptions=True
        )
        assert runs.claims.batches == batches + 1, "the three claims were one batch"
        assert isinstance(results[0], StoreError) and "claim is refused" in results[0].message
        assert [type(r) for r in results[1:]] == [Claim, Claim]
        assert runs.partitions._refusals == refusals
        async with pg.engine.connect() as conn:
            rows = await conn.execute(
                text("SELECT id, status, lease FROM executions WHERE id = ANY(:ids)"), {"ids": ids}
            )
            state = {r[0]: (r[1], r[2]) for r in rows}
        assert state == {ids[0]: ("queued", 0), ids[1]: ("running", 1), ids[2]: ("running", 1)}


async def test_claims_sent_one_by_one_keep_their_answers_when_the_database_goes_away(
    pg: Store,
) -> None:
    """Claimed one by one after a row's refusal, and the database goes away mid-way (the
    third claim's backend is terminated): the claim made before keeps its answer, the refused
    one its error, and the claims not made are told the database is unavailable — none of
    them is answered with another's error."""
    await pg.partitions.ensure(T, 0)
    owner = await seed.tenant(pg, "acme", T)
    ids = await _queued(pg, owner, T, 4)
    refuse_or_die = (
        "IF NEW.lease <> OLD.lease THEN "
        f"  IF NEW.id = '{ids[1]}' THEN RAISE EXCEPTION 'claim is refused'; END IF; "
        f"  IF NEW.id = '{ids[2]}' AND position('unnest' IN current_query()) = 0 THEN "
        "    PERFORM pg_terminate_backend(pg_backend_pid()); "  # one by one only
        "  END IF; "
        "END IF;"
    )
    async with row_trigger(pg, "refuse_or_die", "BEFORE UPDATE ON executions", refuse_or_die):
        runs = _runs(pg)
        results = await asyncio.gather(
            *(runs.claim(e, T, T + LEASE) for e in ids), return_exceptions=True
        )
        assert isinstance(results[0], Claim)
        assert isinstance(results[1], StoreError) and "claim is refused" in results[1].message
        assert isinstance(results[2], DatabaseUnavailable)
        assert results[3] is results[2], "not tried once the database was unavailable"
        async with pg.engine.connect() as conn:
            rows = await conn.execute(
                text("SELECT id, status FROM executions WHERE id = ANY(:ids)"), {"ids": ids}
            )
            state = {r[0]: r[1] for r in rows}
        assert state == {ids[0]: "running", ids[1]: "queued", ids[2]: "queued", ids[3]: "queued"}
