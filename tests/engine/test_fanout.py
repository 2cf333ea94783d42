"""``parallel`` and ``foreach`` steps: children created once per branch / item, a foreach's
concurrency window, results in index order, ``mode: any``, failures cancelling the rest, the
fan-out bound, crashes between creating the children and parking, and a child that ends while
the parent decides (no lost wake-up). On SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import select

from conveyor.engine import Engine, OutcomeKind
from conveyor.errors import LeaseLost
from conveyor.settings import Settings
from conveyor.store import Execution, Store
from conveyor.store.children import Fanout
from conveyor.store.schema import executions
from tests.engine.test_subflows import Clock, Crash, Enqueued, _engine, _run_all, _workflow


async def _kids(store: Store, parent_id: str) -> list[Execution]:
    async with store.engine.connect() as conn:
        rows = await conn.execute(
            select(executions)
            .where(executions.c.parent_execution_id == parent_id)
            .order_by(executions.c.parent_index)
        )
        return [Execution.from_mapping(r._mapping) for r in rows]


def _jobs(engine: Engine) -> list[tuple[str, str, str]]:
    hook = engine.enqueue
    assert isinstance(hook, Enqueued)
    return hook.jobs


async def test_parallel_all_joins_outputs_in_branch_order(store: Store, settings: Settings) -> None:
    clock = Clock()
    tenant = (await store.tenants.create("acme")).id
    wf = await _workflow(store, tenant, [
        {"id": "base", "type": "transform", "expression": "input.n"},
        {"id": "fan", "type": "parallel", "input": {"n": "{{ steps.base }}"}, "branches": [
            [{"id": "double", "type": "transform", "expression": "sum([input.n, input.n])"}],
            [{"id": "triple", "type": "transform", "expression": "sum([input.n, input.n, input.n])"},
             {"id": "label", "type": "transform", "expression": "{tripled: steps.triple}"}],
            [{"id": "raw", "type": "transform", "expression": "input"}],
        ]},
        {"id": "after", "type": "transform", "expression": "steps.fan"},
    ], "fan")  # fmt: skip
    parent, _ = await store.executions.create(tenant, wf, {"n": 5})
    engine = _engine(store, settings, clock)
    parked = await engine.run(parent.id)
    assert parked.kind is OutcomeKind.WAITING and parked.wake_at is None
    kids = await _kids(store, parent.id)
    assert [(k.branch, k.parent_index, k.triggered_by, k.depth) for k in kids] == [
        ("fan.0", 0, "parallel", 1), ("fan.1", 1, "parallel", 1), ("fan.2", 2, "parallel", 1)
    ]  # fmt: skip
    assert all(k.input == {"n": 5} and k.parent_seq == 1 for k in kids)
    assert _jobs(engine) == [(k.id, "parallel", k.id) for k in kids]
    await _run_all(engine, store, tenant, [parent.id])
    done = await store.executions.get(tenant, parent.id, with_steps=True)
    assert done.status == "succeeded", done.error
    assert done.output == [10, {"tripled": 15}, {"n": 5}]
    fan = done.steps[1]
    assert (fan.step_id, fan.status, fan.input) == (
        "fan",
        "succeeded",
        {"branches": 3, "mode": "all"},
    )
    # each branch ran its own step list, as an execution of its own
    branch = await store.executions.get(tenant, kids[1].id, with_steps=True)
    assert [s.step_id for s in branch.steps] == ["triple", "label"]
    assert len(await _kids(store, parent.id)) == 3  # nothing created twice


async def test_parallel_any_takes_the_first_success_and_cancels_the_rest(
    store: Store, settings: Settings
) -> None:
    clock = Clock()
    tenant = (await store.tenants.create("acme")).id
    wf = await _workflow(store, tenant, [
        {"id": "race", "type": "parallel", "mode": "any", "branches": [
            [{"id": "slow", "type": "wait", "event": "never"}],
            [{"id": "fast", "type": "transform", "expression": "'won'"}],
        ]},
    ], "race")  # fmt: skip
    parent, _ = await store.executions.create(tenant, wf)
    engine = _engine(store, settings, clock)
    await engine.run(parent.id)
    slow, fast = await _kids(store, parent.id)
    assert (await engine.run(slow.id)).kind is OutcomeKind.WAITING
    assert (await engine.run(fast.id)).kind is OutcomeKind.SUCCEEDED
    assert (await engine.run(parent.id)).kind is OutcomeKind.SUCCEEDED
    done = await store.executions.get(tenant, parent.id)
    assert done.output == {"branch": 1, "output": "won"}
    assert (await store.executions.get(tenant, slow.id)).status == "cancelled"


async def test_a_failed_branch_fails_the_step_and_cancels_the_others(
    store: Store, settings: Settings
) -> None:
    clock = Clock()
    tenant = (await store.tenants.create("acme")).id
    wf = await _workflow(store, tenant, [
        {"id": "fan", "type": "parallel", "branches": [
            [{"id": "hang", "type": "wait", "event": "never"}],
            [{"id": "boom", "type": "transform", "expression": "abs(execution)"}],
        ]},
        {"id": "never_runs", "type": "noop"},
    ], "fails")  # fmt: skip
    parent, _ = await store.executions.create(tenant, wf)
    engine = _engine(store, settings, clock)
    await _run_all(engine, store, tenant, [parent.id])
    done = await store.executions.get(tenant, parent.id, with_steps=True)
    hang, boom = await _kids(store, parent.id)
    assert done.status == "failed"
    assert done.error is not None and done.error["type"] == "BranchFailed"
    assert done.error["code"] == "branch_failed" and done.error["step"] == "fan"
    assert done.error["details"]["index"] == 1 and done.error["details"]["childId"] == boom.id
    assert [s.step_id for s in done.steps] == ["fan"]
    assert (await store.executions.get(tenant, hang.id)).status == "cancelled"


async def test_foreach_keeps_the_window_and_returns_results_in_item_order(
    store: Store, settings: Settings
) -> None:
    clock = Clock()
    tenant = (await store.tenants.create("acme")).id
    wf = await _workflow(store, tenant, [
        {"id": "each", "type": "foreach", "items": "input.xs", "concurrency": 3,
         "input": {"x": "{{ item }}", "at": "{{ index }}", "tag": "{{ input.tag }}"},
         "steps": [{"id": "sq", "type": "transform",
                    "expression": "{v: sum([input.x, input.x]), at: input.at, tag: input.tag}"}]},
    ], "squares")  # fmt: skip
    xs = list(range(25))
    parent, _ = await store.executions.create(tenant, wf, {"xs": xs, "tag": "t"})
    engine = _engine(store, settings, clock)
    await engine.run(parent.id)
    most_active = 0
    for _ in range(200):  # finish children in reverse order of creation: out of order ends
        kids = await _kids(store, parent.id)
        active = [k for k in kids if k.status in ("queued", "running", "waiting")]
        most_active = max(most_active, len(active))
        if not active:
            break
        await engine.run(active[-1].id)
        await engine.run(parent.id)
    assert most_active == 3
    done = await store.executions.get(tenant, parent.id)
    assert done.status == "succeeded", done.error
    assert done.output == [{"v": 2 * x, "at": x, "tag": "t"} for x in xs]
    kids = await _kids(store, parent.id)
    assert [k.parent_index for k in kids] == xs and {k.branch for k in kids} == {"each"}


async def test_foreach_over_nothing_and_bad_items(store: Store, settings: Settings) -> None:
    clock = Clock()
    tenant = (await store.tenants.create("acme")).id
    small = settings.model_copy(update={"workflow_max_fanout": 4})
    wf = await _workflow(store, tenant, [
        {"id": "each", "type": "foreach", "items": "input.xs",
         "steps": [{"id": "n", "type": "noop"}]},
    ], "each")  # fmt: skip
    engine = _engine(store, small, clock)
    cases: list[tuple[Any, str, Any]] = [
        ({"xs": []}, "succeeded", None),
        ({"xs": "abc"}, "items_not_array", None),
        ({"xs": [1, 2, 3, 4, 5]}, "fanout_exceeded", None),
    ]
    for given, expected, _ in cases:
        execution, _ = await store.executions.create(tenant, wf, given)
        outcome = await engine.run(execution.id)
        done = await store.executions.get(tenant, execution.id)
        if expected == "succeeded":
            assert outcome.kind is OutcomeKind.SUCCEEDED and done.output == []
        else:
            assert done.status == "failed" and done.error is not None
            assert done.error["code"] == expected, done.error
            assert "WORKFLOW_MAX_FANOUT" in done.error["message"] or expected != "fanout_exceeded"
        assert await _kids(store, execution.id) == []


async def test_nested_foreach_in_a_branch(store: Store, settings: Settings) -> None:
    clock = Clock()
    tenant = (await store.tenants.create("acme")).id
    wf = await _workflow(store, tenant, [
        {"id": "fan", "type": "parallel", "branches": [
            [{"id": "each", "type": "foreach", "items": "input.xs", "concurrency": 2,
              "steps": [{"id": "inc", "type": "transform", "expression": "sum([input.item, `1`])"}]}],
            [{"id": "other", "type": "transform", "expression": "'b'"}],
        ]},
    ], "nested")  # fmt: skip
    parent, _ = await store.executions.create(tenant, wf, {"xs": [1, 2, 3]})
    engine = _engine(store, settings, clock)
    await _run_all(engine, store, tenant, [parent.id])
    done = await store.executions.get(tenant, parent.id)
    assert done.status == "succeeded", done.error
    assert done.output == [[2, 3, 4], "b"]
    first, _ = await _kids(store, parent.id)
    assert {k.branch for k in await _kids(store, first.id)} == {"fan.0/each"}
    assert all(k.depth == 2 for k in await _kids(store, first.id))


async def test_a_crash_after_creating_the_children_creates_none_twice(
    store: Store, settings: Settings
) -> None:
    clock = Clock()
    tenant = (await store.tenants.create("acme")).id
    wf = await _workflow(store, tenant, [
        {"id": "each", "type": "foreach", "items": "input.xs", "concurrency": 4,
         "steps": [{"id": "n", "type": "transform", "expression": "input.item"}]},
    ], "crashy")  # fmt: skip
    parent, _ = await store.executions.create(tenant, wf, {"xs": list(range(6))})
    engine = Engine(store, settings, clock=clock, lease_ttl_s=30)

    async def crash(execution: Execution, reason: str, job_id: str) -> None:
        raise Crash  # the process dies between creating the children and parking

    engine.enqueue = crash
    try:
        await engine.run(parent.id)
    except Crash:
        pass
    else:
        raise AssertionError("the enqueue hook was not called")
    assert len(await _kids(store, parent.id)) == 4
    assert (await store.executions.get(tenant, parent.id)).status == "running"
    clock.advance(31)  # its lease expires: the next delivery takes over
    engine.enqueue = Enqueued()
    assert (await engine.run(parent.id)).kind is OutcomeKind.WAITING
    kids = await _kids(store, parent.id)
    assert len(kids) == 4  # the same four
    # none of them ever had a job (the crash came first): the new run enqueues them
    assert _jobs(engine) == [(k.id, "foreach", k.id) for k in kids]
    await _run_all(engine, store, tenant, [parent.id])
    done = await store.executions.get(tenant, parent.id)
    assert done.status == "succeeded" and done.output == list(range(6))
    assert [k.parent_index for k in await _kids(store, parent.id)] == list(range(6))


async def test_a_child_ending_while_the_parent_decides_is_not_lost(
    store: Store, settings: Settings
) -> None:
    """The parent reads the summary, a child ends (its event sent) before the parent parks:
    the park sees an event it did not read and looks again instead of sleeping forever."""
    clock = Clock()
    tenant = (await store.tenants.create("acme")).id
    wf = await _workflow(store, tenant, [
        {"id": "fan", "type": "parallel", "branches": [
            [{"id": "a", "type": "transform", "expression": "'a'"}],
            [{"id": "b", "type": "transform", "expression": "'b'"}],
        ]},
    ], "race")  # fmt: skip
    parent, _ = await store.executions.create(tenant, wf)
    engine = _engine(store, settings, clock)
    assert (await engine.run(parent.id)).kind is OutcomeKind.WAITING
    first, second = await _kids(store, parent.id)
    assert (await engine.run(first.id)).kind is OutcomeKind.SUCCEEDED
    real = store.children.fanout
    raced: list[str] = []

    async def stale_then_end(
        tenant_id: str, parent_id: str, seq: int, *, winner: bool = True
    ) -> Fanout:
        state = await real(tenant_id, parent_id, seq, winner=winner)
        if not raced:  # the last child ends right after the parent's read
            raced.append(second.id)
            assert (await engine.run(second.id)).kind is OutcomeKind.SUCCEEDED
        return state

    store.children.fanout = stale_then_end  # type: ignore[method-assign]
    try:
        outcome = await engine.run(parent.id)
    finally:
        del store.children.fanout
    assert raced == [second.id]
    assert outcome.kind is OutcomeKind.SUCCEEDED  # it looked again in the same run
    assert (await store.executions.get(tenant, parent.id)).output == ["a", "b"]


async def test_cancelling_the_parent_cancels_every_branch(store: Store, settings: Settings) -> None:
    clock = Clock()
    tenant = (await store.tenants.create("acme")).id
    wf = await _workflow(store, tenant, [
        {"id": "each", "type": "foreach", "items": "input.xs", "concurrency": 2,
         "steps": [{"id": "w", "type": "wait", "event": "go"}]},
    ], "cancel")  # fmt: skip
    parent, _ = await store.executions.create(tenant, wf, {"xs": [1, 2, 3]})
    engine = _engine(store, settings, clock)
    await engine.run(parent.id)
    for kid in await _kids(store, parent.id):
        await engine.run(kid.id)
    await store.executions.cancel(tenant, parent.id)
    kids = await _kids(store, parent.id)
    assert len(kids) == 2 and {k.status for k in kids} == {"cancelled"}
    assert (await engine.run(parent.id)).kind is OutcomeKind.SKIPPED
    assert len(await _kids(store, parent.id)) == 2  # nothing started after the cancel


async def test_children_are_created_once_per_index(store: Store, settings: Settings) -> None:
    """Two runners of one step run (a stale one and its successor) create each child once."""
    clock = Clock()
    tenant = (await store.tenants.create("acme")).id
    wf = await _workflow(store, tenant, [
        {"id": "each", "type": "foreach", "items": "input.xs",
         "steps": [{"id": "n", "type": "noop"}]},
    ], "once")  # fmt: skip
    parent, _ = await store.executions.create(tenant, wf, {"xs": [1, 2, 3]})
    claim = await store.runs.claim(parent.id, clock(), clock.advance(30))
    assert claim is not None
    inputs = [(i, None, {"item": i}) for i in range(3)]
    first, second = await asyncio.gather(
        store.children.start_branches(claim, seq=0, branch="each", kind="foreach",
                                      inputs=inputs, now=clock()),
        store.children.start_branches(claim, seq=0, branch="each", kind="foreach",
                                      inputs=inputs, now=clock()),
    )  # fmt: skip
    kids = await _kids(store, parent.id)
    assert [k.parent_index for k in kids] == [0, 1, 2]
    assert sorted(c.id for c in [*first, *second]) == sorted(k.id for k in kids)
    again = await store.children.start_branches(
        claim,
        seq=0,
        branch="each",
        kind="foreach",
        inputs=[*inputs, (3, None, {"item": 3})],
        now=clock(),
    )
    assert [c.parent_index for c in again] == [3] and len(await _kids(store, parent.id)) == 4


async def test_a_timeout_fails_the_step_and_cancels_what_still_runs(
    store: Store, settings: Settings
) -> None:
    clock = Clock()
    tenant = (await store.tenants.create("acme")).id
    wf = await _workflow(store, tenant, [
        {"id": "fan", "type": "parallel", "timeout_s": 60, "branches": [
            [{"id": "quick", "type": "noop"}],
            [{"id": "stuck", "type": "wait", "event": "never"}],
        ]},
    ], "timeout")  # fmt: skip
    parent, _ = await store.executions.create(tenant, wf)
    engine = _engine(store, settings, clock)
    parked = await engine.run(parent.id)
    assert parked.kind is OutcomeKind.WAITING and parked.timer_id is not None
    assert parked.wake_at == clock.now + timedelta(seconds=60)
    quick, stuck = await _kids(store, parent.id)
    await engine.run(quick.id)
    await engine.run(stuck.id)
    woken = await engine.run(parent.id)  # the quick branch's end: not joined yet
    assert woken.kind is OutcomeKind.WAITING and woken.wake_at == parked.wake_at
    assert (await engine.run(parent.id)).kind is OutcomeKind.NOT_DUE
    clock.advance(61)
    assert (await engine.run(parent.id)).kind is OutcomeKind.FAILED
    done = await store.executions.get(tenant, parent.id)
    assert done.error is not None and done.error["type"] == "WaitTimeout"
    assert "did not end within 60s" in done.error["message"]
    assert (await store.executions.get(tenant, stuck.id)).status == "cancelled"
    assert (await store.executions.get(tenant, quick.id)).status == "succeeded"


async def test_a_stale_runner_creates_no_children(store: Store, settings: Settings) -> None:
    """Creating children is fenced by the parent's lease: a runner whose lease expired while
    it decided (another took over) would start items beyond the window."""
    clock = Clock()
    tenant = (await store.tenants.create("acme")).id
    wf = await _workflow(store, tenant, [
        {"id": "each", "type": "foreach", "items": "input.xs",
         "steps": [{"id": "n", "type": "noop"}]},
    ], "stale")  # fmt: skip
    parent, _ = await store.executions.create(tenant, wf, {"xs": [1, 2]})
    stale = await store.runs.claim(parent.id, clock(), clock() + timedelta(seconds=30))
    assert stale is not None
    clock.advance(31)  # its lease expired: the next runner takes over
    assert await store.runs.claim(parent.id, clock(), clock() + timedelta(seconds=30))
    with pytest.raises(LeaseLost):
        await store.children.start_branches(
            stale,
            seq=0,
            branch="each",
            kind="foreach",
            inputs=[(0, None, {"item": 1})],
            now=clock(),
        )
    assert await _kids(store, parent.id) == []
