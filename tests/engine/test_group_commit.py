"""Group commit in the worker (PostgreSQL): claims and step writes made in the same loop turn
share one statement and one commit, each row still fenced by its own lease — a fenced-out
execution in a batch writes nothing and is the only one told ``LeaseLost`` — and a lone claim
or write is sent at once, on its own."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest

from conveyor.engine import Engine, OutcomeKind
from conveyor.errors import LeaseLost
from conveyor.settings import Settings
from conveyor.store import Claim, ExecutionWrite, StepWrite, Store, TimerWrite, new_id, utcnow
from conveyor.store.pg import PgRunStore
from conveyor.store.pg.runs import _CLAIM_MANY, _ClaimRequest
from conveyor.workflows import StepContext, StepResult
from tests.engine._support import Recorder, start

pytestmark = pytest.mark.parametrize("db_url", ["postgres"], indirect=True)


def _runs(store: Store) -> PgRunStore:
    assert isinstance(store.runs, PgRunStore)
    return store.runs


def _step(seq: int, step_id: str, now: datetime) -> StepWrite:
    return StepWrite(
        seq=seq, step_id=step_id, step_type="noop", status="succeeded", attempts=1,
        input=None, input_json=None, output={"seq": seq}, output_json=f'{{"seq": {seq}}}',
        output_truncated=False, error=None, error_json=None, started_at=now, finished_at=now,
    )  # fmt: skip


def _end(claim: Claim, status: str, now: datetime, **fields: Any) -> ExecutionWrite:
    return ExecutionWrite(
        status=status, next_step=1, steps_run=claim.steps_run + 1, now=now,
        lease_expires_at=None, finished_at=now if status == "succeeded" else None, **fields,
    )  # fmt: skip


async def _rows(db_url: str, sql: str, *args: Any) -> list[Any]:
    con = await asyncpg.connect(db_url.replace("postgresql+asyncpg", "postgresql"))
    try:
        return list(await con.fetch(sql, *args))
    finally:
        await con.close()


async def test_a_fenced_out_execution_in_a_batch_writes_nothing_and_the_others_commit(
    store: Store, db_url: str
) -> None:
    tenant, a = await start(store, [{"id": "n", "type": "noop"}])
    workflow = (await store.executions.get(tenant, a)).workflow_id
    b = (await store.executions.create(tenant, workflow))[0].id
    c = (await store.executions.create(tenant, workflow))[0].id
    runs, now = _runs(store), utcnow()
    batches = runs.claims.batches
    claims = await asyncio.gather(
        *(runs.claim(x, now, now + timedelta(seconds=1)) for x in (a, b, c))
    )
    assert runs.claims.batches == batches + 1, "three claims in one turn: one statement"
    ca, cb, cc = claims
    assert ca is not None and cb is not None and cc is not None
    assert [ca.execution_id, cb.execution_id, cc.execution_id] == [a, b, c]
    assert ca.lease == cb.lease == cc.lease == 1

    # a racer takes b over (its lease expired for it): b's runner is now fenced out
    later = now + timedelta(seconds=5)
    racer = await runs.claim(b, later, later + timedelta(seconds=30))
    assert racer is not None and racer.lease == 2

    timer = TimerWrite(new_id(), ca.workflow_id, ca.region, 0, now + timedelta(hours=1))
    writes = runs.writes.batches
    results = await asyncio.gather(
        runs.write(ca, _end(ca, "succeeded", now), [_step(0, "p", now), _step(1, "n", now)]),
        runs.write(cb, _end(cb, "succeeded", now), [_step(0, "n", now)]),
        runs.write(cc, _end(cc, "waiting", now, wake_at=timer.due_at), [], timer),
        return_exceptions=True,
    )
    assert runs.writes.batches == writes + 1, "three writes in one turn: one statement"
    assert results[0] == "succeeded" and results[2] == "waiting"
    assert isinstance(results[1], LeaseLost), "only the fenced-out execution is told"

    got = {r["id"]: r for r in await _rows(
        db_url, "SELECT id, status, lease FROM executions WHERE id = ANY($1)", [a, b, c]
    )}  # fmt: skip
    assert got[a]["status"] == "succeeded" and got[c]["status"] == "waiting"
    assert got[b]["status"] == "running" and got[b]["lease"] == 2, "the racer's row, untouched"
    steps = await _rows(
        db_url, "SELECT execution_id, seq FROM step_runs WHERE execution_id = ANY($1)", [a, b, c]
    )
    assert sorted((r["execution_id"], r["seq"]) for r in steps) == [(a, 0), (a, 1)]
    timers = await _rows(db_url, "SELECT id, execution_id FROM timers WHERE execution_id = ANY($1)",
                         [a, b, c])  # fmt: skip
    assert [(r["id"], r["execution_id"]) for r in timers] == [(timer.id, c)]

    # the racer's own write goes through
    assert await runs.write(racer, _end(racer, "succeeded", later), [_step(0, "n", later)]) == (
        "succeeded"
    )


async def test_a_stale_runner_and_the_racer_in_one_batch_only_the_racer_writes(
    store: Store, db_url: str
) -> None:
    """Both runners of one execution in the same batch (same process): the rows of each are
    matched by id AND lease, so the stale one's step run and timer are not written under the
    racer's update."""
    tenant, b = await start(store, [{"id": "n", "type": "noop"}])
    runs, now = _runs(store), utcnow()
    stale = await runs.claim(b, now, now + timedelta(seconds=1))
    later = now + timedelta(seconds=5)
    racer = await runs.claim(b, later, later + timedelta(seconds=30))
    assert stale is not None and racer is not None and (stale.lease, racer.lease) == (1, 2)
    timer = TimerWrite(new_id(), stale.workflow_id, stale.region, 0, now + timedelta(hours=1))
    writes = runs.writes.batches
    results = await asyncio.gather(
        runs.write(stale, _end(stale, "waiting", now, wake_at=timer.due_at),
                   [_step(1, "stale", now)], timer),
        runs.write(racer, _end(racer, "succeeded", later), [_step(0, "racer", later)]),
        return_exceptions=True,
    )  # fmt: skip
    assert runs.writes.batches == writes + 1
    assert isinstance(results[0], LeaseLost) and results[1] == "succeeded"
    done = await store.executions.get(tenant, b, with_steps=True)
    assert done.status == "succeeded" and [s.step_id for s in done.steps] == ["racer"]
    assert await _rows(db_url, "SELECT id FROM timers WHERE execution_id = $1", b) == []


