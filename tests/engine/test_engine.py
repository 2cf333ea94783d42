"""The engine on both backends: step types, persistence, retries, timeouts, attempts.

Output limits and ``select``: test_output_limits.py.
"""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import pytest

from conveyor.engine import Engine, OutcomeKind
from conveyor.errors import PermanentStepError, RetryableStepError
from conveyor.settings import Settings
from conveyor.store import Store, utcnow
from conveyor.workflows import StepContext, StepResult, expressions
from conveyor.workflows import steps as steps_module
from tests.engine._support import Recorder, slow_step, start


async def test_local_steps_run_in_order_and_are_persisted(store: Store, settings: Settings) -> None:
    tenant, execution_id = await start(
        store,
        [
            {
                "id": "double",
                "type": "transform",
                "expression": "{n: input.n, twice: [input.n, input.n]}",
            },
            {
                "id": "check",
                "type": "condition",
                "expression": "steps.double.n > `1`",
                "then": {"goto": "last"},
                "else": "end",
            },
            {"id": "skipped", "type": "noop"},
            {"id": "last", "type": "transform", "expression": "steps.double.twice"},
        ],
        {"n": 2},
    )
    recorder = Recorder()
    outcome = await Engine(store, settings, step_runner=recorder).run(execution_id)
    assert outcome.kind is OutcomeKind.SUCCEEDED and outcome.steps_run == 3
    assert outcome.finished and outcome.queue_latency_ms is not None
    assert recorder.calls == {"double": 1, "check": 1, "last": 1}

    done = await store.executions.get(tenant, execution_id, with_steps=True)
    assert done.status == "succeeded" and done.output == [2, 2] and done.error is None
    assert done.attempts == 1 and done.steps_run == 3 and done.next_step == 4
    assert done.started_at is not None and done.finished_at is not None
    assert done.queued_at <= done.started_at <= done.finished_at
    assert [(s.seq, s.step_id, s.status, s.attempts) for s in done.steps] == [
        (0, "double", "succeeded", 1),
        (1, "check", "succeeded", 1),
        (2, "last", "succeeded", 1),
    ]
    assert done.steps[0].output == {"n": 2, "twice": [2, 2]}
    assert done.steps[0].input["expression"].startswith("{n:")
    assert done.steps[1].output == {"branch": "then", "action": {"goto": "last"}}
    assert all(s.started_at <= s.finished_at for s in done.steps)


async def test_condition_end_finishes_early(store: Store, settings: Settings) -> None:
    tenant, execution_id = await start(
        store,
        [
            {"id": "guard", "type": "condition", "expression": "input.go"},
            {"id": "never", "type": "noop"},
        ],
        {"go": False},
    )
    recorder = Recorder()
    outcome = await Engine(store, settings, step_runner=recorder).run(execution_id)
    assert outcome.kind is OutcomeKind.SUCCEEDED and recorder.calls == {"guard": 1}
    done = await store.executions.get(tenant, execution_id)
    assert done.output == {"branch": "else", "action": "end"}


async def test_delay_parks_on_a_timer_and_continues_after_it(
    store: Store, settings: Settings
) -> None:
    tenant, execution_id = await start(
        store,
        [
            {"id": "a", "type": "noop"},
            {"id": "wait", "type": "delay", "seconds": 0.4},
            {"id": "b", "type": "transform", "expression": "steps.wait.until"},
        ],
    )
    recorder = Recorder()
    engine = Engine(store, settings, step_runner=recorder)
    parked = await engine.run(execution_id)
    assert parked.kind is OutcomeKind.WAITING and parked.wake_at is not None
    assert parked.queue_latency_ms is not None
    waiting = await store.executions.get(tenant, execution_id, with_steps=True)
    assert waiting.status == "waiting" and waiting.wake_at == parked.wake_at
    assert waiting.next_step == 2 and [s.step_id for s in waiting.steps] == ["a", "wait"]
    timers = await store.timers.for_execution(tenant, execution_id)
    assert [(t.status, t.due_at, t.seq) for t in timers] == [("pending", parked.wake_at, 1)]
    assert timers[0].job_id == f"timer:{timers[0].id}"

    early = await engine.run(execution_id)  # never early
    assert early.kind is OutcomeKind.NOT_DUE and early.retry_after_s is not None
    await asyncio.sleep(max(early.retry_after_s, 0) + 0.05)
    resumed = await engine.run(execution_id)
    assert resumed.kind is OutcomeKind.SUCCEEDED and resumed.steps_run == 1
    assert resumed.queue_latency_ms is None  # measured once, on the run that started it
    assert recorder.calls == {"a": 1, "wait": 1, "b": 1}
    done = await store.executions.get(tenant, execution_id, with_steps=True)
    assert done.output == done.steps[1].output["until"]
    assert done.attempts == 1  # resuming after a delay is not another attempt


