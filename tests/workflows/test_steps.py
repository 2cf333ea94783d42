"""``run_step`` for each step type (``http`` is covered in depth by test_http.py)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from conveyor.errors import PermanentStepError
from conveyor.workflows import (
    GotoAction,
    SafeHttpClient,
    StepContext,
    StepResult,
    parse_definition,
    run_step,
)
from conveyor.workflows.expressions import ExpressionError
from conveyor.workflows.steps import AnyStep
from tests.workflows.conftest import LocalServer, make_settings

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def step(**fields: Any) -> AnyStep:
    steps = [{"id": "s", **fields}, {"id": "later", "type": "noop"}]
    definition = parse_definition({"name": "t", "steps": steps})
    return definition.steps[0]


def ctx(input: Any = None, steps: dict[str, Any] | None = None, **kw: Any) -> StepContext:
    return StepContext(
        input=input,
        steps=steps or {},
        execution_id="e1",
        workflow_id="w1",
        tenant_id="t1",
        settings=make_settings("localhost"),
        now=NOW,
        **kw,
    )


async def test_noop() -> None:
    result = await run_step(step(type="noop"), ctx())
    assert result == StepResult(output=None, next="continue", suspend_until=None)


async def test_transform_builds_json_from_input_and_steps() -> None:
    transform = step(
        type="transform",
        expression="{user: input.user, total: sum(steps.cart.items[*].price), run: execution.id}",
    )
    result = await run_step(
        transform, ctx({"user": "ada"}, {"cart": {"items": [{"price": 2}, {"price": 3}]}})
    )
    assert result.output == {"user": "ada", "total": 5, "run": "e1"}
    assert result.next == "continue" and result.suspend_until is None


@pytest.mark.parametrize(
    "expression", ["input.__class__.__mro__", "constructor.constructor", "steps.__dict__"]
)
async def test_transform_injection_is_inert(expression: str) -> None:
    result = await run_step(step(type="transform", expression=expression), ctx({"a": 1}))
    assert result.output is None


async def test_transform_failure_is_permanent() -> None:
    with pytest.raises(PermanentStepError):
        await run_step(step(type="transform", expression="sum(input)"), ctx("text"))
    huge = step(type="transform", expression="input" + " | [@, @]" * 100)
    with pytest.raises(ExpressionError):
        await run_step(huge, ctx({"s": "x" * 1000}))


@pytest.mark.parametrize(
    ("value", "branch", "action"),
    [
        (True, "then", GotoAction(goto="later")),
        (0, "then", GotoAction(goto="later")),
        (False, "else", "end"),
        ([], "else", "end"),
        (None, "else", "end"),
    ],
)
async def test_condition_expression(value: Any, branch: str, action: Any) -> None:
    condition = step(type="condition", expression="input.flag", then={"goto": "later"})
    result = await run_step(condition, ctx({"flag": value}))
    assert result.next == action
    assert result.output["branch"] == branch
    assert result.goto == ("later" if branch == "then" else None)


async def test_condition_cases() -> None:
    condition = step(
        type="condition",
        cases=[
            {"when": "input.n > `10`", "then": "end"},
            {"when": "input.n > `5`", "then": {"goto": "later"}},
        ],
    )
    assert (await run_step(condition, ctx({"n": 11}))).next == "end"
    result = await run_step(condition, ctx({"n": 6}))
    assert result.next == GotoAction(goto="later")
    assert result.output == {"branch": 1, "action": {"goto": "later"}}
    assert (await run_step(condition, ctx({"n": 1}))).next == "continue"


async def test_delay_seconds() -> None:
    result = await run_step(step(type="delay", seconds=90), ctx())
    assert result.suspend_until == NOW + timedelta(seconds=90)
    assert result.output == {"until": "2026-03-01T12:01:30Z"}


async def test_delay_until_absolute_with_offset() -> None:
    result = await run_step(step(type="delay", until="2026-03-02T09:00:00+01:00"), ctx())
    assert result.suspend_until == datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
    assert result.suspend_until.tzinfo == UTC


async def test_delay_until_template() -> None:
    delay = step(type="delay", until="{{ input.at }}")
    result = await run_step(delay, ctx({"at": "2026-03-05T00:00:00-05:00"}))
    assert result.suspend_until == datetime(2026, 3, 5, 0, 0, tzinfo=timezone(timedelta(hours=-5)))
    for bad in ({"at": "soon"}, {"at": 5}, {}):
        with pytest.raises(PermanentStepError, match="until"):
            await run_step(delay, ctx(bad))


async def test_delay_in_the_past_or_resumed_does_not_suspend() -> None:
    past = await run_step(step(type="delay", until="2020-01-01T00:00:00Z"), ctx())
    assert past.suspend_until is None and past.output == {"until": "2020-01-01T00:00:00Z"}
    resumed = await run_step(step(type="delay", seconds=60), ctx(resuming=True))
    assert resumed.suspend_until is None


async def test_http_step_with_shared_and_temporary_client(local_server: LocalServer) -> None:
    call = step(type="http", url=local_server.url("/json?x={{ input.x }}", "localhost"))
    result = await run_step(call, ctx({"x": 1}))  # no client in the context: one is opened
    assert result.output["status"] == 200
    async with SafeHttpClient(make_settings("localhost")) as client:
        again = await run_step(call, ctx({"x": 2}, http=client))
    assert again.output["body"]["hello"] == "world"
    assert [seen.path for seen in local_server.requests] == ["/json?x=1", "/json?x=2"]


async def test_select_keeps_part_of_the_output(local_server: LocalServer) -> None:
    transform = step(type="transform", expression="input", select="items[?n > `1`].n")
    result = await run_step(transform, ctx({"items": [{"n": 1}, {"n": 2}, {"n": 3}]}))
    assert result.output == [2, 3]
    call = step(
        type="http", url=local_server.url("/json", "localhost"), select="{s: status, h: body.hello}"
    )
    async with SafeHttpClient(make_settings("localhost")) as client:
        fetched = await run_step(call, ctx(http=client))
    assert fetched.output == {"s": 200, "h": "world"}


async def test_select_sees_only_the_output_and_its_failure_is_permanent() -> None:
    transform = step(type="transform", expression="input.a", select="input")
    assert (await run_step(transform, ctx({"a": {"b": 1}}))).output is None
    picky = step(type="transform", expression="input", select="sum(@)")
    with pytest.raises(ExpressionError, match=r"^select: expression failed") as info:
        await run_step(picky, ctx("text"))
    assert isinstance(info.value, PermanentStepError)