async def test_an_execution_whose_value_the_database_refuses_fails_alone(store: Store) -> None:
    """A batch the database refuses (here: one execution's output it cannot store) is sent
    again row by row: only that execution sees the error."""
    tenant, a = await start(store, [{"id": "n", "type": "noop"}])
    workflow = (await store.executions.get(tenant, a)).workflow_id
    b = (await store.executions.create(tenant, workflow))[0].id
    runs, now = _runs(store), utcnow()
    ca, cb = await asyncio.gather(
        *(runs.claim(x, now, now + timedelta(seconds=30)) for x in (a, b))
    )
    assert ca is not None and cb is not None
    bad = _end(cb, "succeeded", now, output_json='"\\u0000"')  # jsonb refuses NUL
    results = await asyncio.gather(
        runs.write(ca, _end(ca, "succeeded", now), [_step(0, "n", now)]),
        runs.write(cb, bad, [_step(0, "n", now)]),
        return_exceptions=True,
    )
    assert results[0] == "succeeded"
    assert isinstance(results[1], Exception) and not isinstance(results[1], LeaseLost)
    assert (await store.executions.get(tenant, a)).status == "succeeded"
    assert (await store.executions.get(tenant, b)).status == "running"


async def test_concurrent_runs_share_statements_and_a_fenced_out_run_stops_alone(
    store: Store, settings: Settings
) -> None:
    """Engine runs whose steps end in the same turn write in one batch; a racer that took one
    of them over meanwhile makes only that run stop (LEASE_LOST), writing nothing."""
    tenant, first = await start(store, [{"id": "n", "type": "noop"}])
    workflow = (await store.executions.get(tenant, first)).workflow_id
    ids = [first] + [(await store.executions.create(tenant, workflow))[0].id for _ in range(4)]
    fenced = ids[2]
    barrier = asyncio.Barrier(len(ids))
    runs = _runs(store)

    async def together(ctx: StepContext, call: int) -> StepResult | None:
        if ctx.execution_id == fenced:  # a racer claims it while its step runs
            later = utcnow() + timedelta(minutes=5)
            assert await runs.claim(fenced, later, later + timedelta(minutes=1)) is not None
        await barrier.wait()
        return None

    recorder = Recorder()
    recorder.hooks["n"] = together
    engine = Engine(store, settings, step_runner=recorder)
    claims, writes = runs.claims.batches, runs.writes.batches
    outcomes = await asyncio.gather(*(engine.run(x) for x in ids))
    kinds = {o.execution_id: o.kind for o in outcomes}
    assert kinds == {x: OutcomeKind.LEASE_LOST if x == fenced else OutcomeKind.SUCCEEDED
                     for x in ids}  # fmt: skip
    assert runs.claims.batches - claims <= 2, "five claims in one turn share a statement"
    assert runs.writes.batches - writes == 1, "five writes in one turn: one statement"
    done = await store.executions.get(tenant, fenced, with_steps=True)
    assert done.status == "running" and done.lease == 2 and done.steps == ()
    for x in ids:
        if x != fenced:
            ran = await store.executions.get(tenant, x, with_steps=True)
            assert ran.status == "succeeded" and [s.step_id for s in ran.steps] == ["n"]


