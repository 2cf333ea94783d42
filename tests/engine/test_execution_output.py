"""The execution's output: the workflow's ``output`` expression (evaluated over ``input``,
``steps`` and ``execution`` when the execution succeeds), or the last step's output without
one; an invalid expression is refused when the workflow is saved, a failing one fails the
execution."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest

from conveyor.engine import Engine, OutcomeKind
from conveyor.errors import Conflict, WorkflowInvalid
from conveyor.settings import Settings
from conveyor.store import Store, utcnow
from tests.engine._support import start

STEPS: list[dict[str, Any]] = [
    {"id": "double", "type": "transform", "expression": "{twice: [input.n, input.n]}"},
    {"id": "sum", "type": "transform", "expression": "sum(steps.double.twice)"},
]


async def _start(store: Store, output: str | None, steps: list[dict[str, Any]] = STEPS,
                 input: Any = None) -> tuple[str, str]:  # fmt: skip
    tenant = (await store.tenants.create("acme")).id
    doc: dict[str, Any] = {"name": "wf", "steps": steps}
    if output is not None:
        doc["output"] = output
    workflow = await store.workflows.create(tenant, doc)
    execution, _ = await store.executions.create(tenant, workflow.id, input)
    return tenant, execution.id


async def test_without_an_expression_the_output_is_the_last_steps(
    store: Store, settings: Settings
) -> None:
    tenant, execution_id = await start(store, STEPS, {"n": 3})
    assert (await Engine(store, settings).run(execution_id)).kind is OutcomeKind.SUCCEEDED
    done = await store.executions.get(tenant, execution_id, with_steps=True)
    assert done.output == 6 == done.steps[-1].output


async def test_the_output_expression_reads_input_steps_and_execution(
    store: Store, settings: Settings
) -> None:
    tenant, execution_id = await _start(
        store,
        "{n: input.n, total: steps.sum, first: steps.double.twice[0], id: execution.id}",
        input={"n": 3},
    )
    assert (await Engine(store, settings).run(execution_id)).kind is OutcomeKind.SUCCEEDED
    done = await store.executions.get(tenant, execution_id, with_steps=True)
    assert done.output == {"n": 3, "total": 6, "first": 3, "id": execution_id}
    assert done.steps[-1].output == 6  # the step's own output is unchanged


async def test_the_output_expression_at_a_conditions_end(store: Store, settings: Settings) -> None:
    steps = [
        {"id": "a", "type": "transform", "expression": "input.n"},
        {"id": "stop", "type": "condition", "expression": "`false`"},
        {"id": "never", "type": "noop"},
    ]
    tenant, execution_id = await _start(store, "steps", steps, {"n": 1})
    assert (await Engine(store, settings).run(execution_id)).kind is OutcomeKind.SUCCEEDED
    done = await store.executions.get(tenant, execution_id)
    assert done.output == {"a": 1, "stop": {"branch": "else", "action": "end"}}


async def test_the_output_expression_after_a_final_delay(store: Store, settings: Settings) -> None:
    steps: list[dict[str, Any]] = [{"id": "a", "type": "transform", "expression": "input.n"},
             {"id": "wait", "type": "delay", "seconds": 60}]  # fmt: skip
    tenant, execution_id = await _start(store, "[steps.a, input.n]", steps, {"n": 5})
    now = [utcnow()]

    def clock() -> datetime:
        return now[0]

    engine = Engine(store, settings, clock=clock)
    assert (await engine.run(execution_id)).kind is OutcomeKind.WAITING
    now[0] += timedelta(seconds=61)
    assert (await engine.run(execution_id)).kind is OutcomeKind.SUCCEEDED
    assert (await store.executions.get(tenant, execution_id)).output == [5, 5]


async def test_a_failing_output_expression_fails_the_execution(
    store: Store, settings: Settings
) -> None:
    # sum() of an object: a JMESPath type error at run time
    tenant, execution_id = await _start(store, "sum(steps.double)", input={"n": 3})
    outcome = await Engine(store, settings).run(execution_id)
    assert outcome.kind is OutcomeKind.FAILED
    done = await store.executions.get(tenant, execution_id, with_steps=True)
    assert done.status == "failed" and done.output is None
    assert done.error["type"] == "ExpressionError"
    assert done.error["code"] == "output_expression_failed"
    assert done.error["message"].startswith("the workflow's output expression failed:")
    assert done.error["expression"] == "sum(steps.double)"
    assert [s.status for s in done.steps] == ["succeeded", "succeeded"]  # the steps did
    # no step failed: there is nothing to resume from
    with pytest.raises(Conflict, match="no step of this execution failed"):
        await store.executions.retry_from(tenant, execution_id, start="failed")
    retried = await store.executions.retry(tenant, execution_id)  # from the start: allowed
    assert retried.retry_of == execution_id


async def test_an_output_above_the_limit_fails_the_execution(
    store: Store, settings: Settings
) -> None:
    # settings: STEP_OUTPUT_MAX_BYTES = 4096; the steps' outputs fit, the output does not
    steps = [{"id": "a", "type": "transform", "expression": "input.s"}]
    tenant, execution_id = await _start(store, "[steps.a, steps.a, input.s]", steps,
                                        {"s": "x" * 1500})  # fmt: skip
    assert (await Engine(store, settings).run(execution_id)).kind is OutcomeKind.FAILED
    done = await store.executions.get(tenant, execution_id)
    assert done.error["code"] == "output_too_large" and done.output is None
    assert "output expression" in done.error["message"]


@pytest.mark.parametrize(
    ("output", "message"),
    [("steps.[", "invalid expression"), ("nope(input)", "unknown function 'nope'"),
     ("", "at least 1 character")],
)  # fmt: skip
async def test_an_invalid_output_expression_is_refused_on_save(
    store: Store, output: str, message: str
) -> None:
    tenant = (await store.tenants.create("acme")).id
    with pytest.raises(WorkflowInvalid) as caught:
        await store.workflows.create(tenant, {"name": "wf", "steps": STEPS, "output": output})
    (problem,) = caught.value.details
    assert problem["field"] == "output" and problem["step"] is None
    assert message in problem["message"]
