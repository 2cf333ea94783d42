"""Redelivery safety: crashes, racing runners, stale runners, cancellation, abandonment."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from conveyor.engine import Engine, OutcomeKind
from conveyor.settings import Settings
from conveyor.store import Store, utcnow
from conveyor.workflows import StepContext, StepResult
from tests.engine._support import Recorder, slow_step, start


class Crash(BaseException):
    """Stands in for the process dying mid-step: nothing in the engine catches it."""


async def test_redelivery_after_a_crash_mid_step_two(store: Store, settings: Settings) -> None:
    tenant, execution_id = await start(
        store,
        [
            slow_step("one"),  # a durable step: committed before step two starts
            {"id": "two", "type": "transform", "expression": "steps.one"},
            {"id": "three", "type": "noop"},
        ],
        {"n": 41},
    )
    recorder = Recorder()

    async def answer(ctx: StepContext, call: int) -> StepResult:
        return StepResult(output=ctx.input["n"])

    async def crash_first_time(ctx: StepContext, call: int) -> StepResult | None:
        if call == 1:
            raise Crash
        return None

    recorder.hooks["one"] = answer
    recorder.hooks["two"] = crash_first_time
    engine = Engine(store, settings, step_runner=recorder, lease_ttl_s=1.0)
    with pytest.raises(Crash):
        await engine.run(execution_id)
    mid = await store.executions.get(tenant, execution_id, with_steps=True)
    assert mid.status == "running" and [s.step_id for s in mid.steps] == ["one"]

    busy = await engine.run(execution_id)  # the dead runner's lease has not expired yet
    assert busy.kind is OutcomeKind.BUSY and busy.retry_later
    assert busy.retry_after_s is not None and 0 < busy.retry_after_s <= 1.0
    await asyncio.sleep(busy.retry_after_s + 0.05)

    outcome = await engine.run(execution_id)
    assert outcome.kind is OutcomeKind.SUCCEEDED and outcome.steps_run == 2
    assert recorder.calls == {"one": 1, "two": 2, "three": 1}  # step one ran once
    done = await store.executions.get(tenant, execution_id, with_steps=True)
    assert [s.step_id for s in done.steps] == ["one", "two", "three"]
    assert done.steps[1].output == 41  # resumed with step one's stored output
    assert done.attempts == 2 and done.lease == 2


async def test_a_crash_between_pure_steps_resumes_at_the_last_durable_step(
    store: Store, settings: Settings
) -> None:
    """Pure steps (transform, condition, noop) are recorded with the next durable write: a
    crash after them, before it, runs them again — with the same outputs — from the last
    durable step, which does not run again; the records come out complete and in order."""
    tenant, execution_id = await start(
        store,
        [
            slow_step("fetch"),
            {"id": "shape", "type": "transform", "expression": "{total: steps.fetch.total}"},
            {"id": "big", "type": "condition", "expression": "steps.shape.total > `100`"},
            {"id": "label", "type": "transform", "expression": "join('-', ['big', input.k])"},
            slow_step("notify"),
            {"id": "done", "type": "noop"},
        ],
        {"k": "x"},
    )
    recorder = Recorder()

    async def fetch(ctx: StepContext, call: int) -> StepResult:
        return StepResult(output={"total": 150})

    async def notify(ctx: StepContext, call: int) -> StepResult:
        if call == 1:
            raise Crash  # the process dies while the durable step after the pure ones runs
        return StepResult(output={"sent": ctx.steps["label"]})

    recorder.hooks["fetch"] = fetch
    recorder.hooks["notify"] = notify
    engine = Engine(store, settings, step_runner=recorder, lease_ttl_s=0.5)
    with pytest.raises(Crash):
        await engine.run(execution_id)
    mid = await store.executions.get(tenant, execution_id, with_steps=True)
    assert [s.step_id for s in mid.steps] == ["fetch"]  # the pure steps wrote nothing
    assert mid.status == "running" and mid.steps_run == 1

    await asyncio.sleep(0.6)  # the dead runner's lease expires
    outcome = await engine.run(execution_id)
    assert outcome.kind is OutcomeKind.SUCCEEDED
    assert recorder.calls == {"fetch": 1, "shape": 2, "big": 2, "label": 2, "notify": 2, "done": 1}
    done = await store.executions.get(tenant, execution_id, with_steps=True)
    assert [(s.seq, s.step_id) for s in done.steps] == list(
        enumerate(["fetch", "shape", "big", "label", "notify", "done"])
    )
    assert done.steps[1].output == {"total": 150}
    assert done.steps[3].output == "big-x"
    assert done.steps[4].output == {"sent": "big-x"}
    assert done.steps_run == 6 and done.status == "succeeded"


async def test_racing_runners_exactly_one_wins(store: Store, settings: Settings) -> None:
    tenant, execution_id = await start(store, [{"id": "a", "type": "noop"}])
    recorder = Recorder()
    engines = [Engine(store, settings, step_runner=recorder) for _ in range(6)]
    outcomes = await asyncio.gather(*(e.run(execution_id) for e in engines))
    kinds = sorted(o.kind for o in outcomes)
    assert kinds.count(OutcomeKind.SUCCEEDED) == 1
    assert set(kinds) <= {OutcomeKind.SUCCEEDED, OutcomeKind.BUSY, OutcomeKind.SKIPPED}
    assert recorder.calls == {"a": 1}
    assert len(await store.executions.step_runs(tenant, execution_id)) == 1


async def test_a_live_runner_keeps_others_out(store: Store, settings: Settings) -> None:
    """A slow step renews the lease: a duplicate delivery meanwhile is BUSY, not a re-run."""
    _, execution_id = await start(store, [slow_step("slow"), {"id": "b", "type": "noop"}])
    recorder = Recorder()
    entered = asyncio.Event()

    async def slow(ctx: StepContext, call: int) -> StepResult:
        entered.set()
        await asyncio.sleep(1.2)
        return StepResult(output="done")

    recorder.hooks["slow"] = slow
    first = Engine(store, settings, step_runner=recorder, lease_ttl_s=0.6)
    running = asyncio.create_task(first.run(execution_id))
    await entered.wait()
    for _ in range(3):  # well past one lease period: renewal keeps it alive
        await asyncio.sleep(0.3)
        duplicate = await Engine(store, settings, step_runner=recorder).run(execution_id)
        assert duplicate.kind is OutcomeKind.BUSY
    outcome = await running
    assert outcome.kind is OutcomeKind.SUCCEEDED and recorder.calls == {"slow": 1, "b": 1}


async def test_a_stale_runner_is_fenced_off(store: Store, settings: Settings) -> None:
    """A runner stuck past its lease (no renewal: e.g. a blocked event loop) loses it; the
    runner that took over finishes, and the stale one's write is refused."""
    tenant, execution_id = await start(
        store,
        [{"id": "a", "type": "transform", "expression": "input"}, {"id": "b", "type": "noop"}],
        {"who": "input"},
    )
    recorder = Recorder()
    stuck, unstick = asyncio.Event(), asyncio.Event()

    async def first_call_stalls(ctx: StepContext, call: int) -> StepResult | None:
        if call == 1:
            stuck.set()
            await unstick.wait()  # local step: runs inline, the lease is not renewed
            return StepResult(output="stale")
        return None

    recorder.hooks["a"] = first_call_stalls
    stale = asyncio.create_task(
        Engine(store, settings, step_runner=recorder, lease_ttl_s=0.2).run(execution_id)
    )
    await stuck.wait()
    await asyncio.sleep(0.3)  # the stale runner's lease has expired
    fresh = await Engine(store, settings, step_runner=recorder).run(execution_id)
    assert fresh.kind is OutcomeKind.SUCCEEDED
    unstick.set()
    late = await stale
    assert late.kind is OutcomeKind.LEASE_LOST
    done = await store.executions.get(tenant, execution_id, with_steps=True)
    assert done.status == "succeeded"
    assert [(s.step_id, s.output) for s in done.steps] == [("a", {"who": "input"}), ("b", None)]


