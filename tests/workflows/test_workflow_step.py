"""The ``workflow`` step's fields (a sub-workflow), validated when a workflow is saved; event
names starting with ``conveyor.`` are reserved for the events sub-workflows send."""

from __future__ import annotations

from typing import Any

import pytest

from conveyor.errors import WorkflowInvalid
from conveyor.workflows import WorkflowStep, parse_definition


def _parse(*steps: dict[str, Any]) -> list[Any]:
    return list(parse_definition({"name": "w", "steps": list(steps)}).steps)


def test_fields_and_defaults() -> None:
    (step,) = _parse({"id": "s", "type": "workflow", "workflow": "abc123"})
    assert isinstance(step, WorkflowStep)
    assert (step.version, step.input, step.timeout_s) == ("latest", None, None)
    (step,) = _parse(
        {"id": "s", "type": "workflow", "workflow": "abc_1-2", "version": 3,
         "input": {"n": "{{ input.n }}", "list": [1, "x"]}, "timeout_s": 60},
    )  # fmt: skip
    assert isinstance(step, WorkflowStep)
    assert (step.version, step.input["n"], step.timeout_s) == (3, "{{ input.n }}", 60)


@pytest.mark.parametrize(
    ("step", "field", "message"),
    [
        ({}, "workflow", "Field required"),
        ({"workflow": "has space"}, "workflow", "String should match pattern"),
        ({"workflow": "w", "version": 0}, "version", ""),
        ({"workflow": "w", "version": "newest"}, "version", ""),
        ({"workflow": "w", "input": "{{ input.[ }}"}, "input", ""),
        ({"workflow": "w", "timeout_s": 0}, "timeout_s", "greater than 0"),
        ({"workflow": "w", "retry": {"attempts": 2}}, "", "'retry' does not apply"),
        ({"workflow": "w", "wait": True}, "wait", "Extra inputs"),
    ],
)
def test_refused(step: dict[str, Any], field: str, message: str) -> None:
    with pytest.raises(WorkflowInvalid) as refused:
        _parse({"id": "s", "type": "workflow", **step})
    problem = refused.value.details[0]
    assert problem["step"] == "s" and problem["field"].startswith(field), problem
    assert message in problem["message"], problem


def test_reserved_event_names_are_refused_in_wait_steps() -> None:
    with pytest.raises(WorkflowInvalid) as refused:
        _parse({"id": "w", "type": "wait", "event": "conveyor.workflow.0"})
    (problem,) = refused.value.details
    assert problem["field"] == "event" and "reserved" in problem["message"], problem
    (step,) = _parse({"id": "w", "type": "wait", "event": "conveyorbelt.moved"})
    assert step.event == "conveyorbelt.moved"
