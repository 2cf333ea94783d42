"""Workflow definition validation: errors name the step id and the field."""

from __future__ import annotations

import json
from typing import Any

import jsonschema  # type: ignore[import-untyped,unused-ignore]
import pytest

from conveyor.errors import InputInvalid, WorkflowInvalid
from conveyor.workflows.definition import (
    ConditionStep,
    DelayStep,
    GotoAction,
    HttpStep,
    RetryPolicy,
    TransformStep,
    WorkflowDefinition,
    parse_definition,
    validate_input,
    workflow_json_schema,
)

GOOD: dict[str, Any] = {
    "name": "order-sync",
    "description": "Fetch an order, maybe wait, then notify",
    "region": "eu",
    "input_schema": {
        "type": "object",
        "required": ["orderId"],
        "properties": {"orderId": {"type": "string"}},
    },
    "steps": [
        {
            "id": "fetch",
            "type": "http",
            "url": "https://api.example.com/orders/{{ input.orderId }}",
            "headers": {"Accept": "application/json"},
            "retry": {"attempts": 3, "backoff": "exponential", "delay_s": 1, "max_delay_s": 10},
            "timeout_s": 10,
        },
        {
            "id": "big",
            "type": "condition",
            "expression": "steps.fetch.body.total > `100`",
            "then": {"goto": "notify"},
            "else": "continue",
        },
        {"id": "shape", "type": "transform", "expression": "{total: steps.fetch.body.total}"},
        {
            "id": "route",
            "type": "condition",
            "cases": [{"when": "input.vip", "then": {"goto": "notify"}}],
            "else": "end",
        },
        {"id": "wait", "type": "delay", "seconds": 3600},
        {"id": "later", "type": "delay", "until": "2030-01-01T09:00:00+01:00"},
        {
            "id": "notify",
            "type": "http",
            "method": "POST",
            "url": "https://hooks.example.com/x",
            "body": {"order": "{{ steps.fetch.body }}"},
        },
        {"id": "done", "type": "noop"},
    ],
}


def with_steps(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"name": "t", "steps": list(steps)}


def problems(doc: Any) -> list[dict[str, Any]]:
    with pytest.raises(WorkflowInvalid) as info:
        parse_definition(doc)
    details: Any = info.value.details  # a list (ConveyorError types it as a dict)
    assert isinstance(details, list) and details
    return details


def test_valid_definition_round_trips() -> None:
    definition = parse_definition(GOOD)
    assert [step.id for step in definition.steps][:3] == ["fetch", "big", "shape"]
    fetch = definition.get_step("fetch")
    assert isinstance(fetch, HttpStep) and fetch.retry is not None
    assert fetch.retry.attempts == 3
    big = definition.get_step("big")
    assert isinstance(big, ConditionStep)
    assert big.then_action == GotoAction(goto="notify")
    assert big.else_action == "continue"
    assert definition.next_step_id("big", big.then_action) == "notify"
    assert definition.next_step_id("shape") == "route"
    assert definition.next_step_id("done") is None
    assert definition.next_step_id("fetch", "end") is None
    document = definition.to_document()
    assert document["steps"][1]["else"] == "continue"
    assert parse_definition(document) == definition
    assert parse_definition(json.dumps(GOOD)) == definition


def test_condition_defaults() -> None:
    guard = parse_definition(with_steps({"id": "g", "type": "condition", "expression": "a"}))
    step = guard.steps[0]
    assert isinstance(step, ConditionStep)
    assert (step.then_action, step.else_action) == ("continue", "end")
    cases = parse_definition(
        with_steps({"id": "c", "type": "condition", "cases": [{"when": "a", "then": "end"}]})
    )
    step = cases.steps[0]
    assert isinstance(step, ConditionStep) and step.else_action == "continue"


