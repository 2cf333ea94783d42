"""Workflow definitions: pydantic models, their JSON Schema, and validation with useful errors.

A workflow is JSON::

    {"name": "order-sync", "region": "eu",
     "input_schema": {"type": "object", "required": ["orderId"]},
     "steps": [
       {"id": "fetch", "type": "http", "url": "https://api.example.com/orders/{{ input.orderId }}",
        "retry": {"attempts": 3, "backoff": "exponential", "delay_s": 1}},
       {"id": "big", "type": "condition", "expression": "steps.fetch.body.total > `100`",
        "then": {"goto": "notify"}, "else": "end"},
       {"id": "wait", "type": "delay", "seconds": 3600},
       {"id": "notify", "type": "http", "method": "POST", "url": "https://hooks.example.com/x",
        "body": {"order": "{{ steps.fetch.body }}"}}]}

Step types (discriminated by ``type``): ``http``, ``transform``, ``condition``, ``delay``,
``wait`` (for an event, see :class:`~conveyor.workflows.step_models.WaitStep`), ``noop``. Every step has an ``id`` (``^[A-Za-z][A-Za-z0-9_-]{0,63}$``, unique), an optional
``retry`` policy and an optional ``timeout_s``. Unknown keys are errors (typos are caught).

``http`` and ``transform`` steps take an optional ``select``: a JMESPath expression over the
step's output (``"select": "body.items[*].id"``) whose value replaces the output — it is what
is stored and what later steps see as ``steps.<id>``. An output (selected or not) larger than
``STEP_OUTPUT_MAX_BYTES`` fails the step with ``output_too_large``: nothing is truncated.

``condition`` steps come in two forms (exactly one):

* ``{"expression": E, "then": A, "else": A}`` — ``then`` when ``E`` is truthy (JMESPath
  truthiness: ``false``, ``null``, ``""``, ``[]``, ``{}`` are false), else ``else``.
  Defaults: ``then`` = ``"continue"``, ``else`` = ``"end"`` (a guard).
* ``{"cases": [{"when": E, "then": A}, ...], "else": A}`` — the first truthy case wins;
  ``else`` defaults to ``"continue"``.

An action ``A`` is ``"continue"`` (next step in order), ``"end"`` (the execution succeeds now)
or ``{"goto": "<step id>"}``. A goto must jump **forward** (to a later step): every step of an
execution runs at most once, which keeps step runs keyed by step id and the execution finite.

:func:`parse_definition` raises :class:`~conveyor.errors.WorkflowInvalid` whose ``details`` is
a list of ``{"step": <step id or null>, "index": <step index or null>, "field": <dotted path
inside the step, or from the root for workflow fields>, "message": ...}``.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Annotated, Any, cast

from pydantic import (
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from conveyor.errors import InputInvalid, WorkflowInvalid
from conveyor.workflows.expressions import check_expression
from conveyor.workflows.step_models import (
    MAX_BODY_BYTES,
    STEP_ID_PATTERN,
    STEP_TYPES,
    Action,
    Case,
    ConditionStep,
    DelayStep,
    Expression,
    ForeachStep,
    GotoAction,
    HttpStep,
    NoopStep,
    ParallelStep,
    RetryPolicy,
    Step,
    TransformStep,
    WaitStep,
    WorkflowStep,
    _Model,
    check_json,
)

__all__ = [
    "MAX_DEFINITION_BYTES",
    "MAX_STEPS",
    "STEP_ID_PATTERN",
    "Action",
    "Case",
    "ConditionStep",
    "DelayStep",
    "ForeachStep",
    "GotoAction",
    "HttpStep",
    "NoopStep",
    "ParallelStep",
    "RetryPolicy",
    "Step",
    "TransformStep",
    "WaitStep",
    "WorkflowDefinition",
    "WorkflowStep",
    "parse_definition",
    "validate_input",
    "workflow_json_schema",
]

REGION_PATTERN = r"^[a-z0-9][a-z0-9-]{0,31}$"
MAX_STEPS = 100
MAX_DEFINITION_BYTES = 256 * 1024


class WorkflowDefinition(_Model):
    """A validated workflow definition."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, json_schema_extra={"title": "Conveyor workflow"}
    )

    name: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    description: Annotated[str, StringConstraints(max_length=4000)] | None = None
    region: Annotated[str, StringConstraints(pattern=REGION_PATTERN)] | None = None
    input_schema: dict[str, Any] | None = None
    steps: list[Step] = Field(min_length=1, max_length=MAX_STEPS)
    output: Expression | None = Field(
        None,
        description=(
            "A JMESPath expression over the evaluation context (`input`, `steps`, "
            "`execution`) whose value is the execution's output when it succeeds. Without "
            "it, the output is that of the last step that ran. A failing evaluation fails "
            "the execution (error type `ExpressionError`, code `output_expression_failed`)."
        ),
        examples=["{order: steps.fetch.body.id, total: steps.shape.total}"],
    )

    @field_validator("output")
    @classmethod
    def _check_output(cls, value: str | None) -> str | None:
        return None if value is None else check_expression(value)

    @field_validator("input_schema")
    @classmethod
    def _check_input_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        check_json(value, MAX_BODY_BYTES)
        import jsonschema  # type: ignore[import-untyped,unused-ignore]

        try:
            jsonschema.Draft202012Validator.check_schema(value)
        except jsonschema.SchemaError as exc:
            raise ValueError(f"not a valid JSON Schema: {exc.message}") from None
        return value

    @model_validator(mode="after")
    def _cross_check(self) -> WorkflowDefinition:
        problems = _cross_problems(self)
        if problems:
            raise PydanticCustomError(
                "workflow_invalid",
                "{summary}",
                {"summary": problems[0]["message"], "problems": problems},
            )
        return self

    # --- helpers for the engine ----------------------------------------------------------
    def step_index(self, step_id: str) -> int:
        """Position of ``step_id``; raises ``KeyError`` if absent."""
        for index, step in enumerate(self.steps):
            if step.id == step_id:
                return index
        raise KeyError(step_id)

    def get_step(self, step_id: str) -> Step:
        return self.steps[self.step_index(step_id)]

    def all_steps(self) -> list[tuple[int, Step]]:
        """Every step with its index in its list: the workflow's, then those of its branches
        and foreach lists (breadth first)."""
        found: list[tuple[int, Step]] = []
        lists: list[list[Step]] = [self.steps]
        while lists:
            steps = lists.pop(0)
            for index, step in enumerate(steps):
                found.append((index, step))
                if isinstance(step, ParallelStep):
                    lists.extend(step.branches)
                elif isinstance(step, ForeachStep):
                    lists.append(step.steps)
        return found

    def branch(self, path: str) -> WorkflowDefinition:
        """The step list a child execution with ``branch = path`` runs, as a definition (no
        ``output`` expression, no input schema). ``path``: ``/``-joined segments, each
        ``"<parallel step id>.<branch index>"`` or ``"<foreach step id>"``, from the workflow's
        own list inward. Raises ``KeyError`` when it names nothing here."""
        steps: list[Step] = self.steps
        for segment in path.split("/"):
            step_id, _, branch = segment.partition(".")
            step = next((s for s in steps if s.id == step_id), None)
            if isinstance(step, ParallelStep) and branch.isdigit():
                if int(branch) >= len(step.branches):
                    raise KeyError(path)
                steps = step.branches[int(branch)]
            elif isinstance(step, ForeachStep) and not branch:
                steps = step.steps
            else:
                raise KeyError(path)
        return WorkflowDefinition.model_construct(name=f"{self.name}/{path}", steps=steps)

    def next_step_id(self, step_id: str, action: Action = "continue") -> str | None:
        """The step that runs after ``step_id`` given ``action``; ``None`` when the run ends."""
        if action == "end":
            return None
        if isinstance(action, GotoAction):
            return action.goto
        index = self.step_index(step_id) + 1
        return self.steps[index].id if index < len(self.steps) else None

    def to_document(self) -> dict[str, Any]:
        """The definition as JSON (aliases such as ``else`` restored, defaults omitted)."""
        return self.model_dump(mode="json", by_alias=True, exclude_unset=True)


