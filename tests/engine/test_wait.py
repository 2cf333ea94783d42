"""``wait`` steps: events delivered once, before or after the step is reached; timeouts."""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import select

from conveyor.engine import Engine, OutcomeKind
from conveyor.errors import Conflict, LeaseLost, NotFound
from conveyor.settings import Settings
from conveyor.store import ExecutionWrite, StepWrite, Store, utcnow
from conveyor.store.schema import events
from conveyor.workers.retention import Retention
from tests.engine._support import start


class Clock:
    def __init__(self) -> None:
        self.now = utcnow()

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


def _workflow(**wait: Any) -> list[dict[str, Any]]:
    return [
        {"id": "a", "type": "noop"},
        {"id": "t", "type": "transform", "expression": "input"},
        {"id": "w", "type": "wait", "event": "paid", **wait},
        {"id": "b", "type": "transform", "expression": "steps.w.payload.amount"},
    ]


async def test_event_after_the_wait_resumes_with_its_payload(
    store: Store, settings: Settings
) -> None:
    clock = Clock()
    tenant, execution_id = await start(store, _workflow(timeout_s=60), {"n": 1})
    engine = Engine(store, settings, clock=clock)
    parked = await engine.run(execution_id)
    deadline = clock.now + timedelta(seconds=60)
    assert parked.kind is OutcomeKind.WAITING and parked.wake_at == deadline
    waiting = await store.executions.get(tenant, execution_id, with_steps=True)
    assert waiting.status == "waiting" and waiting.wake_at == deadline
    assert waiting.next_step == 2  # the cursor stays on the wait step
    assert [s.step_id for s in waiting.steps] == ["a", "t"]  # pure steps flushed with the park
    timers = await store.timers.for_execution(tenant, execution_id)
    assert [(t.status, t.due_at, t.seq) for t in timers] == [("pending", deadline, 2)]
    wait = await store.events.wait_of(execution_id)
    assert wait is not None and (wait.name, wait.seq, wait.deadline) == ("paid", 2, deadline)

    clock.advance(5)
    early = await engine.run(execution_id)  # nothing arrived: not due before the deadline
    assert early.kind is OutcomeKind.NOT_DUE

    other, _ = await store.events.send(tenant, execution_id, "shipped", {"x": 1}, clock.now)
    assert other.woken == ()  # another event's name does not wake it
    sent, _ = await store.events.send(tenant, execution_id, "paid", {"amount": 42}, clock.now)
    assert sent.woken == (execution_id,)
    clock.advance(1)
    done = await engine.run(execution_id)
    assert done.kind is OutcomeKind.SUCCEEDED
    execution = await store.executions.get(tenant, execution_id, with_steps=True)
    assert execution.output == 42 and execution.attempts == 1
    assert [s.step_id for s in execution.steps] == ["a", "t", "w", "b"]
    step = execution.steps[2]
    assert step.seq == 2 and step.status == "succeeded"
    assert step.output["event"] == "paid" and step.output["payload"] == {"amount": 42}
    assert step.input["eventId"] == sent.event_id and step.started_at < step.finished_at
    events = {e.id: e for e in await store.events.for_execution(tenant, execution_id)}
    assert events[sent.event_id].consumed_by == execution_id
    assert events[sent.event_id].consumed_seq == 2
    assert events[other.event_id].consumed_at is None  # kept for a wait on "shipped"
    assert await store.events.wait_of(execution_id) is None


async def test_an_event_sent_before_the_step_is_received_without_parking(
    store: Store, settings: Settings
) -> None:
    clock = Clock()
    tenant, execution_id = await start(store, _workflow(), {"n": 1})
    sent, execution = await store.events.send(
        tenant, execution_id, "paid", {"amount": 7}, clock.now
    )
    assert execution.status == "queued" and sent.woken == ()
    clock.advance(1)
    outcome = await Engine(store, settings, clock=clock).run(execution_id)
    assert outcome.kind is OutcomeKind.SUCCEEDED
    done = await store.executions.get(tenant, execution_id, with_steps=True)
    assert done.output == 7
    assert await store.timers.for_execution(tenant, execution_id) == []
    again = await store.events.find(tenant, execution_id, done.workflow_id, "paid", None)
    assert again is None  # consumed


