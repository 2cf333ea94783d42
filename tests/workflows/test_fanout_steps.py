"""``parallel`` and ``foreach`` step definitions: what is accepted, and the 422 problems (with
the nested step located) for what is not."""

from __future__ import annotations

from typing import Any

import pytest

from conveyor.errors import WorkflowInvalid
from conveyor.workflows import ForeachStep, ParallelStep, parse_definition, workflow_json_schema


def _wf(*steps: dict[str, Any]) -> dict[str, Any]:
    return {"name": "fan", "steps": list(steps)}


def _problems(doc: dict[str, Any]) -> list[dict[str, Any]]:
    with pytest.raises(WorkflowInvalid) as caught:
        parse_definition(doc)
    details = caught.value.details
    assert isinstance(details, list)
    return details


NOOP = {"id": "n", "type": "noop"}


def test_parallel_and_foreach_parse_with_defaults() -> None:
    definition = parse_definition(_wf(
        {"id": "fan", "type": "parallel", "branches": [
            [{"id": "a", "type": "noop"}],
            [{"id": "each", "type": "foreach", "items": "input.xs",
              "steps": [{"id": "b", "type": "transform", "expression": "input.item"}]}],
        ]},
    ))  # fmt: skip
    fan = definition.steps[0]
    assert isinstance(fan, ParallelStep) and fan.mode == "all" and fan.input is None
    each = fan.branches[1][0]
    assert isinstance(each, ForeachStep) and each.concurrency == 10
    assert [s.id for _, s in definition.all_steps()] == ["fan", "a", "each", "b"]
    assert [s.id for s in definition.branch("fan.1/each").steps] == ["b"]
    assert [s.id for s in definition.branch("fan.0").steps] == ["a"]
    for wrong in ("fan", "fan.2", "each", "fan.1/b", "fan.x"):
        with pytest.raises(KeyError):
            definition.branch(wrong)
    assert definition.to_document()["steps"][0]["branches"][1][0]["items"] == "input.xs"


@pytest.mark.parametrize(
    ("step", "field", "message"),
    [
        ({"id": "p", "type": "parallel", "branches": [[NOOP]]}, "branches", "at least 2"),
        ({"id": "p", "type": "parallel", "branches": [[NOOP], []]}, "branches.1", "at least 1"),
        ({"id": "p", "type": "parallel", "branches": [[NOOP], [{"id": "m", "type": "noop"}]],
          "mode": "some"}, "mode", "'all' or 'any'"),
        ({"id": "p", "type": "parallel", "branches": [[NOOP], [{"id": "h", "type": "http"}]]},
         "branches.1.0.url", "Field required"),
        ({"id": "p", "type": "parallel", "branches": [[NOOP], [{"id": "m", "type": "noop"}]],
          "retry": {"attempts": 2}}, "", "'retry' does not apply to a parallel step"),
        ({"id": "f", "type": "foreach", "items": "input.xs[", "steps": [NOOP]}, "items",
         "invalid expression"),
        ({"id": "f", "type": "foreach", "items": "input.xs", "steps": [NOOP],
          "concurrency": 0}, "concurrency", "greater than or equal to 1"),
        ({"id": "f", "type": "foreach", "items": "input.xs", "steps": []}, "steps",
         "at least 1"),
        ({"id": "f", "type": "foreach", "items": "input.xs", "steps": [NOOP],
          "input": {"x": "{{ item.[ }}"}}, "input", "template"),
    ],
)  # fmt: skip
def test_invalid_fanout_steps_are_located(step: dict[str, Any], field: str, message: str) -> None:
    (problem, *_) = _problems(_wf(step))
    assert problem["step"] == step["id"] and problem["index"] == 0
    assert problem["field"] == field, problem
    assert message in problem["message"], problem


def test_step_ids_are_unique_across_branches() -> None:
    problems = _problems(_wf(
        {"id": "a", "type": "noop"},
        {"id": "p", "type": "parallel", "branches": [[{"id": "a", "type": "noop"}], [NOOP]]},
    ))  # fmt: skip
    assert problems == [
        {"step": "a", "index": 0, "field": "id", "message": "duplicate step id 'a'"}
    ]


def test_a_goto_stays_in_its_own_list() -> None:
    problems = _problems(_wf(
        {"id": "p", "type": "parallel", "branches": [
            [{"id": "c", "type": "condition", "expression": "input", "then": {"goto": "out"}}],
            [NOOP],
        ]},
        {"id": "out", "type": "noop"},
    ))  # fmt: skip
    (problem,) = problems
    assert (problem["step"], problem["field"]) == ("c", "then.goto")
    assert "in another step list" in problem["message"]
    # within the branch's own list, forward, it is fine
    parse_definition(_wf(
        {"id": "p", "type": "parallel", "branches": [
            [{"id": "c", "type": "condition", "expression": "input", "then": {"goto": "e"}},
             {"id": "d", "type": "noop"}, {"id": "e", "type": "noop"}],
            [NOOP],
        ]},
    ))  # fmt: skip


def test_the_json_schema_knows_the_new_steps() -> None:
    schema = workflow_json_schema()
    defs = schema["$defs"]
    assert "ParallelStep" in defs and "ForeachStep" in defs
    assert defs["ForeachStep"]["properties"]["concurrency"]["default"] == 10
