"""Unleased runs: a workflow of pure steps only is not claimed before it runs. The engine peeks
(reads) the queued execution, runs the steps, and its one write claims and finishes it
together — fenced by what it read, so a crash, a racer or a cancel in between leaves nothing of
it; pure steps are harmless to run again. SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from conveyor.engine import Engine, OutcomeKind
from conveyor.errors import DatabaseUnavailable
from conveyor.settings import Settings
from conveyor.store import Claim, Store
from conveyor.store.pg import PgRunStore
from conveyor.workflows import StepContext, StepResult
from tests.engine._support import Recorder, slow_step, start

PURE: list[dict[str, Any]] = [
    {"id": "a", "type": "transform", "expression": "{n: input.n, tag: 'x'}"},
    {"id": "b", "type": "condition", "expression": "steps.a.n > `1`"},
    {"id": "c", "type": "transform", "expression": "[steps.a.n, steps.a.tag]"},
    {"id": "d", "type": "noop"},
]


class Crash(BaseException):
    """Stands in for the process dying mid-run: nothing in the engine catches it."""


async def _learned(store: Store, settings: Settings, steps: list[dict[str, Any]]) -> tuple[
    Engine, Recorder, str, tuple[str, str]
]:  # fmt: skip
    """An engine that has run one execution of a new workflow of ``steps`` (the usual way: a
    claim first), so it knows whether the workflow runs unleased."""
    recorder = Recorder()
    engine = Engine(store, settings, step_runner=recorder)
    tenant, first = await start(store, steps, {"n": 2})
    workflow = (tenant, (await store.executions.get(tenant, first)).workflow_id)
    assert (await engine.run(first, workflow=workflow)).kind is OutcomeKind.SUCCEEDED
    recorder.calls.clear()
    return engine, recorder, tenant, workflow


async def _new(store: Store, workflow: tuple[str, str], input: object = None) -> str:
    return (await store.executions.create(workflow[0], workflow[1], input or {"n": 2}))[0].id


def _counts(store: Store) -> tuple[int, int, int] | None:
    runs = store.runs
    if not isinstance(runs, PgRunStore):
        return None
    return runs.peeks.items, runs.claims.items, runs.writes.items


async def test_a_run_of_pure_steps_is_one_read_and_one_write(
    store: Store, settings: Settings
) -> None:
    engine, recorder, tenant, workflow = await _learned(store, settings, PURE)
    execution_id = await _new(store, workflow, {"n": 5})
    before = _counts(store)
    outcome = await engine.run(execution_id, workflow=workflow)
    assert outcome.kind is OutcomeKind.SUCCEEDED and outcome.steps_run == 4
    assert outcome.queue_latency_ms is not None, "the run that started it: its start latency"
    if before is not None:
        after = _counts(store)
        assert after == (before[0] + 1, before[1], before[2] + 1), "a peek and a write, no claim"
    done = await store.executions.get(tenant, execution_id, with_steps=True)
    assert done.status == "succeeded" and done.attempts == 1 and done.lease == 1
    assert done.started_at is not None and done.finished_at is not None
    assert done.queued_at <= done.started_at <= done.finished_at
    assert [(s.seq, s.step_id, s.status) for s in done.steps] == [
        (0, "a", "succeeded"), (1, "b", "succeeded"), (2, "c", "succeeded"), (3, "d", "succeeded")
    ]  # fmt: skip
    assert done.steps[0].output == {"n": 5, "tag": "x"} and done.steps[2].output == [5, "x"]
    assert recorder.calls == {"a": 1, "b": 1, "c": 1, "d": 1}

    # without the hint (a caller that does not know the workflow): claimed, the same result
    other = await _new(store, workflow, {"n": 5})
    assert (await engine.run(other)).kind is OutcomeKind.SUCCEEDED
    again = await store.executions.get(tenant, other, with_steps=True)
    assert (again.attempts, again.lease) == (1, 1)
    assert [s.output for s in again.steps] == [s.output for s in done.steps]


async def test_a_crash_inside_an_unleased_run_leaves_it_queued_and_it_runs_again(
    store: Store, settings: Settings
) -> None:
    """Nothing is written before the end: the dead run leaves the execution as it was (queued,
    no lease, no attempt), and the next delivery runs every step again with the same outputs."""
    engine, recorder, tenant, workflow = await _learned(store, settings, PURE)
    execution_id = await _new(store, workflow, {"n": 3})

    async def crash_once(ctx: StepContext, call: int) -> StepResult | None:
        if call == 1:
            raise Crash
        return None

    recorder.hooks["c"] = crash_once
    with pytest.raises(Crash):
        await engine.run(execution_id, workflow=workflow)
    mid = await store.executions.get(tenant, execution_id, with_steps=True)
    assert (mid.status, mid.lease, mid.attempts, mid.started_at) == ("queued", 0, 0, None)
    assert not mid.steps

    outcome = await engine.run(execution_id, workflow=workflow)  # no lease to wait for
    assert outcome.kind is OutcomeKind.SUCCEEDED
    assert recorder.calls == {"a": 2, "b": 2, "c": 2, "d": 1}
    done = await store.executions.get(tenant, execution_id, with_steps=True)
    assert [(s.seq, s.step_id) for s in done.steps] == list(enumerate("abcd"))
    assert done.steps[2].output == [3, "x"] and (done.attempts, done.lease) == (1, 1)

    # abandoned (the job's lock lost) before a step: nothing written either
    abandoned = await _new(store, workflow)
    lost = asyncio.Event()
    lost.set()
    out = await engine.run(abandoned, abandon=lost, workflow=workflow)
    assert out.kind is OutcomeKind.ABANDONED
    row = await store.executions.get(tenant, abandoned)
    assert (row.status, row.lease, row.attempts) == ("queued", 0, 0)


async def test_racing_unleased_runners_write_once(store: Store, settings: Settings) -> None:
    """Runners of two processes (each its own store: its own pool and batches) and two in one,
    all peeking the same execution: one write claims it; the others wrote nothing, claim, find
    it ended (``SKIPPED``)."""
    engine, _recorder, tenant, workflow = await _learned(store, settings, PURE)
    async with Store(settings, pool_size=5) as second:
        other = Engine(second, settings, step_runner=Recorder())
        learn = await _new(store, workflow)  # the other process has run this workflow too
        assert (await other.run(learn, workflow=workflow)).kind is OutcomeKind.SUCCEEDED
        execution_id = await _new(store, workflow)
        observed: list[str] = []  # the step metrics: only what was written
        engine.on_step = other.on_step = lambda step_type, _status, _s: observed.append(step_type)
        before = _counts(second)
        outcomes = await asyncio.gather(
            engine.run(execution_id, workflow=workflow),
            engine.run(execution_id, workflow=workflow),
            other.run(execution_id, workflow=workflow),
            other.run(execution_id, workflow=workflow),
        )
        after = _counts(second)
    if before is not None:
        assert after is not None and after[0] > before[0], "the other process peeked too"
    kinds = [o.kind for o in outcomes]
    assert kinds.count(OutcomeKind.SUCCEEDED) == 1, kinds
    assert set(kinds) <= {OutcomeKind.SUCCEEDED, OutcomeKind.SKIPPED, OutcomeKind.BUSY}
    done = await store.executions.get(tenant, execution_id, with_steps=True)
    assert [(s.seq, s.step_id) for s in done.steps] == list(enumerate("abcd"))
    assert (done.status, done.attempts, done.lease) == ("succeeded", 1, 1)
    assert observed == ["transform", "condition", "transform", "noop"], "the winner's steps once"


async def test_a_cancelled_execution_is_not_run(store: Store, settings: Settings) -> None:
    engine, recorder, tenant, workflow = await _learned(store, settings, PURE)
    execution_id = await _new(store, workflow)
    await store.executions.cancel(tenant, execution_id)
    outcome = await engine.run(execution_id, workflow=workflow)
    assert outcome.kind is OutcomeKind.SKIPPED and recorder.calls == {}
    row = await store.executions.get(tenant, execution_id, with_steps=True)
    assert row.status == "cancelled" and not row.steps


async def test_a_new_version_with_a_durable_step_is_claimed_before_it_runs(
    store: Store, settings: Settings
) -> None:
    """The engine's knowledge is per workflow, learned from the last version it ran: a version
    with an ``http`` step is found by the peek, claimed as usual (its durable step runs under a
    lease), and the next executions are claimed without a peek first."""
    engine, recorder, tenant, workflow = await _learned(store, settings, PURE)
    await store.workflows.update(
        tenant, workflow[1], {"name": "wf", "steps": [slow_step("call"), *PURE[:1]]}
    )
    seen: list[tuple[str, int]] = []

    async def call(ctx: StepContext, n: int) -> StepResult:
        row = await store.executions.get(tenant, ctx.execution_id)
        seen.append((row.status, row.lease))  # leased while it runs
        return StepResult(output={"ok": True})

    recorder.hooks["call"] = call
    first = await _new(store, workflow)
    before = _counts(store)
    assert (await engine.run(first, workflow=workflow)).kind is OutcomeKind.SUCCEEDED
    assert seen == [("running", 1)]
    if before is not None:
        after = _counts(store)
        assert after is not None and after[:2] == (before[0] + 1, before[1] + 1)
    second = await _new(store, workflow)
    before = _counts(store)
    assert (await engine.run(second, workflow=workflow)).kind is OutcomeKind.SUCCEEDED
    if before is not None:
        after = _counts(store)
        assert after is not None and after[:2] == (before[0], before[1] + 1), "no peek now"
    for execution_id in (first, second):
        done = await store.executions.get(tenant, execution_id, with_steps=True)
        assert (done.attempts, done.lease) == (1, 1)
        assert [s.step_id for s in done.steps] == ["call", "a"]


async def test_a_lost_answer_is_not_mistaken_for_a_racers_write(
    store: Store, settings: Settings
) -> None:
    """An unleased run's write fails with the connection (nothing committed) while another
    process claims and finishes the execution under the lease number the unleased run would
    have taken. Its retry must not take the racer's step runs for its own: exactly one runner
    reports the execution succeeded."""
    engine, _recorder, tenant, workflow = await _learned(store, settings, PURE)
    racer = Engine(store, settings, step_runner=Recorder())
    execution_id = await _new(store, workflow)
    runs = store.runs
    real_write = runs.write
    outcomes: dict[str, OutcomeKind] = {}

    async def connection_lost(claim: Claim, *args: Any) -> str:
        if claim.unleased and "racer" not in outcomes:
            outcomes["racer"] = (await racer.run(execution_id)).kind  # claims, finishes
            raise DatabaseUnavailable("connection lost before the write was sent")
        return await real_write(claim, *args)

    runs.write = connection_lost  # type: ignore[method-assign,assignment]
    try:
        outcomes["unleased"] = (await engine.run(execution_id, workflow=workflow)).kind
    finally:
        del runs.write
    assert outcomes == {"racer": OutcomeKind.SUCCEEDED, "unleased": OutcomeKind.SKIPPED}
    done = await store.executions.get(tenant, execution_id, with_steps=True)
    assert (done.status, done.lease, done.attempts) == ("succeeded", 1, 1)
    assert [s.step_id for s in done.steps] == list("abcd")


async def test_an_output_expression_that_fails_fails_the_execution_in_the_one_write(
    store: Store, settings: Settings
) -> None:
    engine, _recorder, tenant, workflow = await _learned(store, settings, PURE)
    await store.workflows.update(
        tenant, workflow[1], {"name": "wf", "steps": PURE, "output": "sum(steps.a)"}
    )  # sum() of an object: a type error at run time
    execution_id = await _new(store, workflow)
    before = _counts(store)
    outcome = await engine.run(execution_id, workflow=workflow)
    assert outcome.kind is OutcomeKind.FAILED
    if before is not None:
        after = _counts(store)
        assert after == (before[0] + 1, before[1], before[2] + 1), "still a peek and a write"
    done = await store.executions.get(tenant, execution_id, with_steps=True)
    assert (done.status, done.lease, done.attempts) == ("failed", 1, 1)
    assert done.error["code"] == "output_expression_failed"
    assert [(s.step_id, s.status) for s in done.steps] == [(x, "succeeded") for x in "abcd"]