async def test_at_one_execution_per_second_nothing_waits_for_a_batch(
    store: Store, settings: Settings
) -> None:
    """A lone claim and a lone write go at once, alone: each run is one batch of one claim and
    one batch of one write, and it takes about what its two statements take."""
    tenant, first = await start(store, [{"id": "n", "type": "noop"}])
    workflow = (await store.executions.get(tenant, first)).workflow_id
    ids = [first] + [(await store.executions.create(tenant, workflow))[0].id for _ in range(2)]
    runs = _runs(store)
    engine = Engine(store, settings)
    await engine.run(ids[0])  # warm: the plan cache, prepared statements, connections
    for x in ids[1:]:
        await asyncio.sleep(1.0)  # one execution per second
        claims, writes = (
            (runs.claims.batches, runs.claims.items),
            (runs.writes.batches, runs.writes.items),
        )
        began = time.perf_counter()
        outcome = await engine.run(x)
        took = time.perf_counter() - began
        assert outcome.kind is OutcomeKind.SUCCEEDED
        assert (runs.claims.batches, runs.claims.items) == (claims[0] + 1, claims[1] + 1)
        assert (runs.writes.batches, runs.writes.items) == (writes[0] + 1, writes[1] + 1)
        # the two statements alone, measured on the same pool right after
        began = time.perf_counter()
        await runs._claim_one(_probe(x))
        await runs._claim_one(_probe(x))
        alone = time.perf_counter() - began
        assert took < alone + 0.05, f"the run took {took:.4f}s, its statements {alone:.4f}s"


def _probe(execution_id: str) -> _ClaimRequest:
    """A claim request that matches no row (the execution ended): one round trip."""
    now = utcnow()
    return _ClaimRequest(execution_id, now, now)


async def test_a_claimed_batch_of_different_workflows_costs_one_definitions_fetch(
    settings: Settings,
) -> None:
    """Eight executions of eight workflows, none cached in the worker: their claims go in one
    statement, and so do the definitions their plans need (not one round trip per miss); each
    version is then cached as a parsed definition and a plan, within ``WORKFLOW_CACHE_SIZE``."""
    async with Store(settings) as seeding:
        tenant = (await seeding.tenants.create("acme")).id
        ids = []
        for i in range(8):
            workflow = await seeding.workflows.create(
                tenant, {"name": f"wf{i}", "steps": [{"id": f"n{i}", "type": "noop"}]}
            )
            ids.append((await seeding.executions.create(tenant, workflow.id))[0].id)
    small = settings.model_copy(update={"workflow_cache_size": 6})
    async with Store(small) as store:  # a worker's own store: nothing cached
        runs, fetches = _runs(store), store.workflows.fetches
        engine = Engine(store, small)
        claims, batches = runs.claims.batches, fetches.batches
        outcomes = await asyncio.gather(*(engine.run(x) for x in ids))
        assert [o.kind for o in outcomes] == [OutcomeKind.SUCCEEDED] * 8
        assert runs.claims.batches - claims == 1, "eight claims in one turn: one statement"
        assert fetches.batches - batches == 1, "their eight workflows: one definitions fetch"
        assert len(store.definitions) == 6 and len(engine._plans) == 6