@pytest.mark.parametrize(
    ("step", "field", "message"),
    [
        ({"id": "f", "type": "http", "url": "ftp://x"}, "url", "http:// or https://"),
        ({"id": "f", "type": "http", "url": "https://x", "method": "GRAB"}, "method", "GET"),
        ({"id": "f", "type": "http", "url": "https://x", "timeout_s": 0}, "timeout_s", "greater"),
        (
            {"id": "f", "type": "http", "url": "https://x", "headers": {"Host": "y"}},
            "headers",
            "cannot be given",
        ),
        (
            {"id": "f", "type": "http", "url": "https://x", "headers": {"a b": "y"}},
            "headers",
            "not a valid header name",
        ),
        ({"id": "f", "type": "http", "url": "https://x/{{ input.[ }}"}, "url", "template"),
        (
            {"id": "f", "type": "http", "url": "https://x", "body": {"a": "{{ nope( }}"}},
            "body",
            "template",
        ),
        (
            {"id": "f", "type": "http", "url": "https://x", "max_response_bytes": 10**9},
            "max_response_bytes",
            "less than",
        ),
        ({"id": "f", "type": "http", "url": "https://x", "urll": "typo"}, "urll", "Extra inputs"),
        (
            {"id": "t", "type": "transform", "expression": "foo[["},
            "expression",
            "invalid expression",
        ),
        (
            {"id": "t", "type": "transform", "expression": "__import__('os')"},
            "expression",
            "unknown function '__import__'",
        ),
        (
            {"id": "t", "type": "transform", "expression": "{{7*7}}"},
            "expression",
            "invalid expression",
        ),
        ({"id": "t", "type": "transform"}, "expression", "Field required"),
        (
            {"id": "c", "type": "condition", "expression": "a", "then": "stop"},
            "then",
            '"continue", "end" or {"goto"',
        ),
        (
            {"id": "c", "type": "condition", "expression": "a", "then": {"goto": "9x"}},
            "then",
            "goto: String should match pattern",
        ),
        (
            {
                "id": "c",
                "type": "condition",
                "expression": "a",
                "cases": [{"when": "b", "then": "end"}],
            },
            "",
            "exactly one of 'expression' or 'cases'",
        ),
        (
            {"id": "c", "type": "condition", "cases": [{"when": "b", "then": "x"}]},
            "cases.0.then",
            '"continue", "end"',
        ),
        ({"id": "d", "type": "delay"}, "", "exactly one of 'seconds' or 'until'"),
        ({"id": "d", "type": "delay", "seconds": -1}, "seconds", "greater than 0"),
        ({"id": "d", "type": "delay", "until": "2030-01-01T09:00:00"}, "until", "UTC offset"),
        ({"id": "d", "type": "delay", "until": "tomorrow"}, "until", "ISO-8601"),
        ({"id": "n", "type": "noop", "retry": {"attempts": 0}}, "retry.attempts", "greater"),
        ({"id": "n", "type": "noop", "retry": {"backoff": "linear"}}, "retry.backoff", "fixed"),
        ({"id": "n", "type": "noop", "retry": {"attemps": 2}}, "retry.attemps", "Extra inputs"),
        (
            {"id": "f", "type": "http", "url": "https://x", "retry": {"retry_on": ["dns"]}},
            "retry.retry_on.0",
            "'timeout', 'connection' or 'status'",
        ),
        (
            {"id": "f", "type": "http", "url": "https://x", "retry": {"retry_on": []}},
            "retry.retry_on",
            "at least 1",
        ),
        (
            {
                "id": "f",
                "type": "http",
                "url": "https://x",
                "retry": {"retry_on": ["status", "status"]},
            },
            "retry.retry_on",
            "lists a kind twice",
        ),
        (
            {"id": "f", "type": "http", "url": "https://x", "retry": {"retry_statuses": [200]}},
            "retry.retry_statuses",
            "200 is not an error status",
        ),
        (
            {"id": "f", "type": "http", "url": "https://x", "retry": {"retry_statuses": ["3xx"]}},
            "retry.retry_statuses",
            "'3xx' is not an error status",
        ),
        (
            {"id": "f", "type": "http", "url": "https://x", "retry": {"retry_statuses": [600]}},
            "retry.retry_statuses",
            "give codes 400-599, '4xx' or '5xx'",
        ),
        (
            {
                "id": "f",
                "type": "http",
                "url": "https://x",
                "retry": {"retry_on": ["timeout"], "retry_statuses": [404]},
            },
            "retry",
            "retry_on does not list 'status'",
        ),
        (
            {"id": "t", "type": "transform", "expression": "@", "select": "items[["},
            "select",
            "invalid expression",
        ),
        (
            {"id": "f", "type": "http", "url": "https://x", "select": "eval(body)"},
            "select",
            "unknown function 'eval'",
        ),
        ({"id": "f", "type": "http", "url": "https://x", "select": ""}, "select", "at least 1"),
        ({"id": "n", "type": "noop", "select": "a"}, "select", "Extra inputs"),
        ({"id": "d", "type": "delay", "seconds": 1, "select": "a"}, "select", "Extra inputs"),
        ({"id": "n", "type": "teleport"}, "type", "'type' must be one of: http, transform"),
        ({"id": "n"}, "type", "'type' must be one of"),
        ({"id": "1st", "type": "noop"}, "id", "should match pattern"),
    ],
)
def test_step_errors_name_step_and_field(step: dict[str, Any], field: str, message: str) -> None:
    found = problems(with_steps({"id": "first", "type": "noop"}, step))
    assert any(
        p["step"] == step.get("id")
        and p["index"] == 1
        and p["field"] == field
        and message in p["message"]
        for p in found
    ), found


