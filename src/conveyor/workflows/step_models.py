"""The steps of a workflow definition: the seven step models, retry policies, actions, limits.

Split from :mod:`conveyor.workflows.definition` (which re-exports everything here and holds the
workflow model, parsing with useful errors, and the JSON Schema); see its docstring for the
document format.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
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

from conveyor.workflows.expressions import check_expression, check_template, is_template

STEP_ID_PATTERN = r"^[A-Za-z][A-Za-z0-9_-]{0,63}$"
STEP_TYPES = (
    "http", "transform", "condition", "delay", "wait", "workflow", "parallel", "foreach", "noop"
)  # fmt: skip
MAX_JSON_DEPTH = 32
MAX_HEADERS = 50
MAX_URL_CHARS = 8192
MAX_BODY_BYTES = 64 * 1024
MAX_RESPONSE_BYTES = 10 * 1024 * 1024
DEFAULT_RESPONSE_BYTES = 1024 * 1024
MAX_TIMEOUT_S = 3600.0
DEFAULT_HTTP_TIMEOUT_S = 30.0
MAX_DELAY_S = 366 * 24 * 3600.0
EVENT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
MAX_CORRELATION_CHARS = 512

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


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=False)


RETRY_ERROR_KINDS = ("timeout", "connection", "status")
"""What a retry policy's ``retry_on`` may list (see :class:`RetryPolicy`)."""
DURABLE_RETRY_MIN_S = 1.0
"""A wait of at least this long before a step's next try is a durable timer (the execution
parks ``waiting``, no worker slot is held); shorter waits sleep in the worker."""


class RetryPolicy(_Model):
    """How the engine retries a failed step (``attempts`` counts every try, the first too).

    Which failures are retried: by default every retryable one — timeouts, connection errors
    (network, DNS) and the HTTP statuses 408, 425, 429 and 5xx. ``retry_on`` narrows that to
    the listed kinds (``timeout``, ``connection``, ``status``); ``retry_statuses`` replaces the
    retried statuses (codes like ``404`` or classes like ``"5xx"``), so a status that is
    otherwise permanent (a 404) can be retried. Anything else (a refused URL, a bad template,
    a permanent error) is never retried.
    """

    attempts: int = Field(default=1, ge=1, le=50)
    backoff: Literal["fixed", "exponential"] = "exponential"
    delay_s: float = Field(default=1.0, ge=0, le=86400)
    max_delay_s: float = Field(default=300.0, ge=0, le=86400)
    retry_on: list[Literal["timeout", "connection", "status"]] | None = Field(
        default=None, min_length=1, max_length=len(RETRY_ERROR_KINDS)
    )
    retry_statuses: list[int | str] | None = Field(default=None, min_length=1, max_length=100)

    @field_validator("retry_on")
    @classmethod
    def _check_retry_on(cls, value: list[str] | None) -> list[str] | None:
        if value is not None and len(set(value)) != len(value):
            raise ValueError("lists a kind twice")
        return value

    @field_validator("retry_statuses")
    @classmethod
    def _check_retry_statuses(cls, value: list[int | str] | None) -> list[int | str] | None:
        if value is None:
            return None
        for item in value:
            if not (400 <= item <= 599 if isinstance(item, int) else item in ("4xx", "5xx")):
                raise ValueError(
                    f"{item!r} is not an error status: give codes 400-599, '4xx' or '5xx'"
                )
        if len(set(value)) != len(value):
            raise ValueError("lists a status twice")
        return value

    @model_validator(mode="after")
    def _statuses_need_status(self) -> RetryPolicy:
        if (
            self.retry_statuses is not None
            and self.retry_on is not None
            and "status" not in self.retry_on
        ):
            raise ValueError("retry_statuses is given but retry_on does not list 'status'")
        return self

    def delay_after(self, failed_attempts: int) -> float:
        """Seconds to wait before the next try, after ``failed_attempts`` (≥ 1) failed tries."""
        if self.backoff == "fixed":
            return min(self.delay_s, self.max_delay_s)
        exponent = min(max(failed_attempts - 1, 0), 60)
        return float(min(self.delay_s * (2**exponent), self.max_delay_s))

    def retries(self, kind: str | None, status: int | None, retryable: bool) -> bool:
        """Whether a failed try is worth another (attempts left aside).

        ``kind``: the error's kind (:attr:`conveyor.errors.StepError.kind`); ``status``: the
        HTTP status of a ``status`` error; ``retryable``: the step said it may succeed again.
        """
        if self.retry_on is not None and kind not in self.retry_on:
            return False
        if kind == "status" and status is not None and self.retry_statuses is not None:
            return status_listed(status, self.retry_statuses)
        return retryable