async def test_a_batch_of_claims_reads_its_own_rows_whatever_the_backlog(
    store: Store, db_url: str
) -> None:
    """The batched claim is ten primary-key lookups, even where the planner's statistics lag
    behind a backlog (the partition analyzed while it held 3,000 finished executions, then
    3,000 queued): no node of its plan reads more rows than the batch has. Written as
    ``status = 'queued' OR …``, the claim used the partial index of active executions and
    hash-joined the whole backlog with the batch."""
    tenant, first = await start(store, [{"id": "n", "type": "noop"}])
    workflow = (await store.executions.get(tenant, first)).workflow_id
    con = await asyncpg.connect(db_url.replace("postgresql+asyncpg", "postgresql"))
    insert = (
        "INSERT INTO executions (id, tenant_id, workflow_id, workflow_version, status, region,"
        " triggered_by, created_at, queued_at, updated_at)"
        " SELECT id, $2, $3, 1, $4, 'us', 'api', now(), now(), now()"
        " FROM unnest($1::text[]) AS id"
    )
    try:
        finished = [new_id() for _ in range(3000)]
        await con.execute(insert, finished, tenant, workflow, "succeeded")
        await con.execute("ANALYZE executions")
        ids = sorted(new_id() for _ in range(3000))
        await con.execute(insert, ids, tenant, workflow, "queued")
        batch = ids[1000:1010]
        now = utcnow()
        async with con.transaction():
            plan = await con.fetchval(
                "EXPLAIN (ANALYZE, FORMAT JSON) " + _CLAIM_MANY,
                batch, [now] * 10, [now + timedelta(seconds=30)] * 10,
            )  # fmt: skip
            claimed = await con.fetchval(
                "SELECT count(*) FROM executions WHERE id = ANY($1) AND status = 'running'", batch
            )
            assert claimed == 10
            raise _Rollback
    except _Rollback:
        pass
    finally:
        await con.close()
    nodes = list(_plan_nodes(json.loads(plan)[0]["Plan"]))
    read = max(n.get("Actual Rows", 0) * n.get("Actual Loops", 1) for n in nodes)
    assert read <= 10, f"a node read {read} rows for a batch of 10: {nodes}"
    indexes = {n["Index Name"] for n in nodes if "Index Name" in n}
    assert indexes and all(name.endswith("_pkey") for name in indexes), indexes


class _Rollback(Exception):
    pass


def _plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from _plan_nodes(child)


# --- unleased runs (pure steps only): a peek, and a write that claims ------------------------
async def test_an_unleased_write_claims_the_execution_and_a_racer_in_between_fences_it_out(
    store: Store, db_url: str
) -> None:
    """A peek reads without writing; the write claims as it writes (lease and attempts as a
    claim sets them), unless a claim or a cancel came in between: then it writes nothing and
    only it is told ``LeaseLost``. Peeks of the same turn share one read."""
    tenant, a = await start(store, [{"id": "n", "type": "noop"}])
    workflow = (await store.executions.get(tenant, a)).workflow_id
    b, c, d = [(await store.executions.create(tenant, workflow))[0].id for _ in range(3)]
    runs, now = _runs(store), utcnow()
    peeks, claims = runs.peeks.batches, runs.claims.batches
    read = await asyncio.gather(*(runs.peek(x, now) for x in (a, b, c, d)))
    assert runs.peeks.batches == peeks + 1 and runs.claims.batches == claims
    pa, pb, pc, pd = read
    assert pa is not None and pb is not None and pc is not None and pd is not None
    assert all(p.unleased and p.lease == 1 and p.attempts == 1 for p in read if p is not None)
    assert pa.started_at == now
    untouched = await _rows(db_url, "SELECT status, lease, attempts, started_at FROM executions"
                            " WHERE id = ANY($1)", [a, b, c, d])  # fmt: skip
    assert {(r["status"], r["lease"], r["attempts"], r["started_at"]) for r in untouched} == {
        ("queued", 0, 0, None)
    }, "a peek writes nothing"

    racer = await runs.claim(b, now, now + timedelta(seconds=30))  # a claim in between
    assert racer is not None and racer.lease == 1
    await store.executions.cancel(tenant, c)  # a cancel in between

    results = await asyncio.gather(
        runs.write(pa, _end(pa, "succeeded", now), [_step(0, "n", now)]),
        runs.write(pb, _end(pb, "succeeded", now), [_step(0, "n", now)]),
        runs.write(pc, _end(pc, "succeeded", now), [_step(0, "n", now)]),
        runs.write(pd, _end(pd, "succeeded", now), [_step(0, "n", now)]),
        return_exceptions=True,
    )
    assert results[0] == "succeeded" and results[3] == "succeeded"
    assert isinstance(results[1], LeaseLost) and isinstance(results[2], LeaseLost)
    got = {r["id"]: r for r in await _rows(
        db_url, "SELECT id, status, lease, attempts, started_at FROM executions"
        " WHERE id = ANY($1)", [a, b, c, d]
    )}  # fmt: skip
    assert (got[a]["status"], got[a]["lease"], got[a]["attempts"]) == ("succeeded", 1, 1)
    assert got[a]["started_at"] == now
    assert (got[b]["status"], got[b]["lease"]) == ("running", 1), "the racer's, untouched"
    assert (got[c]["status"], got[c]["lease"]) == ("cancelled", 0)
    steps = await _rows(
        db_url, "SELECT execution_id FROM step_runs WHERE execution_id = ANY($1)", [a, b, c, d]
    )
    assert sorted(r["execution_id"] for r in steps) == sorted([a, d])

    # alone (no batch): the single-row statement claims and fences the same way
    e = (await store.executions.create(tenant, workflow))[0].id
    pe = await runs.peek(e, now)
    assert pe is not None
    assert await runs.write(pe, _end(pe, "succeeded", now), [_step(0, "n", now)]) == "succeeded"
    again = await store.executions.create(tenant, workflow)
    pf = await runs.peek(again[0].id, now)
    assert pf is not None
    assert await runs.claim(pf.execution_id, now, now + timedelta(seconds=30)) is not None
    with pytest.raises(LeaseLost):
        await runs.write(pf, _end(pf, "succeeded", now), [_step(0, "n", now)])
    assert await runs.peek(pf.execution_id, now) is None, "running: not peeked, claimed"
    assert await runs.peek(e, now) is None and await runs.peek("missing", now) is None