def test_step_without_id_points_at_index() -> None:
    found = problems(with_steps({"type": "noop"}))
    assert found == [{"step": None, "index": 0, "field": "id", "message": "Field required"}]


def test_cross_step_errors() -> None:
    found = problems(
        with_steps(
            {"id": "a", "type": "noop"},
            {"id": "a", "type": "noop"},
            {"id": "c", "type": "condition", "expression": "x", "then": {"goto": "missing"}},
            {"id": "d", "type": "condition", "cases": [{"when": "x", "then": {"goto": "c"}}]},
        )
    )
    assert {(p["step"], p["index"], p["field"]) for p in found} == {
        ("a", 1, "id"),
        ("c", 2, "then.goto"),
        ("d", 3, "cases.0.then.goto"),
    }
    messages = " ".join(p["message"] for p in found)
    assert "duplicate step id 'a'" in messages
    assert "'missing' is not a step" in messages
    assert "must be a later step" in messages


def test_cross_step_errors_also_from_model_validate() -> None:
    doc = with_steps({"id": "a", "type": "noop"}, {"id": "a", "type": "noop"})
    with pytest.raises(ValueError, match="duplicate step id"):
        WorkflowDefinition.model_validate(doc)


@pytest.mark.parametrize(
    ("doc", "field", "message"),
    [
        ({"steps": [{"id": "a", "type": "noop"}]}, "name", "Field required"),
        ({"name": "x", "steps": []}, "steps", "at least 1"),
        (
            {"name": "x", "region": "EU!", "steps": [{"id": "a", "type": "noop"}]},
            "region",
            "pattern",
        ),
        (
            {"name": "x", "input_schema": {"type": "nope"}, "steps": [{"id": "a", "type": "noop"}]},
            "input_schema",
            "not a valid JSON Schema",
        ),
        ({"name": "x", "stepz": []}, "stepz", "Extra inputs"),
        (
            {"name": "x", "steps": [{"id": f"s{i}", "type": "noop"} for i in range(101)]},
            "steps",
            "at most 100",
        ),
    ],
)
def test_workflow_level_errors(doc: dict[str, Any], field: str, message: str) -> None:
    found = problems(doc)
    assert any(
        p["step"] is None and p["field"] == field and message in p["message"] for p in found
    ), found


@pytest.mark.parametrize(
    "doc", [[1, 2], "not json", '{"name": ', b"\xff", {"name": "x", "steps": float("nan")}]
)
def test_not_a_definition(doc: Any) -> None:
    found = problems(doc)
    assert found[0]["step"] is None


def test_size_and_depth_limits() -> None:
    deep: Any = 1
    for _ in range(40):
        deep = [deep]
    found = problems(with_steps({"id": "h", "type": "http", "url": "https://x", "body": deep}))
    assert found[0]["field"] == "body" and "nested deeper" in found[0]["message"]
    huge = with_steps({"id": "n", "type": "noop", "name": "x" * 200}) | {
        "description": "y" * 300_000
    }
    assert "larger than" in problems(huge)[0]["message"]
    assert "larger than" in problems(json.dumps(huge))[0]["message"]
    nested = "(" * 40 + "a" + ")" * 40
    found = problems(with_steps({"id": "t", "type": "transform", "expression": nested}))
    assert "nested deeper than 32" in found[0]["message"]