def status_listed(status: int, listed: list[int | str]) -> bool:
    """``status`` is one of ``listed``'s codes or in one of its classes (``"5xx"``)."""
    return any(
        item == status if isinstance(item, int) else str(status)[0] == item[0] for item in listed
    )


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


class _OutputStep(_StepBase):
    """A step whose output is data that later steps read (``http``, ``transform``)."""

    select: Expression | None = Field(
        default=None,
        description=(
            "A JMESPath expression over this step's output (its root is the output, e.g. "
            "`body.items[*].id`): only its value is kept, checked against "
            "STEP_OUTPUT_MAX_BYTES and stored, and later steps see it as `steps.<id>`."
        ),
    )

    @field_validator("select")
    @classmethod
    def _check_select(cls, value: str | None) -> str | None:
        return None if value is None else check_expression(value)


class HttpStep(_OutputStep):
    """Call an HTTP(S) URL. ``url``, header values and string leaves of ``body`` are templates.

    The step succeeds when the final status is in ``expect_status`` (default: any 2xx).
    Otherwise 408/425/429/5xx are retryable failures and every other status is permanent —
    unless the step's retry policy lists statuses (:class:`RetryPolicy`).
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
        check_template(value, secrets=True)
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
            check_template(header_value, secrets=True)
        return value

    @field_validator("body")
    @classmethod
    def _check_body(cls, value: Any) -> Any:
        check_json(value, MAX_BODY_BYTES)
        return check_template(value, secrets=True)

    @field_validator("response_headers")
    @classmethod
    def _check_response_headers(cls, value: list[str]) -> list[str]:
        for name in value:
            if not _HEADER_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid header name")
        return [name.lower() for name in value]


class TransformStep(_OutputStep):
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


class WaitStep(_StepBase):
    """Pause the execution until an event named ``event`` arrives, or ``timeout_s`` passes.

    An event is sent to one execution (``POST /api/executions/{id}/events/{name}``) or through
    the workflow's webhook with a correlation value (``POST /api/webhooks/{workflowId}/events/
    {name}?correlation=...``): a wait step with a ``correlation`` expression (a JMESPath
    expression evaluated when the step runs; its value must be a string or a number) also
    receives webhook events whose correlation value equals it. An event that arrives before
    the execution reaches the step is kept and delivered when it does.

    Output: ``{"event", "payload", "receivedAt"}``; on timeout ``on_timeout`` decides:
    ``"fail"`` (the default: the step fails with ``WaitTimeout``), or an action
    (``"continue"``, ``"end"``, ``{"goto": "<later step>"}``) taken with the output
    ``{"timedOut": true}``. Without ``timeout_s`` the step waits until an event arrives (or
    the execution is cancelled).
    """

    type: Literal["wait"]
    event: Annotated[str, StringConstraints(pattern=EVENT_NAME_PATTERN)]
    correlation: Expression | None = None
    timeout_s: float | None = Field(default=None, gt=0, le=MAX_DELAY_S)
    on_timeout: Literal["fail"] | Action = "fail"

    @field_validator("event")
    @classmethod
    def _check_event(cls, value: str) -> str:
        if value.startswith(RESERVED_EVENT_PREFIX):
            raise ValueError(f"event names starting with {RESERVED_EVENT_PREFIX!r} are reserved")
        return value

    @field_validator("correlation")
    @classmethod
    def _check_correlation(cls, value: str | None) -> str | None:
        return None if value is None else check_expression(value)

    @field_validator("on_timeout", mode="wrap")
    @classmethod
    def _check_on_timeout(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if value == "fail":
            return "fail"
        try:
            return handler(value)
        except ValidationError:
            raise ValueError(
                'must be "fail", "continue", "end" or {"goto": "<id of a later step>"}'
            ) from None

    @model_validator(mode="after")
    def _consistent(self) -> WaitStep:
        if self.retry is not None:
            raise ValueError("'retry' does not apply to a wait step")
        if self.timeout_s is None and "on_timeout" in self.model_fields_set:
            raise ValueError("'on_timeout' needs 'timeout_s'")
        return self

    @property
    def timeout_action(self) -> Action | None:
        """What runs after a timeout (``None``: the step fails)."""
        return None if self.on_timeout == "fail" else self.on_timeout


RESERVED_EVENT_PREFIX = "conveyor."
"""Event names Conveyor itself sends (a child's end, to its parent): not for wait steps or
the events API."""
WORKFLOW_ID_PATTERN = r"^[A-Za-z0-9_-]{1,64}$"


class WorkflowStep(_StepBase):
    """Run another workflow of the same tenant (a child execution) and wait for it to end.

    ``workflow`` is the workflow's id; ``version`` a version number or ``"latest"`` (the
    workflow's current version when the step starts the child). ``input`` is the child's input:
    JSON whose string leaves are templates (``{{ steps.fetch.body }}``). The child is created
    once per step run (a crash and re-run finds the same child), the parent parks ``waiting``
    (no worker slot held) and is woken when the child ends. Output: the child's output; a child
    that fails or is cancelled fails the step with ``ChildFailed`` (its error in ``details``).
    ``timeout_s`` bounds the wait (the step fails with ``WaitTimeout``; the child is cancelled).
    Nesting is bounded by ``WORKFLOW_MAX_DEPTH``.
    """

    type: Literal["workflow"]
    workflow: Annotated[str, StringConstraints(pattern=WORKFLOW_ID_PATTERN)]
    version: Annotated[int, Field(ge=1)] | Literal["latest"] = "latest"
    input: Any = None
    timeout_s: float | None = Field(default=None, gt=0, le=MAX_DELAY_S)

    @field_validator("input")
    @classmethod
    def _check_input(cls, value: Any) -> Any:
        return check_input_template(value)

    @model_validator(mode="after")
    def _consistent(self) -> WorkflowStep:
        if self.retry is not None:
            raise ValueError("'retry' does not apply to a workflow step (retry inside the child)")
        return self


MAX_BRANCHES = 50
"""Most branches one ``parallel`` step may have."""
MAX_LIST_STEPS = 100
"""Most steps in one list (the workflow's, a branch's, a ``foreach``'s)."""
MAX_FOREACH_CONCURRENCY = 1000


class _FanoutStep(_StepBase):
    """What ``parallel`` and ``foreach`` share: child executions through the queue."""

    input: Any = Field(
        default=None,
        description=(
            "Each child's input: JSON whose string leaves are templates, rendered in this "
            "execution's context (a foreach item's also sees `item` and `index`). Default: a "
            "parallel branch gets this execution's input, a foreach item `{item, index}`."
        ),
    )
    timeout_s: float | None = Field(default=None, gt=0, le=MAX_DELAY_S)

    @field_validator("input")
    @classmethod
    def _check_input(cls, value: Any) -> Any:
        return check_input_template(value)

    @model_validator(mode="after")
    def _no_retry(self) -> _FanoutStep:
        if self.retry is not None:
            raise ValueError(f"'retry' does not apply to a {self.type} step (retry inside it)")
        return self

    type: str


class ParallelStep(_FanoutStep):
    """Run ``branches`` (each a list of steps) at the same time, each as a child execution
    through the queue (they spread over workers and count against the tenant's limits); the
    execution parks ``waiting`` (no worker slot held) and is woken as they end.

    ``mode: "all"`` (default): joined when every branch succeeded — output: the branches'
    outputs in branch order (a branch's output is its last step's); the first branch that fails
    fails the step (``BranchFailed``) and cancels the others. ``mode: "any"``: joined when the
    first branch succeeds — output ``{"branch": <index>, "output": ...}``, the others are
    cancelled; the step fails only when every branch failed. ``timeout_s`` bounds the wait
    (``WaitTimeout``; the branches still running are cancelled).
    """

    type: Literal["parallel"]
    branches: list[Annotated[list[Step], Field(min_length=1, max_length=MAX_LIST_STEPS)]] = Field(
        min_length=2, max_length=MAX_BRANCHES
    )
    mode: Literal["all", "any"] = "all"


class ForeachStep(_FanoutStep):
    """Run ``steps`` once per element of the array ``items`` evaluates to (a JMESPath
    expression), each as a child execution through the queue, at most ``concurrency`` at a
    time; the execution parks ``waiting`` and is woken as they end (and starts the next ones).

    Output: the items' outputs in item order. The first item that fails fails the step
    (``BranchFailed``) and cancels those still running. More items than
    ``WORKFLOW_MAX_FANOUT`` fail the step (``fanout_exceeded``); an empty array succeeds with
    ``[]``.
    """

    type: Literal["foreach"]
    items: Expression
    steps: list[Step] = Field(min_length=1, max_length=MAX_LIST_STEPS)
    concurrency: Annotated[int, Field(ge=1, le=MAX_FOREACH_CONCURRENCY)] = 10

    @field_validator("items")
    @classmethod
    def _check_items(cls, value: str) -> str:
        return check_expression(value)


class NoopStep(_StepBase):
    """Do nothing (output ``null``)."""

    type: Literal["noop"]


AnyStep = (
    HttpStep
    | TransformStep
    | ConditionStep
    | DelayStep
    | WaitStep
    | WorkflowStep
    | ParallelStep
    | ForeachStep
    | NoopStep
)
"""Any step model (what a step runner receives)."""
Step = Annotated[AnyStep, Field(discriminator="type")]
"""A step of a definition: the models discriminated by ``type``."""
ParallelStep.model_rebuild()
ForeachStep.model_rebuild()

_AWARE = TypeAdapter(AwareDatetime)


def parse_until(value: str) -> datetime:
    """Parse an ISO-8601 timestamp that carries a UTC offset. Raises ``ValueError``."""
    try:
        at: datetime = _AWARE.validate_python(value)
    except ValidationError:
        raise ValueError(
            "must be an ISO-8601 timestamp with a UTC offset, e.g. 2030-01-01T09:00:00Z"
        ) from None
    try:
        at.astimezone(UTC)  # 0001-01-01T00:00+01:00 is before year 1 in UTC: no such time
    except OverflowError:
        raise ValueError("is out of range once in UTC (years 1 to 9999)") from None
    return at


def check_input_template(value: Any) -> Any:
    """A child's ``input`` (workflow, parallel, foreach steps): JSON of at most
    ``MAX_BODY_BYTES`` whose string leaves are templates."""
    check_json(value, MAX_BODY_BYTES)
    return check_template(value)


def check_json(value: Any, max_bytes: int) -> None:
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"must be JSON: {exc}") from None
    except RecursionError:
        raise ValueError("nested too deeply") from None
    if len(text.encode()) > max_bytes:
        raise ValueError(f"larger than {max_bytes} bytes")
    if json_depth(value) > MAX_JSON_DEPTH:
        raise ValueError(f"nested deeper than {MAX_JSON_DEPTH} levels")


def json_depth(value: Any) -> int:
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
