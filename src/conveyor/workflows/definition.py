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
``noop``. Every step has an ``id`` (``^[A-Za-z][A-Za-z0-9_-]{0,63}$``, unique), an optional
``retry`` policy and an optional ``timeout_s``. Unknown keys are errors (typos are caught).

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
import re
from datetime import datetime
from functools import lru_cache
from typing import Annotated, Any, Literal, cast

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from conveyor.errors import ConveyorError, WorkflowInvalid
from conveyor.workflows.expressions import check_expression, check_template, is_template

__all__ = [
    "MAX_DEFINITION_BYTES",
    "MAX_STEPS",
    "STEP_ID_PATTERN",
    "Action",
    "Case",
    "ConditionStep",
    "DelayStep",
    "GotoAction",
    "HttpStep",
    "InputInvalid",
    "NoopStep",
    "RetryPolicy",
    "Step",
    "TransformStep",
    "WorkflowDefinition",
    "parse_definition",
    "validate_input",
    "workflow_json_schema",
]

STEP_ID_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"
STEP_TYPES = ("http", "transform", "condition", "delay", "noop")
REGION_PATTERN = r"^[a-z0-9][a-z0-9-]{0,31}$"
MAX_STEPS = 100
MAX_DEFINITION_BYTES = 256 * 1024
MAX_JSON_DEPTH = 32
MAX_HEADERS = 50
MAX_URL_CHARS = 8192
MAX_BODY_BYTES = 64 * 1024
MAX_RESPONSE_BYTES = 10 * 1024 * 1024
DEFAULT_RESPONSE_BYTES = 1024 * 1024
MAX_TIMEOUT_S = 3600.0
DEFAULT_HTTP_TIMEOUT_S = 30.0
MAX_DELAY_S = 366 * 24 * 3600.0

_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,128}$")
_FORBIDDEN_HEADERS = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "upgrade",
        "te",
        "trailer",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "expect",
    }
)

StepId = Annotated[str, StringConstraints(pattern=STEP_ID_PATTERN)]
Expression = Annotated[str, StringConstraints(min_length=1, max_length=4096)]