async def test_without_a_timeout_it_waits_until_the_event(store: Store, settings: Settings) -> None:
    clock = Clock()
    tenant, execution_id = await start(store, _workflow())
    engine = Engine(store, settings, clock=clock)
    assert (await engine.run(execution_id)).kind is OutcomeKind.WAITING
    clock.advance(10 * 365 * 86400)
    later = await engine.run(execution_id)  # a duplicate delivery: nothing to do
    assert later.kind is OutcomeKind.NOT_DUE and later.retry_after_s is None
    assert await store.timers.for_execution(tenant, execution_id) == []
    await store.events.send(tenant, execution_id, "paid", {"amount": 1}, clock.now)
    assert (await engine.run(execution_id)).kind is OutcomeKind.SUCCEEDED


@pytest.mark.parametrize(
    ("on_timeout", "status", "ran"),
    [
        ("fail", "failed", ["a", "t", "w"]),
        ("continue", "succeeded", ["a", "t", "w", "b", "c"]),
        ("end", "succeeded", ["a", "t", "w"]),
        ({"goto": "c"}, "succeeded", ["a", "t", "w", "c"]),
    ],
)
async def test_timeout(
    store: Store, settings: Settings, on_timeout: Any, status: str, ran: list[str]
) -> None:
    clock = Clock()
    steps = [
        *_workflow(timeout_s=30, on_timeout=on_timeout)[:3],
        {"id": "b", "type": "transform", "expression": "steps.w"},
        {"id": "c", "type": "transform", "expression": "steps.w"},
    ]
    tenant, execution_id = await start(store, steps)
    engine = Engine(store, settings, clock=clock)
    assert (await engine.run(execution_id)).kind is OutcomeKind.WAITING
    clock.advance(29)
    assert (await engine.run(execution_id)).kind is OutcomeKind.NOT_DUE
    clock.advance(1)  # the timer's due time: the dispatcher enqueues it
    outcome = await engine.run(execution_id)
    assert outcome.kind.value == status
    done = await store.executions.get(tenant, execution_id, with_steps=True)
    assert [s.step_id for s in done.steps] == ran
    wait_run = done.steps[2]
    if on_timeout == "fail":
        assert wait_run.status == "failed" and wait_run.error["type"] == "WaitTimeout"
        assert done.error["step"] == "w" and done.error["type"] == "WaitTimeout"
    else:
        assert wait_run.output == {"timedOut": True}
        if ran[-1] == "c":
            assert done.output == {"timedOut": True}
    assert await store.events.wait_of(execution_id) is None
    # an event that comes too late stays unconsumed (a finished execution refuses it)
    with pytest.raises(Conflict):
        await store.events.send(tenant, execution_id, "paid", {}, clock.now)


async def test_two_racing_runners_deliver_the_event_exactly_once(
    store: Store, settings: Settings
) -> None:
    clock = Clock()
    tenant, execution_id = await start(store, _workflow(timeout_s=60))
    first, second = (Engine(store, settings, clock=clock) for _ in range(2))
    assert (await first.run(execution_id)).kind is OutcomeKind.WAITING
    await store.events.send(tenant, execution_id, "paid", {"amount": 3}, clock.now)
    outcomes = await asyncio.gather(first.run(execution_id), second.run(execution_id))
    kinds = sorted(o.kind.value for o in outcomes)
    assert kinds.count("succeeded") == 1, kinds
    done = await store.executions.get(tenant, execution_id, with_steps=True)
    assert [s.step_id for s in done.steps] == ["a", "t", "w", "b"] and done.output == 3
    consumed = [e for e in await store.events.for_execution(tenant, execution_id)]
    assert [(e.consumed_by, e.consumed_seq) for e in consumed] == [(execution_id, 2)]


async def test_a_kept_webhook_event_goes_to_one_of_two_racing_executions(
    store: Store, settings: Settings
) -> None:
    clock = Clock()
    steps = _workflow(correlation="input.order")
    tenant, first = await start(store, steps, {"order": "o-1"})
    execution = await store.executions.get(tenant, first)
    second, _ = await store.executions.create(tenant, execution.workflow_id, {"order": "o-1"})
    sent = await store.events.send_webhook(
        tenant, execution.workflow_id, "paid", "o-1", {"amount": 5}, clock.now
    )
    assert sent.woken == ()  # nobody waits yet: kept
    engine = Engine(store, settings, clock=clock)
    outcomes = await asyncio.gather(engine.run(first), engine.run(second.id))
    assert sorted(o.kind.value for o in outcomes) == ["succeeded", "waiting"]
    waiting = next(o.execution_id for o in outcomes if o.kind is OutcomeKind.WAITING)
    # the next webhook event with that correlation wakes the one still waiting
    again = await store.events.send_webhook(
        tenant, execution.workflow_id, "paid", "o-1", {"amount": 6}, clock.now
    )
    assert again.woken == (waiting,)
    assert (await engine.run(waiting)).kind is OutcomeKind.SUCCEEDED
    other = await store.events.send_webhook(
        tenant, execution.workflow_id, "paid", "o-2", {"amount": 9}, clock.now
    )
    assert other.woken == ()  # another correlation value: kept for its own execution
    outputs = sorted([(await store.executions.get(tenant, x)).output for x in (first, second.id)])
    assert outputs == [5, 6]