def test_message_summarises_first_problem() -> None:
    with pytest.raises(WorkflowInvalid) as info:
        parse_definition(with_steps({"id": "fetch", "type": "http", "url": "ftp://x"}))
    assert info.value.message == (
        "invalid workflow: step 'fetch' field 'url': must be an http:// or https:// URL"
    )


def test_select_is_kept_and_checked_like_other_expressions() -> None:
    doc = with_steps(
        {"id": "f", "type": "http", "url": "https://x", "select": "body.items[*].id"},
        {"id": "t", "type": "transform", "expression": "input", "select": "{n: n}"},
    )
    schema = workflow_json_schema()
    jsonschema.validate(doc, schema)
    definition = parse_definition(doc)
    fetch, shape = definition.steps
    assert isinstance(fetch, HttpStep) and fetch.select == "body.items[*].id"
    assert isinstance(shape, TransformStep) and shape.select == "{n: n}"
    assert parse_definition(definition.to_document()) == definition
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(with_steps({"id": "n", "type": "noop", "select": "a"}), schema)


def test_retry_policy_delays() -> None:
    exponential = RetryPolicy(attempts=5, backoff="exponential", delay_s=1, max_delay_s=5)
    assert [exponential.delay_after(n) for n in range(1, 6)] == [1, 2, 4, 5, 5]
    fixed = RetryPolicy(attempts=3, backoff="fixed", delay_s=2)
    assert [fixed.delay_after(n) for n in (1, 2)] == [2, 2]
    assert RetryPolicy().attempts == 1


def test_retry_policy_decides_what_is_retried() -> None:
    default = RetryPolicy(attempts=3)
    assert default.retries("status", 503, True) and default.retries("timeout", None, True)
    assert not default.retries("status", 404, False) and not default.retries(None, None, False)
    assert default.retries(None, None, True)  # a custom runner's retryable error
    listed = RetryPolicy(attempts=3, retry_statuses=[404, "5xx"])
    assert listed.retries("status", 404, False) and listed.retries("status", 599, True)
    assert not listed.retries("status", 429, True) and listed.retries("connection", None, True)
    narrow = RetryPolicy(attempts=3, retry_on=["connection"])
    assert narrow.retries("connection", None, True)
    assert not narrow.retries("timeout", None, True) and not narrow.retries(None, None, True)
    assert not narrow.retries("status", 503, True)


def test_delay_until_template_is_kept() -> None:
    step = parse_definition(with_steps({"id": "d", "type": "delay", "until": "{{ input.at }}"}))
    assert isinstance(step.steps[0], DelayStep)


def test_json_schema_accepts_good_and_describes_steps() -> None:
    schema = workflow_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(GOOD, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(with_steps({"id": "a", "type": "noop", "bogus": 1}), schema)
    assert set(schema["$defs"]) >= {
        "HttpStep",
        "TransformStep",
        "ConditionStep",
        "DelayStep",
        "NoopStep",
        "RetryPolicy",
    }
    assert "else" in schema["$defs"]["ConditionStep"]["properties"]
    for name in ("HttpStep", "TransformStep"):
        select = schema["$defs"][name]["properties"]["select"]
        assert "JMESPath" in select["description"]
    for name in ("ConditionStep", "DelayStep", "NoopStep"):
        assert "select" not in schema["$defs"][name]["properties"]
    schema["title"] = "changed"
    assert workflow_json_schema()["title"] != "changed"


def test_validate_input() -> None:
    definition = parse_definition(GOOD)
    validate_input(definition, {"orderId": "o-1"})
    with pytest.raises(InputInvalid) as info:
        validate_input(definition, {"orderId": 5})
    details: Any = info.value.details  # a list (ConveyorError types it as a dict)
    assert details == [{"field": "orderId", "message": "5 is not of type 'string'"}]
    with pytest.raises(InputInvalid):
        validate_input(definition, {})
    validate_input(parse_definition(with_steps({"id": "a", "type": "noop"})), "anything")