def _cross_problems(definition: WorkflowDefinition) -> list[dict[str, Any]]:
    """Step ids unique in the whole workflow (branches and foreach lists included); each goto
    to a later step of its own list."""
    problems: list[dict[str, Any]] = []
    seen: set[str] = set()
    lists: list[list[Step]] = [definition.steps]
    while lists:
        steps = lists.pop(0)
        problems.extend(_list_problems(steps, seen))
        for step in steps:
            if isinstance(step, ParallelStep):
                lists.extend(step.branches)
            elif isinstance(step, ForeachStep):
                lists.append(step.steps)
    return problems


def _list_problems(steps: list[Step], seen: set[str]) -> list[dict[str, Any]]:
    problems: list[dict[str, Any]] = []
    positions: dict[str, int] = {}
    for index, step in enumerate(steps):
        if step.id in seen:
            problems.append(_problem(step.id, index, "id", f"duplicate step id {step.id!r}"))
        else:
            seen.add(step.id)
            positions[step.id] = index
    for index, step in enumerate(steps):
        if isinstance(step, ConditionStep):
            actions = step.actions()
        elif isinstance(step, WaitStep) and step.timeout_action is not None:
            actions = [("on_timeout", step.timeout_action)]
        else:
            continue
        for field, action in actions:
            if not isinstance(action, GotoAction):
                continue
            target = positions.get(action.goto)
            if target is None and action.goto in seen:
                message = (
                    f"goto target {action.goto!r} is in another step list: a goto stays in its "
                    "own list (a branch's, a foreach's, or the workflow's)"
                )
            elif target is None:
                message = f"goto target {action.goto!r} is not a step of this workflow"
            elif target <= index:
                message = f"goto target {action.goto!r} must be a later step (no loops)"
            else:
                continue
            problems.append(_problem(step.id, index, f"{field}.goto", message))
    return problems