async def test_webhook_events_wake_every_execution_waiting_on_the_correlation(
    store: Store, settings: Settings
) -> None:
    clock = Clock()
    tenant, first = await start(store, _workflow(correlation="input.order"), {"order": 17})
    workflow_id = (await store.executions.get(tenant, first)).workflow_id
    second, _ = await store.executions.create(tenant, workflow_id, {"order": 17})
    third, _ = await store.executions.create(tenant, workflow_id, {"order": 18})
    engine = Engine(store, settings, clock=clock)
    for execution_id in (first, second.id, third.id):
        assert (await engine.run(execution_id)).kind is OutcomeKind.WAITING
    sent = await store.events.send_webhook(
        tenant, workflow_id, "paid", "17", {"amount": 1}, clock.now
    )
    assert sorted(sent.woken) == sorted([first, second.id])  # a number correlates as its JSON
    for execution_id in sent.woken:
        assert (await engine.run(execution_id)).kind is OutcomeKind.SUCCEEDED
    assert (await store.executions.get(tenant, third.id)).status == "waiting"


async def test_events_are_tenant_isolated(store: Store, settings: Settings) -> None:
    clock = Clock()
    tenant, execution_id = await start(store, _workflow())
    intruder = (await store.tenants.create("intruder")).id
    with pytest.raises(NotFound):
        await store.events.send(intruder, execution_id, "paid", {}, clock.now)
    with pytest.raises(NotFound):
        await store.events.send(tenant, "0" * 32, "paid", {}, clock.now)
    assert await store.events.for_execution(intruder, execution_id) == []


async def test_a_correlation_that_is_not_a_string_or_number_fails_the_step(
    store: Store, settings: Settings
) -> None:
    tenant, execution_id = await start(store, _workflow(correlation="input"), {"k": [1]})
    outcome = await Engine(store, settings).run(execution_id)
    assert outcome.kind is OutcomeKind.FAILED
    done = await store.executions.get(tenant, execution_id)
    assert done.error["step"] == "w" and "correlation" in done.error["message"]


async def test_cancelled_while_waiting(store: Store, settings: Settings) -> None:
    clock = Clock()
    tenant, execution_id = await start(store, _workflow(timeout_s=5))
    engine = Engine(store, settings, clock=clock)
    assert (await engine.run(execution_id)).kind is OutcomeKind.WAITING
    await store.executions.cancel(tenant, execution_id)
    with pytest.raises(Conflict):
        await store.events.send(tenant, execution_id, "paid", {}, clock.now)
    clock.advance(10)
    assert (await engine.run(execution_id)).kind is OutcomeKind.SKIPPED


async def test_the_fenced_write_consumes_an_event_once(store: Store, settings: Settings) -> None:
    """A stale runner's write consumes nothing; a second consumption writes nothing."""
    clock = Clock()
    tenant, execution_id = await start(store, [{"id": "w", "type": "wait", "event": "go"}])
    sent, _ = await store.events.send(tenant, execution_id, "go", {"n": 1}, clock.now)
    stale = await store.runs.claim(execution_id, clock.now, clock.now + timedelta(seconds=1))
    assert stale is not None
    later = clock.advance(2)
    current = await store.runs.claim(execution_id, later, later + timedelta(seconds=60))
    assert current is not None and current.lease == stale.lease + 1

    def step(seq: int) -> StepWrite:
        return StepWrite(seq=seq, step_id="w", step_type="wait", status="succeeded", attempts=1,
                         input=None, input_json=None, output={"n": 1}, output_json='{"n":1}',
                         output_truncated=False, error=None, error_json=None, started_at=later,
                         finished_at=later)  # fmt: skip

    write = ExecutionWrite(status="running", next_step=1, steps_run=1, now=later,
                           lease_expires_at=later + timedelta(seconds=60))  # fmt: skip
    with pytest.raises(LeaseLost):
        await store.events.receive(stale, write, [step(0)], sent.event_id)
    (event,) = await store.events.for_execution(tenant, execution_id)
    assert event.consumed_at is None
    assert await store.events.receive(current, write, [step(0)], sent.event_id) == "running"
    again = ExecutionWrite(status="running", next_step=1, steps_run=2, now=later,
                           lease_expires_at=later + timedelta(seconds=60))  # fmt: skip
    assert await store.events.receive(current, again, [step(1)], sent.event_id) is None
    done = await store.executions.get(tenant, execution_id, with_steps=True)
    assert [s.seq for s in done.steps] == [0] and done.steps_run == 1  # rolled back
    (event,) = await store.events.for_execution(tenant, execution_id)
    assert (event.consumed_by, event.consumed_seq) == (execution_id, 0)


