"""The ``wait`` step's fields, validated when a workflow is saved."""

from __future__ import annotations

from typing import Any

import pytest

from conveyor.errors import WorkflowInvalid
from conveyor.workflows import GotoAction, WaitStep, parse_definition


def _parse(*steps: dict[str, Any]) -> list[Any]:
    return list(parse_definition({"name": "w", "steps": list(steps)}).steps)


def test_fields_and_defaults() -> None:
    (step,) = _parse({"id": "w", "type": "wait", "event": "order.paid"})
    assert isinstance(step, WaitStep)
    assert (step.correlation, step.timeout_s, step.on_timeout) == (None, None, "fail")
    assert step.timeout_action is None
    step, _ = _parse(
        {"id": "w", "type": "wait", "event": "a:b_c-1", "correlation": "input.id",
         "timeout_s": 31_622_400, "on_timeout": {"goto": "n"}},
        {"id": "n", "type": "noop"},
    )  # fmt: skip
    assert isinstance(step, WaitStep) and step.timeout_action == GotoAction(goto="n")


@pytest.mark.parametrize(
    ("step", "field", "message"),
    [
        ({"event": "has space"}, "event", "String should match pattern"),
        ({"event": ""}, "event", "String should match pattern"),
        ({"event": "x", "timeout_s": 0}, "timeout_s", "greater than 0"),
        ({"event": "x", "timeout_s": 31_622_401}, "timeout_s", "less than or equal"),
        ({"event": "x", "on_timeout": "continue"}, "", "'on_timeout' needs 'timeout_s'"),
        ({"event": "x", "timeout_s": 1, "on_timeout": "retry"}, "on_timeout", 'must be "fail"'),
        (
            {"event": "x", "timeout_s": 1, "on_timeout": {"goto": "w"}},
            "on_timeout.goto",
            "must be a later step",
        ),
        (
            {"event": "x", "timeout_s": 1, "on_timeout": {"goto": "nope"}},
            "on_timeout.goto",
            "is not a step of this workflow",
        ),
        ({"event": "x", "correlation": "input.["}, "correlation", ""),
        ({"event": "x", "retry": {"attempts": 2}}, "", "'retry' does not apply"),
        ({"event": "x", "payload": 1}, "payload", "Extra inputs"),
    ],
)
def test_refused(step: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(WorkflowInvalid) as refused:
        _parse({"id": "w", "type": "wait", **step})
    (problem,) = refused.value.details
    assert problem["step"] == "w" and problem["field"] == field, problem
    assert message in problem["message"], problem