def _problem(step: str | None, index: int | None, field: str, message: str) -> dict[str, Any]:
    return {"step": step, "index": index, "field": field, "message": message}


# --- parsing ------------------------------------------------------------------------------------


def parse_definition(doc: Any) -> WorkflowDefinition:
    """Validate a workflow document (a dict, or JSON text/bytes).

    Raises :class:`~conveyor.errors.WorkflowInvalid`; its ``details`` is a list of
    ``{"step", "index", "field", "message"}`` problems, one per error.
    """
    if isinstance(doc, str | bytes | bytearray):
        if len(doc) > MAX_DEFINITION_BYTES:
            raise _invalid([_problem(None, None, "", f"larger than {MAX_DEFINITION_BYTES} bytes")])
        try:
            doc = json.loads(doc)
        except (ValueError, RecursionError) as exc:
            raise _invalid([_problem(None, None, "", f"not valid JSON: {exc}")]) from None
    if not isinstance(doc, dict):
        raise _invalid([_problem(None, None, "", "a workflow definition must be a JSON object")])
    try:
        size = len(json.dumps(doc, allow_nan=False).encode())
    except (TypeError, ValueError, RecursionError):
        raise _invalid([_problem(None, None, "", "not JSON-serialisable")]) from None
    if size > MAX_DEFINITION_BYTES:
        raise _invalid([_problem(None, None, "", f"larger than {MAX_DEFINITION_BYTES} bytes")])
    try:
        return WorkflowDefinition.model_validate(doc)
    except ValidationError as exc:
        raise _invalid(_problems_from(exc, doc)) from None


def _invalid(problems: list[dict[str, Any]]) -> WorkflowInvalid:
    first = problems[0]
    where = f"step {first['step']!r}" if first["step"] else "workflow"
    field = f" field {first['field']!r}" if first["field"] else ""
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    error = WorkflowInvalid(f"invalid workflow: {where}{field}: {first['message']}{more}")
    error.details = cast(Any, problems)
    return error


def _problems_from(exc: ValidationError, doc: dict[str, Any]) -> list[dict[str, Any]]:
    raw_steps = doc.get("steps")
    problems: list[dict[str, Any]] = []
    for error in exc.errors(include_url=False):
        ctx = error.get("ctx") or {}
        if error["type"] == "workflow_invalid" and "problems" in ctx:
            problems.extend(ctx["problems"])
            continue
        loc = list(error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        if len(loc) >= 2 and loc[0] == "steps" and isinstance(loc[1], int):
            index = loc[1]
            rest = loc[2:]
            raw = raw_steps[index] if isinstance(raw_steps, list) else None
            step_type = raw.get("type") if isinstance(raw, dict) else None
            if rest and rest[0] == step_type:
                rest = rest[1:]  # the discriminator tag pydantic adds to the location
            # and those of the steps nested in branches / foreach lists (after their index)
            rest = [p for i, p in enumerate(rest)
                    if not (i and isinstance(rest[i - 1], int) and p in STEP_TYPES)]  # fmt: skip
            step_id = raw.get("id") if isinstance(raw, dict) else None
            step = step_id if isinstance(step_id, str) and step_id else None
            if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
                rest = ["type"]
                message = f"'type' must be one of: {', '.join(STEP_TYPES)}"
            problems.append(_problem(step, index, _dotted(rest), message))
        else:
            problems.append(_problem(None, None, _dotted(loc), message))
    return problems or [_problem(None, None, "", str(exc))]


def _dotted(loc: list[Any]) -> str:
    parts: list[str] = []
    for part in loc:
        text = str(part)
        if text in ("function-after", "function-before", "function-wrap"):
            continue
        if text.startswith(("function-", "literal[", "json-or-python")):
            continue
        parts.append(text)
    return ".".join(parts)


# --- JSON Schema and input validation ---------------------------------------------------------


@lru_cache(maxsize=1)
def _schema() -> str:
    schema = WorkflowDefinition.model_json_schema(by_alias=True)
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["$id"] = "https://conveyor.dev/schemas/workflow.json"
    return json.dumps(schema)


def workflow_json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a workflow definition (a fresh copy)."""
    return cast(dict[str, Any], json.loads(_schema()))


def validate_input(definition: WorkflowDefinition, value: Any) -> None:
    """Check a trigger input against the definition's ``input_schema`` (if any).

    Raises :class:`InputInvalid` whose ``details`` is a list of ``{"field", "message"}``.
    """
    if definition.input_schema is None:
        return
    import jsonschema  # type: ignore[import-untyped,unused-ignore]

    validator = jsonschema.Draft202012Validator(definition.input_schema)
    errors = sorted(validator.iter_errors(value), key=lambda e: list(e.absolute_path))[:20]
    if not errors:
        return
    problems = [
        {"field": ".".join(str(p) for p in error.absolute_path), "message": error.message[:500]}
        for error in errors
    ]
    exc = InputInvalid(
        f"invalid input: {problems[0]['field'] or '(root)'}: {problems[0]['message']}"
    )
    exc.details = cast(Any, problems)
    raise exc