async def test_no_wake_up_is_lost_when_events_race_the_parking(
    store: Store, settings: Settings
) -> None:
    """Events sent while their executions run towards the wait step: each execution either
    receives its event in that run or is parked and woken by it — none stays parked with its
    event unconsumed."""
    clock = Clock()
    steps = [{"id": "a", "type": "noop"}, *_workflow(timeout_s=3600)[1:]]
    tenant, first = await start(store, steps, {"n": 0})
    workflow_id = (await store.executions.get(tenant, first)).workflow_id
    ids = [first]
    for n in range(1, 16):
        created, _ = await store.executions.create(tenant, workflow_id, {"n": n})
        ids.append(created.id)
    engine = Engine(store, settings, clock=clock)

    async def send(execution_id: str, n: int) -> None:
        await asyncio.sleep(0.015 * n)
        await store.events.send(tenant, execution_id, "paid", {"amount": n}, clock.now)

    await asyncio.gather(*(engine.run(x) for x in ids), *(send(x, n) for n, x in enumerate(ids)))
    for n, execution_id in enumerate(ids):
        execution = await store.executions.get(tenant, execution_id)
        if execution.status == "waiting":  # parked first: the event must have woken it
            assert execution.wake_at is not None and execution.wake_at <= clock.now, execution
            assert (await engine.run(execution_id)).kind is OutcomeKind.SUCCEEDED
        done = await store.executions.get(tenant, execution_id)
        assert done.status == "succeeded" and done.output == n


async def test_retention_deletes_kept_webhook_events_nobody_received(
    store: Store, settings: Settings
) -> None:
    clock = Clock()
    tenant, execution_id = await start(store, _workflow(correlation="input.o"), {"o": "x"})
    workflow_id = (await store.executions.get(tenant, execution_id)).workflow_id
    old = clock.now - timedelta(days=15)  # past the 14-day default retention
    stale = await store.events.send_webhook(tenant, workflow_id, "paid", "nobody", {}, old)
    fresh = await store.events.send_webhook(tenant, workflow_id, "paid", "soon", {}, clock.now)
    taken = await store.events.send_webhook(tenant, workflow_id, "paid", "x", {"amount": 1}, old)
    outcome = await Engine(store, settings, clock=clock).run(execution_id)
    assert outcome.kind is OutcomeKind.SUCCEEDED  # received the old kept event
    report = await Retention(store, settings, clock=clock).run_pass()
    assert report.complete
    async with store.engine.connect() as conn:
        rows = (await conn.execute(select(events.c.id, events.c.execution_id))).all()
    left = {row.id: row.execution_id for row in rows}
    assert stale.event_id not in left
    # the one received is its execution's now (it goes with it); the recent one stays kept
    assert left == {fresh.event_id: None, taken.event_id: execution_id}


async def test_concurrent_sends_with_one_idempotency_key_store_one_event(
    store: Store, settings: Settings
) -> None:
    clock = Clock()
    tenant, execution_id = await start(store, _workflow())
    results = await asyncio.gather(
        *(
            store.events.send(tenant, execution_id, "paid", {"n": 1}, clock.now,
                              idempotency_key="k-1")
            for _ in range(5)
        )
    )  # fmt: skip
    ids = {sent.event_id for sent, _ in results}
    assert len(ids) == 1
    assert sum(sent.replayed is None for sent, _ in results) == 1  # one stored, four replays
    assert len(await store.events.for_execution(tenant, execution_id)) == 1