async def test_cancel_stops_at_the_next_step_boundary(store: Store, settings: Settings) -> None:
    tenant, execution_id = await start(store, [slow_step("a"), {"id": "b", "type": "noop"}])
    recorder = Recorder()
    entered, release = asyncio.Event(), asyncio.Event()

    async def wait_for_release(ctx: StepContext, call: int) -> StepResult:
        entered.set()
        await release.wait()
        return StepResult(output="a-done")

    recorder.hooks["a"] = wait_for_release
    running = asyncio.create_task(Engine(store, settings, step_runner=recorder).run(execution_id))
    await entered.wait()
    cancelled = await store.executions.cancel(tenant, execution_id)
    assert cancelled.status == "cancelled"
    release.set()
    outcome = await running
    assert outcome.kind is OutcomeKind.CANCELLED and recorder.calls == {"a": 1}
    done = await store.executions.get(tenant, execution_id, with_steps=True)
    assert done.status == "cancelled" and done.finished_at == cancelled.finished_at
    assert [(s.step_id, s.status) for s in done.steps] == [("a", "succeeded")]
    assert (await Engine(store, settings).run(execution_id)).kind is OutcomeKind.SKIPPED


async def test_cancelled_runner_releases_its_lease(store: Store, settings: Settings) -> None:
    """Worker shutdown cancels the run: the lease is released so redelivery is immediate."""
    tenant, execution_id = await start(store, [{"id": "a", "type": "noop"}, slow_step("b")])
    recorder = Recorder()
    entered = asyncio.Event()

    async def hang_first_time(ctx: StepContext, call: int) -> StepResult:
        if call == 1:
            entered.set()
            await asyncio.sleep(30)
        return StepResult(output=call)

    recorder.hooks["b"] = hang_first_time
    engine = Engine(store, settings, step_runner=recorder, lease_ttl_s=30)
    running = asyncio.create_task(engine.run(execution_id))
    await entered.wait()
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running
    mid = await store.executions.get(tenant, execution_id)
    assert mid.status == "running" and mid.lease_expires_at is not None
    assert mid.lease_expires_at <= utcnow()
    outcome = await engine.run(execution_id)
    # the noop was pure, recorded with b's write: it ran again, harmlessly
    assert outcome.kind is OutcomeKind.SUCCEEDED and recorder.calls == {"a": 2, "b": 2}


