"""``workflow`` steps: a child execution created once, waited for durably, its output returned;
failures, pinned versions, crashes, cancellation and the depth limit."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from conveyor.engine import Engine, OutcomeKind
from conveyor.errors import DatabaseUnavailable, PermanentStepError
from conveyor.settings import Settings
from conveyor.store import Execution, Store, utcnow
from conveyor.store.schema import executions
from conveyor.workflows import StepContext, StepResult
from tests.engine._support import Recorder, slow_step


class Clock:
    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


class Crash(BaseException):
    """Stands in for the process dying: nothing in the engine catches it."""


class Enqueued:
    """The engine's enqueue hook: what it put on the queue."""

    def __init__(self) -> None:
        self.jobs: list[tuple[str, str, str]] = []

    async def __call__(self, execution: Execution, reason: str, job_id: str) -> None:
        self.jobs.append((execution.id, reason, job_id))


def _engine(store: Store, settings: Settings, clock: Clock, **kwargs: Any) -> Engine:
    engine = Engine(store, settings, clock=clock, **kwargs)
    engine.enqueue = Enqueued()
    return engine


async def _workflow(store: Store, tenant: str, steps: list[dict[str, Any]], name: str) -> str:
    return (await store.workflows.create(tenant, {"name": name, "steps": steps})).id


async def _children(store: Store, parent_id: str) -> list[str]:
    async with store.engine.connect() as conn:
        rows = await conn.execute(
            select(executions.c.id).where(executions.c.parent_execution_id == parent_id)
        )
        return [r.id for r in rows]


async def _run_all(engine: Engine, store: Store, tenant: str, ids: Sequence[str]) -> None:
    """Run every execution of ``ids`` and their descendants until none makes progress (what the
    workers do with the jobs the engine enqueues)."""
    for _ in range(20):
        progressed = False
        known = list(ids)
        for execution_id in known:
            known.extend(c for c in await _children(store, execution_id) if c not in known)
        for execution_id in known:
            outcome = await engine.run(execution_id)
            if outcome.kind not in (OutcomeKind.NOT_DUE, OutcomeKind.SKIPPED):
                progressed = True
        if not progressed:
            return
    raise AssertionError("executions kept making progress")


async def test_the_child_output_is_the_step_output(store: Store, settings: Settings) -> None:
    clock = Clock()
    tenant = (await store.tenants.create("acme")).id
    child_wf = await _workflow(
        store, tenant, [{"id": "c", "type": "transform", "expression": "{got: input.n}"}], "child"
    )
    parent_wf = await _workflow(
        store,
        tenant,
        [
            {"id": "t", "type": "transform", "expression": "input"},
            {
                "id": "call",
                "type": "workflow",
                "workflow": child_wf,
                "input": {"n": "{{ steps.t.n }}"},
            },
            {"id": "after", "type": "transform", "expression": "steps.call.got"},
        ],
        "parent",
    )
    parent, _ = await store.executions.create(tenant, parent_wf, {"n": 7})
    engine = _engine(store, settings, clock)
    parked = await engine.run(parent.id)
    assert parked.kind is OutcomeKind.WAITING and parked.wake_at is None  # no timeout
    (child_id,) = await _children(store, parent.id)
    assert engine.enqueue.jobs == [(child_id, "workflow", child_id)]  # type: ignore[union-attr]
    child = await store.executions.get(tenant, child_id)
    assert (child.status, child.triggered_by, child.input) == ("queued", "workflow", {"n": 7})
    assert (child.parent_execution_id, child.parent_seq, child.depth) == (parent.id, 1, 1)
    assert (await engine.run(parent.id)).kind is OutcomeKind.NOT_DUE  # the child has not ended

    done = await engine.run(child_id)
    assert done.kind is OutcomeKind.SUCCEEDED
    # the child's end woke the parent, and put it on the queue
    assert engine.enqueue.jobs[-1] == (parent.id, "child", f"child:{child_id}")  # type: ignore[union-attr]
    assert (await engine.run(parent.id)).kind is OutcomeKind.SUCCEEDED
    result = await store.executions.get(tenant, parent.id, with_steps=True)
    assert result.output == 7
    call = result.steps[1]
    assert (call.step_id, call.status, call.output) == ("call", "succeeded", {"got": 7})
    assert call.input["childId"] == child_id and call.input["version"] == 1
    (event,) = await store.events.for_execution(tenant, parent.id)
    assert (event.name, event.consumed_seq, event.source) == ("conveyor.workflow.1", 1, "workflow")
    # a redelivery of the child's job tells the parent nothing new
    assert (await engine.run(child_id)).kind is OutcomeKind.SKIPPED
    assert len(await store.events.for_execution(tenant, parent.id)) == 1