class InputInvalid(ConveyorError):
    """The trigger input does not match the workflow's input schema."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=False)


class RetryPolicy(_Model):
    """How the engine retries a failed step (``attempts`` counts every try, the first too)."""

    attempts: int = Field(default=1, ge=1, le=50)
    backoff: Literal["fixed", "exponential"] = "exponential"
    delay_s: float = Field(default=1.0, ge=0, le=86400)
    max_delay_s: float = Field(default=300.0, ge=0, le=86400)

    def delay_after(self, failed_attempts: int) -> float:
        """Seconds to wait before the next try, after ``failed_attempts`` (≥ 1) failed tries."""
        if self.backoff == "fixed":
            return min(self.delay_s, self.max_delay_s)
        exponent = min(max(failed_attempts - 1, 0), 60)
        return float(min(self.delay_s * (2**exponent), self.max_delay_s))


class GotoAction(_Model):
    """Jump to a later step."""

    goto: StepId


def _validate_action(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    if isinstance(value, dict):
        try:
            return GotoAction.model_validate(value)
        except ValidationError as exc:
            error = exc.errors(include_url=False)[0]
            where = ".".join(str(p) for p in error["loc"]) or "goto"
            raise ValueError(f"{where}: {error['msg']}") from None
    try:
        return handler(value)
    except ValidationError:
        raise ValueError('must be "continue", "end" or {"goto": "<id of a later step>"}') from None


Action = Annotated[Literal["continue", "end"] | GotoAction, WrapValidator(_validate_action)]


class _StepBase(_Model):
    id: StepId
    name: Annotated[str, StringConstraints(max_length=200)] | None = None
    retry: RetryPolicy | None = None
    timeout_s: float | None = Field(default=None, gt=0, le=MAX_TIMEOUT_S)


class HttpStep(_StepBase):
    """Call an HTTP(S) URL. ``url``, header values and string leaves of ``body`` are templates.

    The step succeeds when the final status is in ``expect_status`` (default: any 2xx).
    Otherwise 408/429/5xx are retryable failures and every other status is permanent.
    """

    type: Literal["http"]
    method: Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"] = "GET"
    url: Annotated[str, StringConstraints(min_length=1, max_length=MAX_URL_CHARS)]
    headers: dict[str, Annotated[str, StringConstraints(max_length=8192)]] = Field(
        default_factory=dict
    )
    body: Any = None
    """JSON; strings are sent as text, anything else as ``application/json``."""
    expect_status: list[Annotated[int, Field(ge=100, le=599)]] | None = Field(
        default=None, min_length=1, max_length=100
    )
    follow_redirects: bool = True
    max_redirects: int = Field(default=5, ge=0, le=10)
    max_response_bytes: int = Field(default=DEFAULT_RESPONSE_BYTES, ge=1, le=MAX_RESPONSE_BYTES)
    response_headers: list[Annotated[str, StringConstraints(max_length=128)]] = Field(
        default_factory=list, max_length=50
    )
    """Extra response header names to include in the output (a default subset is always kept)."""

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        check_template(value)
        head = value.split("://", 1)[0] if "://" in value else value
        if not is_template(head) and ("://" not in value or head.lower() not in ("http", "https")):
            raise ValueError("must be an http:// or https:// URL")
        return value

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, value: dict[str, str]) -> dict[str, str]:
        if len(value) > MAX_HEADERS:
            raise ValueError(f"at most {MAX_HEADERS} headers")
        for name, header_value in value.items():
            if not _HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid header name")
            if name.lower() in _FORBIDDEN_HEADERS:
                raise ValueError(f"header {name!r} is set by Conveyor and cannot be given")
            if "\r" in header_value or "\n" in header_value:
                raise ValueError(f"header {name!r} contains a line break")
            check_template(header_value)
        return value

    @field_validator("body")
    @classmethod
    def _check_body(cls, value: Any) -> Any:
        _check_json(value, MAX_BODY_BYTES)
        return check_template(value)

    @field_validator("response_headers")
    @classmethod
    def _check_response_headers(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid header name")
        return [name.lower() for name in value]


class TransformStep(_StepBase):
    """Output the value of a JMESPath ``expression`` over the evaluation context."""

    type: Literal["transform"]
    expression: Expression

    @field_validator("expression")
    @classmethod
    def _check_expression(cls, value: str) -> str:
        return check_expression(value)


class Case(_Model):
    when: Expression
    then: Action

    @field_validator("when")
    @classmethod
    def _check_when(cls, value: str) -> str:
        return check_expression(value)


class ConditionStep(_StepBase):
    """Choose what runs next: ``expression`` + ``then``/``else``, or ``cases`` + ``else``."""

    type: Literal["condition"]
    expression: Expression | None = None
    then: Action | None = None
    cases: list[Case] | None = Field(default=None, min_length=1, max_length=50)
    otherwise: Action | None = Field(default=None, alias="else")

    @field_validator("expression")
    @classmethod
    def _check_expression(cls, value: str | None) -> str | None:
        return None if value is None else check_expression(value)

    @model_validator(mode="after")
    def _one_form(self) -> ConditionStep:
        if (self.expression is None) == (self.cases is None):
            raise ValueError("give exactly one of 'expression' or 'cases'")
        if self.cases is not None and self.then is not None:
            raise ValueError("'then' goes inside each case when 'cases' is used")
        return self

    @property
    def then_action(self) -> Action:
        return self.then if self.then is not None else "continue"

    @property
    def else_action(self) -> Action:
        if self.otherwise is not None:
            return self.otherwise
        return "end" if self.cases is None else "continue"

    def actions(self) -> list[tuple[str, Action]]:
        """Every ``(field path, action)`` of this step."""
        found: list[tuple[str, Action]] = [("else", self.else_action)]
        if self.cases is None:
            found.insert(0, ("then", self.then_action))
        else:
            found[:0] = [(f"cases.{i}.then", case.then) for i, case in enumerate(self.cases)]
        return found


class DelayStep(_StepBase):
    """Suspend the execution for ``seconds``, or until ``until`` (exactly one).

    ``until`` is ISO-8601 with a UTC offset (``2030-01-01T09:00:00+01:00``) or a template
    (``{{ input.sendAt }}``) evaluated when the step runs.
    """

    type: Literal["delay"]
    seconds: float | None = Field(default=None, gt=0, le=MAX_DELAY_S)
    until: Annotated[str, StringConstraints(min_length=1, max_length=4096)] | None = None

    @field_validator("until")
    @classmethod
    def _check_until(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if is_template(value):
            return cast(str, check_template(value))
        parse_until(value)
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> DelayStep:
        if (self.seconds is None) == (self.until is None):
            raise ValueError("give exactly one of 'seconds' or 'until'")
        return self


class NoopStep(_StepBase):
    """Do nothing (output ``null``)."""

    type: Literal["noop"]


Step = Annotated[
    HttpStep | TransformStep | ConditionStep | DelayStep | NoopStep, Field(discriminator="type")
]

_AWARE = TypeAdapter(AwareDatetime)


def parse_until(value: str) -> datetime:
    """Parse an ISO-8601 timestamp that carries a UTC offset. Raises ``ValueError``."""
    try:
        return _AWARE.validate_python(value)
    except ValidationError:
        raise ValueError(
            "must be an ISO-8601 timestamp with a UTC offset, e.g. 2030-01-01T09:00:00Z"
        ) from None


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

    @field_validator("input_schema")
    @classmethod
    def _check_input_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        _check_json(value, MAX_BODY_BYTES)
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

    def get_step(
        self, step_id: str
    ) -> HttpStep | TransformStep | ConditionStep | DelayStep | NoopStep:
        return self.steps[self.step_index(step_id)]

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


def _check_json(value: Any, max_bytes: int) -> None:
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"must be JSON: {exc}") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if len(text.encode()) > max_bytes:
        raise ValueError(f"larger than {max_bytes} bytes")
    if _json_depth(value) > MAX_JSON_DEPTH:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")


def _json_depth(value: Any) -> int:
    deepest = 0
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, depth)
            stack.extend(
                (v, depth + 1) for v in (item.values() if isinstance(item, dict) else item)
            )
    return deepest


def _cross_problems(definition: WorkflowDefinition) -> list[dict[str, Any]]:
    problems: list[dict[str, Any]] = []
    positions: dict[str, int] = {}
    for index, step in enumerate(definition.steps):
        if step.id in positions:
            problems.append(_problem(step.id, index, "id", f"duplicate step id {step.id!r}"))
        else:
            positions[step.id] = index
    for index, step in enumerate(definition.steps):
        if not isinstance(step, ConditionStep):
            continue
        for field, action in step.actions():
            if not isinstance(action, GotoAction):
                continue
            target = positions.get(action.goto)
            if target is None:
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
