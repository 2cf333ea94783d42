"""``run_step`` for each step type (``http`` is covered in depth by test_http.py)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from conveyor.errors import PermanentStepError, StepError, WorkflowInvalid
from conveyor.workflows import (
    GotoAction,
    RenderedInput,
    SafeHttpClient,
    StepContext,
    StepResult,
    parse_definition,
    run_pure_step,
    run_step,
)
from conveyor.workflows.expressions import ExpressionError
from conveyor.workflows.http import redact_headers, redact_url
from conveyor.workflows.steps import AnyStep, PureStep
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
    assert result.rendered_input is None  # the engine records the definition


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
    assert result.rendered_input == {"expression": transform.expression}  # type: ignore[union-attr]


async def test_transform_records_its_expression_and_select_even_when_it_fails() -> None:
    picky = step(type="transform", expression="input", select="sum(@)")
    context = ctx("text")
    with pytest.raises(ExpressionError):
        await run_step(picky, context)
    assert context.rendered.value == {"expression": "input", "select": "sum(@)"}


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
    assert result.rendered_input == {"expression": "input.flag", "branch": branch}


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
    whens = ["input.n > `10`", "input.n > `5`"]
    assert result.rendered_input == {"cases": whens, "branch": 1}
    fallthrough = await run_step(condition, ctx({"n": 1}))
    assert fallthrough.next == "continue"
    assert fallthrough.rendered_input == {"cases": whens, "branch": "else"}


PURE = [
    ({"type": "noop"}, None),
    ({"type": "transform", "expression": "{n: input.n, run: execution.id, a: steps.a}"}, None),
    ({"type": "transform", "expression": "input", "select": "n"}, None),
    ({"type": "condition", "expression": "input.n > `1`", "then": {"goto": "later"}}, None),
    ({"type": "condition", "cases": [{"when": "input.n > `5`", "then": "end"}]}, None),
    ({"type": "transform", "expression": "sum(input)"}, ExpressionError),
    ({"type": "transform", "expression": "input", "select": "sum(@)"}, ExpressionError),
    ({"type": "condition", "expression": "abs(input)"}, ExpressionError),
]


@pytest.mark.parametrize(("fields", "raises"), PURE)
async def test_the_engines_fast_path_for_pure_steps_does_what_run_step_does(
    fields: dict[str, Any], raises: type[Exception] | None
) -> None:
    """``run_pure_step`` (the engine's fast path) against ``run_step``: the same result, the
    same recorded input — also what a failing try had rendered — and the same error."""
    pure: PureStep = step(**fields)  # type: ignore[assignment]
    context = ctx({"n": 3}, {"a": [1, 2]})
    rendered = RenderedInput()
    if raises is not None:
        with pytest.raises(raises) as slow:
            await run_step(pure, context)
        with pytest.raises(raises) as fast:
            run_pure_step(pure, context.expression_context(), rendered)
        assert str(fast.value) == str(slow.value)
        assert rendered.value == context.rendered.value is not None
        return
    expected = await run_step(pure, context)
    result = run_pure_step(pure, context.expression_context(), rendered)
    assert (result.output, result.next, result.suspend_until) == (
        expected.output,
        expected.next,
        expected.suspend_until,
    )
    assert rendered.value == expected.rendered_input
    if fields["type"] != "noop":
        assert rendered.value is not None and expected.output is not None


async def test_delay_seconds() -> None:
    result = await run_step(step(type="delay", seconds=90), ctx())
    assert result.suspend_until == NOW + timedelta(seconds=90)
    assert result.output == {"until": "2026-03-01T12:01:30Z"}
    assert result.rendered_input == {"seconds": 90, "until": "2026-03-01T12:01:30Z"}


async def test_delay_until_absolute_with_offset() -> None:
    result = await run_step(step(type="delay", until="2026-03-02T09:00:00+01:00"), ctx())
    assert result.suspend_until == datetime(2026, 3, 2, 8, 0, tzinfo=UTC)
    assert result.suspend_until.tzinfo == UTC


async def test_delay_until_template() -> None:
    delay = step(type="delay", until="{{ input.at }}")
    result = await run_step(delay, ctx({"at": "2026-03-05T00:00:00-05:00"}))
    assert result.suspend_until == datetime(2026, 3, 5, 0, 0, tzinfo=timezone(timedelta(hours=-5)))
    assert result.rendered_input == {"until": "2026-03-05T05:00:00Z"}  # the wake time, UTC
    out_of_range = ("0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00")  # not in UTC
    bads: list[dict[str, Any]] = [{"at": "soon"}, {"at": 5}, {}]
    for bad in [*bads, *({"at": at} for at in out_of_range)]:
        context = ctx(bad)
        with pytest.raises(PermanentStepError, match="until"):
            await run_step(delay, context)
        assert context.rendered.value == {"until": bad.get("at")}  # what it rendered


@pytest.mark.parametrize("at", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00"])
def test_a_delay_until_out_of_range_in_utc_is_refused_when_saved(at: str) -> None:
    with pytest.raises(WorkflowInvalid, match="out of range"):
        step(type="delay", until=at)


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


async def test_http_step_records_the_request_it_sent_with_credentials_redacted(
    local_server: LocalServer,
) -> None:
    headers = {
        "Authorization": "Bearer {{ input.token }}",
        "Cookie": "sid={{ input.token }}",
        "Set-Cookie": "sid=1",
        "X-Api-Key": "k1",
        "X-Auth-Token": "t1",
        "X-Client-Secret": "c1",
        "X-Password": "p1",
        "Api-KEY-Id": "k2",
        "Accept": "application/json",
        "X-Order": "{{ input.order }}",
    }
    call = step(
        type="http",
        method="PATCH",
        url=local_server.url("/echo?o={{ input.order }}", "localhost").replace(
            "//", "//ada:{{ input.token }}@", 1
        ),
        headers=headers,
        body={"order": "{{ input.order }}", "items": "{{ input.items }}"},
    )
    secrets = {"token": "s3cr3t", "order": "A/1", "items": [1, 2]}
    result = await run_step(call, ctx(secrets))

    assert result.output["status"] == 200
    port = local_server.port
    assert result.rendered_input == {
        "method": "PATCH",
        "url": f"http://[redacted]@localhost:{port}/echo?o=A%2F1",
        "headers": {
            **{name: "[redacted]" for name in list(headers)[:8]},
            "Accept": "application/json",
            "X-Order": "A/1",
            "content-type": "application/json",
        },
        "body": {"order": "A/1", "items": [1, 2]},
    }
    assert "s3cr3t" not in json.dumps(result.rendered_input)
    (seen,) = local_server.requests
    assert json.loads(seen.body) == result.rendered_input["body"]  # the JSON actually sent
    assert seen.path == "/echo?o=A%2F1" and seen.headers["x-api-key"] == "k1"
    assert seen.headers["authorization"] == "Bearer s3cr3t"  # the step's header beats the URL's


async def test_a_text_body_is_recorded_as_sent(local_server: LocalServer) -> None:
    call = step(
        type="http",
        method="POST",
        url=local_server.url("/echo", "localhost"),
        headers={"Content-Type": "text/csv"},
        body="id,name\n{{ input.id }},{{ input.name }}",
    )
    result = await run_step(call, ctx({"id": 3, "name": "Ada"}))
    assert result.rendered_input["headers"] == {"Content-Type": "text/csv"}
    assert result.rendered_input["body"] == "id,name\n3,Ada"
    assert local_server.requests[0].body == b"id,name\n3,Ada"


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("https://ada:pw@127.0.0.1:{{ input.port }}/in", "refused to connect"),  # SSRF guard
        ("{{ input.scheme }}://ada:pw@example.com:{{ input.port }}/in", "refused URL scheme"),
        ("http://ada:pw@[::1:{{ input.port }}/in", "invalid URL"),
    ],
)
async def test_a_refused_request_leaves_the_rendered_request_in_the_context(
    url: str, error: str
) -> None:
    call = step(type="http", url=url, headers={"X-Api-Key": "{{ input.key }}"})
    context = ctx({"port": 8443, "key": "k1", "scheme": "ftp"})
    with pytest.raises(StepError, match=error):
        await run_step(call, context)
    rendered = url.replace("ada:pw", "[redacted]").replace("{{ input.port }}", "8443")
    rendered = rendered.replace("{{ input.scheme }}", "ftp")
    assert context.rendered.value == {
        "method": "GET",
        "url": rendered,
        "headers": {"X-Api-Key": "[redacted]"},
        "body": None,
    }


async def test_what_is_rendered_before_a_template_fails_is_kept() -> None:
    bad_url = step(type="http", url="http://example.com/{{ sum(input) }}")
    context = ctx("text")
    with pytest.raises(ExpressionError):
        await run_step(bad_url, context)
    assert context.rendered.value is None  # nothing rendered: the definition is recorded

    bad_header = step(
        type="http", url="http://example.com/{{ input.a }}", headers={"X-A": "{{ input.b }}"}
    )
    context = ctx({"a": "x", "b": "1\r\n2"})
    with pytest.raises(PermanentStepError, match="line break"):
        await run_step(bad_header, context)
    assert context.rendered.value == {"method": "GET", "url": "http://example.com/x"}


@pytest.mark.parametrize(
    ("url", "redacted"),
    [
        ("https://user:pass@example.com/a", "https://[redacted]@example.com/a"),
        ("https://token@example.com", "https://[redacted]@example.com"),
        ("http://a:b@c:d@example.com:81/x?y=z@w", "http://[redacted]@example.com:81/x?y=z@w"),
        ("https://example.com/users/ada@example.com", "https://example.com/users/ada@example.com"),
        ("https://example.com?to=ada@example.com", "https://example.com?to=ada@example.com"),
        ("https://example.com#ada@x", "https://example.com#ada@x"),
        ("//user:pw@example.com/a", "//[redacted]@example.com/a"),
        ("user:pw@example.com/a//b", "[redacted]@example.com/a//b"),
        ("not a url", "not a url"),
    ],
)
def test_redact_url(url: str, redacted: str) -> None:
    assert redact_url(url) == redacted


def test_redact_headers() -> None:
    headers = {
        "authorization": "a",
        "PROXY-AUTHORIZATION": "b",
        "cookie": "c",
        "Set-Cookie": "d",
        "x-api-key": "e",
        "Keystone": "f",
        "X-GitHub-Token": "g",
        "Client-Secret": "h",
        "X-Password-Hash": "i",
        "Accept": "j",
        "X-Request-Id": "k",
        "Content-Type": "l",
        "Idempotency-Key": "m",
    }
    shown = redact_headers(headers)
    assert list(shown) == list(headers)
    assert [name for name, value in shown.items() if value != "[redacted]"] == [
        "Accept",
        "X-Request-Id",
        "Content-Type",
        "Idempotency-Key",  # a deduplication key operators need to see, not a credential
    ]