async def test_attempts_count_deliveries_that_ran_work_not_resumptions(
    store: Store, settings: Settings
) -> None:
    tenant, execution_id = await start(
        store,
        [
            {"id": "wait", "type": "delay", "seconds": 0.1},
            {"id": "again", "type": "delay", "seconds": 0.1},
            {"id": "b", "type": "noop"},
        ],
    )
    engine = Engine(store, settings)
    assert (await engine.run(execution_id)).kind is OutcomeKind.WAITING
    await asyncio.sleep(0.15)
    # a runner resumes after the timer and dies at once (its lease expires immediately)
    now = utcnow()
    resumed = await store.runs.claim(execution_id, now, now)
    assert resumed is not None and resumed.attempts == 1
    assert (await store.executions.get(tenant, execution_id)).attempts == 1
    # the redelivery that recovers it ran work again: that is an attempt
    assert (await engine.run(execution_id)).kind is OutcomeKind.WAITING
    assert (await store.executions.get(tenant, execution_id)).attempts == 2
    await asyncio.sleep(0.15)
    assert (await engine.run(execution_id)).kind is OutcomeKind.SUCCEEDED
    done = await store.executions.get(tenant, execution_id)
    assert done.status == "succeeded" and done.attempts == 2


async def test_retries_with_backoff(store: Store, settings: Settings) -> None:
    tenant, execution_id = await start(
        store,
        [
            {
                **slow_step("flaky"),
                "retry": {"attempts": 3, "backoff": "exponential", "delay_s": 0.05},
            },
            {"id": "after", "type": "noop"},
        ],
    )
    recorder = Recorder()

    async def flaky(ctx: StepContext, call: int) -> StepResult:
        assert ctx.attempt == call
        if call < 3:
            raise RetryableStepError("503 from upstream", status=503)
        return StepResult(output={"ok": True})

    recorder.hooks["flaky"] = flaky
    started = time.monotonic()
    outcome = await Engine(store, settings, step_runner=recorder).run(execution_id)
    assert outcome.kind is OutcomeKind.SUCCEEDED
    assert time.monotonic() - started >= 0.05 + 0.10  # exponential: 0.05 then 0.10
    steps = await store.executions.step_runs(tenant, execution_id)
    assert (steps[0].attempts, steps[0].status, steps[0].output) == (3, "succeeded", {"ok": True})


async def test_retries_exhausted_and_permanent_errors_fail(
    store: Store, settings: Settings
) -> None:
    tenant, execution_id = await start(
        store,
        [
            {**slow_step("down"), "retry": {"attempts": 2, "backoff": "fixed", "delay_s": 0}},
            {"id": "never", "type": "noop"},
        ],
    )
    recorder = Recorder()

    async def down(ctx: StepContext, call: int) -> StepResult:
        raise RetryableStepError(f"try {call} failed")

    recorder.hooks["down"] = down
    outcome = await Engine(store, settings, step_runner=recorder).run(execution_id)
    assert outcome.kind is OutcomeKind.FAILED and recorder.calls == {"down": 2}
    failed = await store.executions.get(tenant, execution_id, with_steps=True)
    assert failed.status == "failed" and failed.error["step"] == "down"
    assert failed.error["type"] == "RetryableStepError"
    (step,) = failed.steps
    assert step.status == "failed" and step.attempts == 2
    assert [a["message"] for a in step.error["attempts"]] == ["try 1 failed", "try 2 failed"]

    _, permanent_id = await start(
        store, [{**slow_step("bad"), "retry": {"attempts": 5, "delay_s": 0}}], tenant_id=tenant
    )

    async def bad(ctx: StepContext, call: int) -> StepResult:
        raise PermanentStepError("404 not found", status=404)

    recorder.hooks["bad"] = bad
    outcome = await Engine(store, settings, step_runner=recorder).run(permanent_id)
    assert outcome.kind is OutcomeKind.FAILED and recorder.calls["bad"] == 1
    failed = await store.executions.get(tenant, permanent_id, with_steps=True)
    assert failed.error == {
        "step": "bad",
        "type": "PermanentStepError",
        "message": "404 not found",
        "details": {"status": 404},
    }


async def test_step_timeout_is_retryable(store: Store, settings: Settings) -> None:
    tenant, execution_id = await start(
        store, [{**slow_step("slow"), "timeout_s": 0.1, "retry": {"attempts": 2, "delay_s": 0}}]
    )
    recorder = Recorder()

    async def hang(ctx: StepContext, call: int) -> StepResult:
        await asyncio.sleep(10)
        raise AssertionError("unreachable")

    recorder.hooks["slow"] = hang
    started = time.monotonic()
    outcome = await Engine(store, settings, step_runner=recorder).run(execution_id)
    assert outcome.kind is OutcomeKind.FAILED and time.monotonic() - started < 2
    (step,) = await store.executions.step_runs(tenant, execution_id)
    assert step.attempts == 2 and step.error["type"] == "StepTimeout"