async def test_two_unleased_runs_of_one_execution_in_one_batch_write_once(
    store: Store, db_url: str
) -> None:
    """Both read the same lease: the first write of the pair is sent, the other is told it
    lost — one set of step runs, not two."""
    _tenant, a = await start(store, [{"id": "n", "type": "noop"}])
    runs, now = _runs(store), utcnow()
    one, two = await asyncio.gather(runs.peek(a, now), runs.peek(a, now))
    assert one is not None and two is not None and one.lease == two.lease == 1
    writes = runs.writes.batches
    results = await asyncio.gather(
        runs.write(one, _end(one, "succeeded", now), [_step(0, "n", now)]),
        runs.write(two, _end(two, "succeeded", now), [_step(0, "n", now)]),
        return_exceptions=True,
    )
    assert runs.writes.batches == writes + 1
    assert results[0] == "succeeded" and isinstance(results[1], LeaseLost)
    steps = await _rows(db_url, "SELECT seq FROM step_runs WHERE execution_id = $1", a)
    assert [r["seq"] for r in steps] == [0]


async def test_an_unleased_write_and_the_claim_made_since_its_read_the_claim_writes(
    store: Store,
) -> None:
    """Same process, same batch: an unleased write (read lease 0, writes under 1) and the
    write of a claim made in between (lease 1) share a number; the claim's write is the one
    sent — the read is stale — and the row ends as the lease holder wrote it."""
    _tenant, x = await start(store, [{"id": "n", "type": "noop"}])
    runs, now = _runs(store), utcnow()
    read = await runs.peek(x, now)
    racer = await runs.claim(x, now, now + timedelta(seconds=30))
    assert read is not None and racer is not None and read.lease == racer.lease == 1
    results = await asyncio.gather(
        runs.write(read, _end(read, "succeeded", now), [_step(0, "n", now)]),
        runs.write(racer, _end(racer, "succeeded", now), [_step(0, "n", now)]),
        return_exceptions=True,
    )
    assert isinstance(results[0], LeaseLost) and results[1] == "succeeded"


async def test_at_one_execution_per_second_an_unleased_run_waits_for_no_batch(
    store: Store, settings: Settings
) -> None:
    """The same for a workflow of pure steps: each run is one peek and one write, each a batch
    of one sent at once."""
    tenant, first = await start(store, [{"id": "n", "type": "noop"}])
    workflow = (tenant, (await store.executions.get(tenant, first)).workflow_id)
    ids = [(await store.executions.create(tenant, workflow[1]))[0].id for _ in range(2)]
    runs = _runs(store)
    engine = Engine(store, settings)
    await engine.run(first, workflow=workflow)  # warm, and learns that the workflow is pure
    for x in ids:
        await asyncio.sleep(1.0)
        before = (runs.peeks.batches, runs.peeks.items, runs.claims.items, runs.writes.batches)
        began = time.perf_counter()
        outcome = await engine.run(x, workflow=workflow)
        took = time.perf_counter() - began
        assert outcome.kind is OutcomeKind.SUCCEEDED
        after = (runs.peeks.batches, runs.peeks.items, runs.claims.items, runs.writes.batches)
        assert after == (before[0] + 1, before[1] + 1, before[2], before[3] + 1)
        began = time.perf_counter()
        await runs._peek_one((x, utcnow()))
        await runs._claim_one(_probe(x))
        alone = time.perf_counter() - began
        assert took < alone + 0.05, f"the run took {took:.4f}s, its statements {alone:.4f}s"