async def test_pinned_version_and_latest(store: Store, settings: Settings) -> None:
    clock = Clock()
    tenant = (await store.tenants.create("acme")).id
    child_wf = await _workflow(
        store, tenant, [{"id": "c", "type": "transform", "expression": "'v1'"}], "child"
    )
    await store.workflows.update(
        tenant,
        child_wf,
        {"name": "child", "steps": [{"id": "c", "type": "transform", "expression": "'v2'"}]},
    )
    parent_wf = await _workflow(
        store,
        tenant,
        [
            {"id": "pinned", "type": "workflow", "workflow": child_wf, "version": 1},
            {"id": "latest", "type": "workflow", "workflow": child_wf, "version": "latest"},
            {"id": "default", "type": "workflow", "workflow": child_wf},
        ],
        "parent",
    )
    parent, _ = await store.executions.create(tenant, parent_wf)
    engine = _engine(store, settings, clock)
    await _run_all(engine, store, tenant, [parent.id])
    result = await store.executions.get(tenant, parent.id, with_steps=True)
    assert result.status == "succeeded"
    assert [s.output for s in result.steps] == ["v1", "v2", "v2"]
    assert [s.input["version"] for s in result.steps] == [1, 2, 2]


async def test_a_failed_child_fails_the_step(store: Store, settings: Settings) -> None:
    clock = Clock()
    recorder = Recorder()

    async def boom(ctx: StepContext, call: int) -> StepResult:
        raise PermanentStepError("the payment service said no")

    recorder.hooks["pay"] = boom
    tenant = (await store.tenants.create("acme")).id
    child_wf = await _workflow(store, tenant, [slow_step("pay")], "child")
    parent_wf = await _workflow(
        store,
        tenant,
        [{"id": "call", "type": "workflow", "workflow": child_wf}, {"id": "n", "type": "noop"}],
        "parent",
    )
    parent, _ = await store.executions.create(tenant, parent_wf)
    engine = _engine(store, settings, clock, step_runner=recorder)
    await _run_all(engine, store, tenant, [parent.id])
    (child_id,) = await _children(store, parent.id)
    result = await store.executions.get(tenant, parent.id, with_steps=True)
    assert result.status == "failed" and [s.step_id for s in result.steps] == ["call"]
    error = result.steps[0].error
    assert error["type"] == "ChildFailed" and error["code"] == "child_failed"
    assert error["details"]["childId"] == child_id
    assert error["details"]["error"]["message"] == "the payment service said no"
    assert result.error["step"] == "call" and result.error["type"] == "ChildFailed"
    assert recorder.calls["pay"] == 1