async def test_abandon_cancels_the_step_and_writes_nothing(
    store: Store, settings: Settings
) -> None:
    tenant, execution_id = await start(store, [slow_step("a")])
    recorder = Recorder()
    entered = asyncio.Event()

    async def slow_first_time(ctx: StepContext, call: int) -> StepResult:
        if call == 1:
            entered.set()
            await asyncio.sleep(30)
        return StepResult(output="second")

    recorder.hooks["a"] = slow_first_time
    engine = Engine(store, settings, step_runner=recorder)
    abandon = asyncio.Event()
    running = asyncio.create_task(engine.run(execution_id, abandon=abandon))
    await entered.wait()
    abandon.set()
    outcome = await asyncio.wait_for(running, timeout=5)
    assert outcome.kind is OutcomeKind.ABANDONED
    assert await store.executions.step_runs(tenant, execution_id) == []
    again = await engine.run(execution_id)  # released: no wait for the lease to expire
    assert again.kind is OutcomeKind.SUCCEEDED
    done = await store.executions.get(tenant, execution_id)
    assert done.output == "second" and done.attempts == 2


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
@pytest.mark.parametrize("on_its_way", ["claims", "writes"])
async def test_a_run_cancelled_while_its_statement_is_on_its_way_leaves_no_lease_held(
    store: Store, settings: Settings, monkeypatch: pytest.MonkeyPatch, on_its_way: str
) -> None:
    """Cancelled (a worker stopping) while its claim, or a step's write, is on its way: the
    statement is not withdrawn and lands after the cancel — a claim nobody runs, or a write
    that sets the expiry of the lease the cancelled run had just released. Either is given
    back as it lands, so the next delivery claims at once instead of waiting out the lease
    (30 s)."""
    tenant, execution_id = await start(store, [slow_step("a"), slow_step("b")])
    group = getattr(store.runs, on_its_way)
    real = group._send_one
    sent, landed = asyncio.Event(), asyncio.Event()

    async def slow(request: object) -> object:
        sent.set()
        await asyncio.sleep(0.3)  # the statement on its way (a slow commit)
        try:
            return await real(request)
        finally:
            landed.set()

    monkeypatch.setattr(group, "_send_one", slow)
    recorder = Recorder()

    async def done(ctx: StepContext, call: int) -> StepResult:
        return StepResult(output=call)

    recorder.hooks["a"] = recorder.hooks["b"] = done
    engine = Engine(store, settings, step_runner=recorder, lease_ttl_s=30)
    running = asyncio.create_task(engine.run(execution_id))
    await sent.wait()
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running
    await asyncio.wait_for(landed.wait(), 5)
    monkeypatch.setattr(group, "_send_one", real)

    async def given_back() -> bool:
        row = await store.executions.get(tenant, execution_id)
        expires = row.lease_expires_at
        return row.status == "running" and expires is not None and expires <= utcnow()

    for _ in range(100):
        if await given_back():
            break
        await asyncio.sleep(0.02)
    assert await given_back(), "a lease nobody holds is still held"
    outcome = await engine.run(execution_id)
    assert outcome.kind is OutcomeKind.SUCCEEDED and recorder.calls == {"a": 1, "b": 1}