async def test_a_runner_bug_fails_the_step_not_the_engine(store: Store, settings: Settings) -> None:
    tenant, execution_id = await start(store, [slow_step("buggy")])
    recorder = Recorder()

    async def buggy(ctx: StepContext, call: int) -> StepResult:
        raise KeyError("oops")

    recorder.hooks["buggy"] = buggy
    outcome = await Engine(store, settings, step_runner=recorder).run(execution_id)
    assert outcome.kind is OutcomeKind.FAILED
    failed = await store.executions.get(tenant, execution_id)
    assert failed.error["type"] == "InternalError"


async def test_missing_and_already_finished(store: Store, settings: Settings) -> None:
    engine = Engine(store, settings)
    assert (await engine.run("0" * 32)).kind is OutcomeKind.MISSING
    _, execution_id = await start(store, [{"id": "a", "type": "noop"}])
    assert (await engine.run(execution_id)).kind is OutcomeKind.SUCCEEDED
    again = await engine.run(execution_id)
    assert again.kind is OutcomeKind.SKIPPED and again.status == "succeeded"


async def test_waiting_execution_can_be_cancelled(store: Store, settings: Settings) -> None:
    tenant, execution_id = await start(
        store, [{"id": "wait", "type": "delay", "seconds": 0.2}, {"id": "b", "type": "noop"}]
    )
    engine = Engine(store, settings)
    assert (await engine.run(execution_id)).kind is OutcomeKind.WAITING
    cancelled = await store.executions.cancel(tenant, execution_id)
    assert cancelled.status == "cancelled" and cancelled.wake_at is None
    assert [t.status for t in await store.timers.for_execution(tenant, execution_id)] == [
        "cancelled"
    ]
    await asyncio.sleep(0.25)
    assert (await engine.run(execution_id)).kind is OutcomeKind.SKIPPED
    assert await store.timers.claim(utcnow() + timedelta(seconds=1), owner="x") == []


async def test_nul_characters_in_outputs_are_stored_replaced(
    store: Store, settings: Settings
) -> None:
    tenant, execution_id = await start(store, [slow_step("nul")])
    recorder = Recorder()

    async def nul(ctx: StepContext, call: int) -> StepResult:
        return StepResult(output={"body": "a\x00b"})

    recorder.hooks["nul"] = nul
    outcome = await Engine(store, settings, step_runner=recorder).run(execution_id)
    assert outcome.kind is OutcomeKind.SUCCEEDED
    done = await store.executions.get(tenant, execution_id)
    assert done.output == {"body": "a\ufffdb"}


async def test_a_pure_step_is_tried_once_on_its_fast_path_and_a_failed_try_is_recorded(
    store: Store, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pure steps run on the engine's fast path (no StepContext per try); one whose try fails
    is handed to the regular path as it is — evaluated once, not again (an expression stopped
    by its deadline would block the loop twice) — and recorded as before: its error, one
    attempt, what it had rendered."""
    evaluated: list[str] = []
    real = expressions.evaluate

    def counting(expression: str, context: Any, **kw: Any) -> Any:
        evaluated.append(expression)
        return real(expression, context, **kw)

    monkeypatch.setattr(steps_module, "evaluate", counting)
    steps: list[dict[str, Any]] = [
        {"id": "a", "type": "transform", "expression": "{n: input.n}"},
        {"id": "b", "type": "condition", "expression": "steps.a.n > `1`"},
        {"id": "c", "type": "transform", "expression": "sum(input.s)", "retry": {"attempts": 3}},
        {"id": "d", "type": "noop"},
    ]
    tenant, execution_id = await start(store, steps, {"n": 2, "s": "text"})
    engine = Engine(store, settings)
    seen: list[tuple[str, str]] = []
    engine.on_step = lambda step_type, status, _seconds: seen.append((step_type, status))
    outcome = await engine.run(execution_id)
    assert outcome.kind is OutcomeKind.FAILED
    assert evaluated == ["{n: input.n}", "steps.a.n > `1`", "sum(input.s)"]
    assert seen == [("transform", "succeeded"), ("condition", "succeeded"),
                    ("transform", "failed")]  # fmt: skip
    got = await store.executions.get(tenant, execution_id, with_steps=True)
    a, b, c = got.steps
    assert (a.status, a.output, a.input) == ("succeeded", {"n": 2}, {"expression": "{n: input.n}"})
    assert b.input == {"expression": "steps.a.n > `1`", "branch": "then"}
    assert (c.status, c.attempts, c.input) == ("failed", 1, {"expression": "sum(input.s)"})
    assert c.error is not None and c.error["type"] == "ExpressionError"
    assert got.error is not None and got.error["step"] == "c"