async def test_a_crash_before_parking_finds_the_same_child(
    store: Store, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    tenant = (await store.tenants.create("acme")).id
    child_wf = await _workflow(
        store, tenant, [{"id": "c", "type": "transform", "expression": "input"}], "child"
    )
    parent_wf = await _workflow(
        store,
        tenant,
        [{"id": "call", "type": "workflow", "workflow": child_wf, "input": "{{ input }}"}],
        "parent",
    )
    parent, _ = await store.executions.create(tenant, parent_wf, {"k": 1})
    engine = _engine(store, settings, clock, lease_ttl_s=30)
    park = store.events.park

    async def crash(*args: Any, **kwargs: Any) -> str | None:
        raise Crash

    monkeypatch.setattr(store.events, "park", crash)
    with pytest.raises(Crash):
        await engine.run(parent.id)  # the child is created, then the process dies
    assert len(await _children(store, parent.id)) == 1
    monkeypatch.setattr(store.events, "park", park)
    assert (await engine.run(parent.id)).kind is OutcomeKind.BUSY  # its lease still holds
    clock.advance(31)
    assert (await engine.run(parent.id)).kind is OutcomeKind.WAITING
    (child_id,) = await _children(store, parent.id)  # the same child: exactly one
    await _run_all(engine, store, tenant, [parent.id])
    result = await store.executions.get(tenant, parent.id, with_steps=True)
    assert result.status == "succeeded" and result.output == {"k": 1}
    assert result.steps[0].input["childId"] == child_id
    assert (await store.executions.get(tenant, child_id)).attempts == 1


async def test_a_child_created_by_a_run_that_died_before_enqueueing_it_is_enqueued(
    store: Store, settings: Settings
) -> None:
    """The parent's run dies between creating the child and enqueueing it: the child has no
    job; the run that takes over (the lease expired) enqueues it, and still creates no other."""
    clock = Clock()
    tenant = (await store.tenants.create("acme")).id
    child_wf = await _workflow(store, tenant, [{"id": "c", "type": "noop"}], "child")
    parent_wf = await _workflow(
        store, tenant, [{"id": "call", "type": "workflow", "workflow": child_wf}], "parent"
    )
    parent, _ = await store.executions.create(tenant, parent_wf)
    engine = _engine(store, settings, clock, lease_ttl_s=30)

    async def crash(execution: Execution, reason: str, job_id: str) -> None:
        raise Crash

    engine.enqueue = crash
    with pytest.raises(Crash):
        await engine.run(parent.id)
    (child_id,) = await _children(store, parent.id)
    clock.advance(31)
    engine.enqueue = Enqueued()
    assert (await engine.run(parent.id)).kind is OutcomeKind.WAITING
    assert await _children(store, parent.id) == [child_id]
    assert engine.enqueue.jobs == [(child_id, "workflow", child_id)]


async def test_a_child_ending_before_the_parent_parks_is_not_missed(
    store: Store, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock()
    tenant = (await store.tenants.create("acme")).id
    child_wf = await _workflow(
        store, tenant, [{"id": "c", "type": "transform", "expression": "'done'"}], "child"
    )
    parent_wf = await _workflow(
        store, tenant, [{"id": "call", "type": "workflow", "workflow": child_wf}], "parent"
    )
    parent, _ = await store.executions.create(tenant, parent_wf)
    engine = _engine(store, settings, clock)
    park = store.events.park
    raced: list[OutcomeKind] = []

    async def child_first(*args: Any, **kwargs: Any) -> str | None:
        if not raced:  # the child runs and ends between the parent's look and its park
            (child_id,) = await _children(store, parent.id)
            raced.append((await engine.run(child_id)).kind)
        return await park(*args, **kwargs)

    monkeypatch.setattr(store.events, "park", child_first)
    outcome = await engine.run(parent.id)
    assert raced == [OutcomeKind.SUCCEEDED]
    assert outcome.kind is OutcomeKind.SUCCEEDED  # the park saw the event: no lost wake-up
    result = await store.executions.get(tenant, parent.id)
    assert result.output == "done"


async def test_cancelling_the_parent_cancels_its_descendants(
    store: Store, settings: Settings
) -> None:
    clock = Clock()
    tenant = (await store.tenants.create("acme")).id
    leaf = await _workflow(store, tenant, [{"id": "w", "type": "wait", "event": "go"}], "leaf")
    middle = await _workflow(
        store, tenant, [{"id": "call", "type": "workflow", "workflow": leaf}], "middle"
    )
    top = await _workflow(
        store, tenant, [{"id": "call", "type": "workflow", "workflow": middle}], "top"
    )
    parent, _ = await store.executions.create(tenant, top)
    engine = _engine(store, settings, clock)
    await _run_all(engine, store, tenant, [parent.id])
    (child_id,) = await _children(store, parent.id)
    (grandchild_id,) = await _children(store, child_id)
    statuses = await store.executions.status_of([parent.id, child_id, grandchild_id])
    assert set(statuses.values()) == {"waiting"}
    grandchild = await store.executions.get(tenant, grandchild_id)
    assert grandchild.depth == 2

    await store.executions.cancel(tenant, parent.id)
    statuses = await store.executions.status_of([parent.id, child_id, grandchild_id])
    assert statuses == {parent.id: "cancelled", child_id: "cancelled", grandchild_id: "cancelled"}
    cancelled = await store.executions.get(tenant, grandchild_id)
    assert cancelled.error["message"] == "its parent execution was cancelled"
    await _run_all(engine, store, tenant, [parent.id])  # nothing runs again
    assert (await store.executions.status_of([grandchild_id])) == {grandchild_id: "cancelled"}


async def test_cancelling_a_child_fails_the_parent_step(store: Store, settings: Settings) -> None:
    clock = Clock()
    tenant = (await store.tenants.create("acme")).id
    leaf = await _workflow(store, tenant, [{"id": "w", "type": "wait", "event": "go"}], "leaf")
    top = await _workflow(
        store, tenant, [{"id": "call", "type": "workflow", "workflow": leaf}], "top"
    )
    parent, _ = await store.executions.create(tenant, top)
    engine = _engine(store, settings, clock)
    await _run_all(engine, store, tenant, [parent.id])
    (child_id,) = await _children(store, parent.id)
    await store.executions.cancel(tenant, child_id)  # wakes the parent (at the real time)
    clock.advance(1)
    assert (await engine.run(parent.id)).kind is OutcomeKind.FAILED
    result = await store.executions.get(tenant, parent.id)
    assert result.error["type"] == "ChildFailed" and result.error["code"] == "child_cancelled"


async def test_depth_is_bounded(store: Store, settings: Settings) -> None:
    clock = Clock()
    shallow = settings.model_copy(update={"workflow_max_depth": 1})
    tenant = (await store.tenants.create("acme")).id
    leaf = await _workflow(store, tenant, [{"id": "n", "type": "noop"}], "leaf")
    middle = await _workflow(
        store, tenant, [{"id": "deeper", "type": "workflow", "workflow": leaf}], "middle"
    )
    top = await _workflow(
        store, tenant, [{"id": "call", "type": "workflow", "workflow": middle}], "top"
    )
    parent, _ = await store.executions.create(tenant, top)
    engine = _engine(store, shallow, clock)
    await _run_all(engine, store, tenant, [parent.id])
    (child_id,) = await _children(store, parent.id)
    assert await _children(store, child_id) == []  # never created
    child = await store.executions.get(tenant, child_id)
    assert child.status == "failed" and child.error["code"] == "workflow_depth_exceeded"
    assert "WORKFLOW_MAX_DEPTH" in child.error["message"]
    result = await store.executions.get(tenant, parent.id)
    assert result.status == "failed" and result.error["code"] == "child_failed"


async def test_unknown_or_foreign_workflow_fails_the_step(store: Store, settings: Settings) -> None:
    clock = Clock()
    tenant = (await store.tenants.create("acme")).id
    other = (await store.tenants.create("globex")).id
    foreign = await _workflow(store, other, [{"id": "n", "type": "noop"}], "theirs")
    engine = _engine(store, settings, clock)
    for target in (foreign, "nosuchworkflow"):
        wf = await _workflow(
            store, tenant, [{"id": "call", "type": "workflow", "workflow": target}], "p"
        )
        parent, _ = await store.executions.create(tenant, wf)
        assert (await engine.run(parent.id)).kind is OutcomeKind.FAILED
        result = await store.executions.get(tenant, parent.id)
        assert result.error["type"] == "NotFound"
        assert result.error["message"] == f"cannot start workflow {target!r}: workflow not found"
        assert await _children(store, parent.id) == []


async def test_a_timeout_fails_the_step_and_cancels_the_child(
    store: Store, settings: Settings
) -> None:
    clock = Clock()
    tenant = (await store.tenants.create("acme")).id
    leaf = await _workflow(store, tenant, [{"id": "w", "type": "wait", "event": "go"}], "leaf")
    top = await _workflow(
        store,
        tenant,
        [{"id": "call", "type": "workflow", "workflow": leaf, "timeout_s": 60}],
        "top",
    )
    parent, _ = await store.executions.create(tenant, top)
    engine = _engine(store, settings, clock)
    parked = await engine.run(parent.id)
    assert parked.kind is OutcomeKind.WAITING and parked.wake_at == clock.now + timedelta(
        seconds=60
    )
    (child_id,) = await _children(store, parent.id)
    assert (await engine.run(child_id)).kind is OutcomeKind.WAITING
    clock.advance(61)
    assert (await engine.run(parent.id)).kind is OutcomeKind.FAILED
    result = await store.executions.get(tenant, parent.id)
    assert result.error["type"] == "WaitTimeout" and result.error["childId"] == child_id
    assert (await store.executions.status_of([child_id])) == {child_id: "cancelled"}


async def test_a_trigger_cannot_pass_for_the_child(store: Store, settings: Settings) -> None:
    clock = Clock()
    tenant = (await store.tenants.create("acme")).id
    leaf = await _workflow(store, tenant, [{"id": "n", "type": "noop"}], "leaf")
    top = await _workflow(
        store, tenant, [{"id": "call", "type": "workflow", "workflow": leaf}], "top"
    )
    parent, _ = await store.executions.create(tenant, top)
    # a trigger that reuses the key the child would get is not taken for the child
    await store.executions.create(tenant, leaf, idempotency_key=f"conveyor.child:{parent.id}:0")
    engine = _engine(store, settings, clock)
    assert (await engine.run(parent.id)).kind is OutcomeKind.FAILED
    result = await store.executions.get(tenant, parent.id)
    assert result.error["type"] == "Conflict"
    assert "idempotency key was used by another execution" in result.error["message"]
    assert await _children(store, parent.id) == []


async def _parked_on_a_child(store: Store, settings: Settings) -> tuple[str, Engine, str, str]:
    """A parent parked on its sub-workflow (one ``transform`` answering ``'ok'``), the child
    not run yet: ``(tenant, engine, parent id, child id)``."""
    tenant = (await store.tenants.create("acme")).id
    leaf = await _workflow(
        store, tenant, [{"id": "c", "type": "transform", "expression": "'ok'"}], "leaf"
    )
    top = await _workflow(
        store, tenant, [{"id": "call", "type": "workflow", "workflow": leaf}], "top"
    )
    parent, _ = await store.executions.create(tenant, top)
    engine = _engine(store, settings, Clock())
    assert (await engine.run(parent.id)).kind is OutcomeKind.WAITING
    (child_id,) = await _children(store, parent.id)
    return tenant, engine, parent.id, child_id


async def test_a_crash_after_the_child_ended_is_repaired_by_its_redelivery(
    store: Store, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    tenant, engine, parent_id, child_id = await _parked_on_a_child(store, settings)
    notify = store.children.notify_parent

    async def crash(*args: Any, **kwargs: Any) -> Any:
        raise Crash

    monkeypatch.setattr(store.children, "notify_parent", crash)
    with pytest.raises(Crash):  # the child's last write committed, then the process died
        await engine.run(child_id)
    assert (await store.executions.status_of([child_id])) == {child_id: "succeeded"}
    assert (await engine.run(parent_id)).kind is OutcomeKind.NOT_DUE  # not told yet
    monkeypatch.setattr(store.children, "notify_parent", notify)
    assert (await engine.run(child_id)).kind is OutcomeKind.SKIPPED  # the job's redelivery
    assert (await engine.run(parent_id)).kind is OutcomeKind.SUCCEEDED
    assert (await store.executions.get(tenant, parent_id)).output == "ok"


async def test_a_parent_the_database_could_not_be_told_of_is_told_on_the_next_delivery(
    store: Store, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child's last write committed, then telling its parent failed (the database went
    away between the two): the run says so (``parent_untold``: the worker defers the job
    instead of completing it), and so does a delivery that finds the child ended while the
    database is still away; the next delivery after it is back tells the parent — a parent
    waiting on a child without a timeout has no timer, nothing else would wake it."""
    tenant, engine, parent_id, child_id = await _parked_on_a_child(store, settings)
    notify = store.children.notify_parent

    async def unavailable(*args: Any, **kwargs: Any) -> Any:
        raise DatabaseUnavailable("database unavailable: connection refused")

    monkeypatch.setattr(store.children, "notify_parent", unavailable)
    ended = await engine.run(child_id)
    assert ended.kind is OutcomeKind.SUCCEEDED and ended.parent_untold and ended.retry_later
    assert (await store.executions.status_of([child_id])) == {child_id: "succeeded"}
    again = await engine.run(child_id)  # delivered again while the database is still away
    assert again.kind is OutcomeKind.SKIPPED and again.parent_untold
    assert (await engine.run(parent_id)).kind is OutcomeKind.NOT_DUE  # not told yet
    monkeypatch.setattr(store.children, "notify_parent", notify)
    told = await engine.run(child_id)
    assert told.kind is OutcomeKind.SKIPPED and not told.parent_untold
    assert (await engine.run(parent_id)).kind is OutcomeKind.SUCCEEDED
    assert (await store.executions.get(tenant, parent_id)).output == "ok"


async def test_concurrent_starts_of_one_step_run_create_one_child(store: Store) -> None:
    tenant = (await store.tenants.create("acme")).id
    leaf = await _workflow(store, tenant, [{"id": "n", "type": "noop"}], "leaf")
    top = await _workflow(
        store, tenant, [{"id": "call", "type": "workflow", "workflow": leaf}], "top"
    )
    parent, _ = await store.executions.create(tenant, top)

    async def start() -> tuple[Execution, bool]:
        return await store.children.start(
            tenant_id=tenant, parent_id=parent.id, seq=0, depth=1, workflow_id=leaf,
            version="latest", input={"i": 1}, now=utcnow(),
        )  # fmt: skip

    results = await asyncio.gather(*(start() for _ in range(8)))
    assert len({child.id for child, _ in results}) == 1
    assert [created for _, created in results].count(True) == 1
    assert len(await _children(store, parent.id)) == 1


async def test_a_childs_end_is_told_once_and_wakes_only_a_parked_parent(
    store: Store, settings: Settings
) -> None:
    """The child's end, told (by the runner that ended it, or read back by a redelivery): one
    event per child, stored in one transaction that wakes the parent only when it is parked
    on the step; a repeat, or a parent that has ended, stores nothing."""
    clock = Clock()
    tenant = (await store.tenants.create("told")).id
    leaf = await _workflow(store, tenant, [{"id": "c", "type": "noop"}], "leaf")
    top = await _workflow(
        store, tenant, [{"id": "call", "type": "workflow", "workflow": leaf}], "top"
    )
    parent, _ = await store.executions.create(tenant, top)
    engine = _engine(store, settings, clock)
    assert (await engine.run(parent.id)).kind is OutcomeKind.WAITING
    (child_id,) = await _children(store, parent.id)
    children = store.children
    assert await children.notify_parent(child_id, clock()) is None  # not ended yet: no event
    async with store.engine.begin() as conn:
        await conn.execute(
            executions.update().where(executions.c.id == child_id).values(status="succeeded")
        )
    told = await children.notify_parent(child_id, clock())
    assert told is not None
    sent, woken = told
    assert sent.woken == (parent.id,) and woken is not None and woken.id == parent.id
    assert (woken.tenant_id, woken.workflow_id, woken.status) == (tenant, top, "waiting")
    assert await store.events.pending(tenant, parent.id, "conveyor.workflow.0") == [sent.event_id]
    assert await children.notify_parent(child_id, clock()) is None  # told once
    # a parent that is not parked (running) gets the event, unwoken
    async with store.engine.begin() as conn:
        await conn.execute(
            executions.update().where(executions.c.id == parent.id).values(status="running")
        )
    second, third = [(await store.executions.create(tenant, leaf))[0] for _ in range(2)]
    async with store.engine.begin() as conn:
        await conn.execute(
            executions.update()
            .where(executions.c.id.in_([second.id, third.id]))
            .values(status="succeeded", parent_execution_id=parent.id, parent_seq=0)
        )
    told = await children.notify_parent(second.id, clock())
    assert told is not None and told[0].woken == () and told[1] is None
    pending = await store.events.pending(tenant, parent.id, "conveyor.workflow.0")
    assert sorted(pending) == sorted([sent.event_id, told[0].event_id])
    async with store.engine.begin() as conn:
        await conn.execute(
            executions.update().where(executions.c.id == parent.id).values(status="failed")
        )
    assert await children.notify_parent(third.id, clock()) is None  # the parent has ended
