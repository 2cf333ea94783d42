"""Models of the tenant API: workflows, executions, schedules, webhooks."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import ConfigDict, Field

from conveyor.api.schemas._common import ApiModel

ExecutionStatus = Literal["queued", "running", "waiting", "succeeded", "failed", "cancelled"]

EXAMPLE_WORKFLOW: dict[str, Any] = {
    "name": "order-sync",
    "steps": [
        {"id": "fetch", "type": "http", "method": "GET",
         "url": "https://api.example.com/orders/{{ input.orderId }}"},
        {"id": "shape", "type": "transform",
         "expression": "{id: steps.fetch.body.id, total: steps.fetch.body.total}"},
        {"id": "big", "type": "condition", "expression": "steps.shape.total > `100`",
         "then": "continue", "else": "end"},
        {"id": "notify", "type": "noop"},
    ],
}  # fmt: skip


# --- workflows ------------------------------------------------------------------------------
class WebhookInfo(ApiModel):
    url: str = Field(
        description="Path of the workflow's inbound webhook (POST, secret required).",
        examples=["/api/webhooks/0190a1b2c3d47e8f9a0b1c2d3e4f5a6b"],
    )
    has_secret: bool


class WebhookSecretOut(WebhookInfo):
    secret: str = Field(
        description="The webhook secret. Shown only in this answer.", examples=["whs_3q2..."]
    )


class WorkflowOut(ApiModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "0190a1b2c3d47e8f9a0b1c2d3e4f5a6b",
                    "name": "order-sync",
                    "region": "us",
                    "version": 1,
                    "enabled": True,
                    "createdAt": "2024-05-15T18:19:00Z",
                    "updatedAt": "2024-05-15T18:19:00Z",
                    "definition": EXAMPLE_WORKFLOW,
                    "webhook": {"url": "/api/webhooks/0190a1b2c3d47e8f9a0b1c2d3e4f5a6b",
                                "hasSecret": True},
                }
            ]
        }
    )  # fmt: skip
    id: str
    name: str
    region: str
    version: int = Field(description="The current version (executions pin theirs).")
    enabled: bool
    created_at: datetime
    updated_at: datetime
    definition: dict[str, Any] | None = Field(
        None, description="The current version's definition (omitted in lists)."
    )
    webhook: WebhookInfo
    webhook_secret: str | None = Field(
        None, description="Only in the answer to create: the webhook secret, shown once."
    )


class WorkflowPatch(ApiModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"enabled": False}]})
    enabled: bool = Field(description="A disabled workflow cannot be triggered.")


class WorkflowVersionOut(ApiModel):
    workflow_id: str
    version: int
    definition: dict[str, Any]
    created_at: datetime


# --- executions -----------------------------------------------------------------------------
class TriggerIn(ApiModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"input": {"orderId": 42}}]}
    )
    input: Any = Field(
        None, description="The trigger input (any JSON), checked against the input schema."
    )


class EventOut(ApiModel):
    """A stored event (for a ``wait`` step)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "0190a1b2c3d47e8f9a0b1c2d3e4f5a70",
                    "name": "payment.received",
                    "executionId": "0190a1b2c3d47e8f9a0b1c2d3e4f5a6c",
                    "correlation": None,
                    "receivedAt": "2026-12-06T20:00:00Z",
                    "woken": ["0190a1b2c3d47e8f9a0b1c2d3e4f5a6c"],
                }
            ]
        }
    )
    id: str
    name: str
    execution_id: str | None = Field(
        description="The execution it is addressed to; null for a webhook event kept for the "
        "first execution that waits on its correlation value."
    )
    correlation: str | None = None
    received_at: datetime
    woken: list[str] = Field(
        description="Executions that were parked on a wait step for this event and are now "
        "resumed to receive it (empty: none waits yet; the event is kept and received when a "
        "wait step for it runs)."
    )


class EventRecordOut(ApiModel):
    """An event of an execution: received by one of its wait steps, or still kept for one."""

    id: str
    name: str
    correlation: str | None
    payload: Any
    source: str = Field(description="`api` or `webhook`.")
    received_at: datetime
    consumed_at: datetime | None = Field(
        description="When a wait step received it; null: kept for the next wait step for it."
    )
    consumed_seq: int | None = Field(description="The `seq` of the step run that received it.")


class RetryIn(ApiModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"from": "failed"}]})
    from_: Literal["start", "failed"] = Field(
        "start",
        alias="from",
        description=(
            "`start` (default): run every step again. `failed`: resume at the failed step — "
            "the step runs before it are copied from the original (`reusedFrom`), their "
            "outputs restored, and they do not run again; the failed step and the steps after "
            "it run. Only for a `failed` execution whose failure was a step's (409 otherwise)."
        ),
    )


class StepRunOut(ApiModel):
    seq: int
    step_id: str
    type: str
    status: str
    attempts: int
    input: Any = None
    output: Any = None
    output_truncated: bool = False
    error: Any = None
    started_at: datetime
    finished_at: datetime
    duration_ms: float
    reused_from: str | None = Field(
        None,
        description="Set on a retry from the failed step: this step did not run again, its "
        "run was copied from this execution's step run with the same `seq` (its output is what "
        "later steps see). Null for a step that ran.",
    )


class ExecutionOut(ApiModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "0190a1b2c3d47e8f9a0b1c2d3e4f5a6c",
                    "workflowId": "0190a1b2c3d47e8f9a0b1c2d3e4f5a6b",
                    "workflowVersion": 1,
                    "status": "queued",
                    "region": "us",
                    "triggeredBy": "api",
                    "input": {"orderId": 42},
                    "output": None,
                    "error": None,
                    "attempts": 0,
                    "stepsRun": 0,
                    "createdAt": "2024-05-15T18:19:00Z",
                }
            ]
        }
    )
    id: str
    workflow_id: str
    workflow_version: int
    status: ExecutionStatus
    region: str
    triggered_by: str = Field(
        description="`api`, `webhook`, `schedule`, `retry`, or, for a child execution, "
        "`workflow` (a sub-workflow), `parallel` (a branch) or `foreach` (an item)."
    )
    input: Any = None
    output: Any = Field(
        None,
        description=(
            "Once succeeded: the value of the workflow's `output` expression (over `input`, "
            "`steps`, `execution`), or the output of the last step that ran when the workflow "
            "has none. Null otherwise."
        ),
    )
    error: Any = Field(
        None,
        description=(
            "Once failed: `{step, type, code?, message, details?}` of the failing step, or, "
            'when the `output` expression failed, `{type: "ExpressionError", code: '
            '"output_expression_failed", message, expression}` (no `step`).'
        ),
    )
    attempts: int = Field(
        description=(
            "Deliveries that ran work: the first run, and a run again after a crash or lost "
            "lock. Resuming after a `delay` step does not count."
        )
    )
    steps_run: int
    step_attempt: int = Field(
        0,
        description=(
            "While the execution waits (`waiting`) for the next try of a step (a retry wait "
            "of 1 s or more): the tries of that step already made. 0 otherwise."
        ),
    )
    step_errors: list[Any] | None = Field(
        None,
        description=(
            "While it waits for a step's next try: those tries' errors, "
            '`[{"attempt": n, type, message, details?}]`. Null otherwise.'
        ),
    )
    idempotency_key: str | None = None
    schedule_id: str | None = None
    retry_of: str | None = None
    parent_execution_id: str | None = Field(
        None,
        description=(
            "A child's parent: the execution whose `workflow`, `parallel` or `foreach` step "
            "started this one. Null otherwise."
        ),
    )
    parent_seq: int | None = Field(
        None, description="The seq of the parent's step run that started this one."
    )
    depth: int = Field(0, description="Nesting depth: 0 at the top, the parent's + 1 for a child.")
    branch: str | None = Field(
        None,
        description=(
            "The step list a `parallel` branch (`<step id>.<branch index>`) or a `foreach` "
            "item (`<step id>`) runs, `/`-joined when nested. Null otherwise."
        ),
    )
    parent_index: int | None = Field(
        None, description="A branch's or an item's index in its parent's step."
    )
    scheduled_for: datetime | None = Field(
        None,
        description="The tick instant (UTC) a schedule's execution fires for; null unless "
        "`triggeredBy` is `schedule`.",
    )
    created_at: datetime
    queued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime | None = None
    steps: list[StepRunOut] | None = Field(
        None, description="Step runs in order (single-execution reads only)."
    )


# --- schedules ------------------------------------------------------------------------------
_CRON_DESCRIPTION = (
    "5 fields (`min hour day month weekday`), or 6 with **seconds first** "
    "(`sec min hour day month weekday`, as BullMQ, Quartz and Spring write it), "
    "or an alias such as `@hourly`. Matched against the wall clock of `timezone`. "
    "Validated on every save: an expression that never fires (`0 0 30 2 *`) is "
    "refused."
)


class ScheduleIn(ApiModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "workflowId": "0190a1b2c3d47e8f9a0b1c2d3e4f5a6b",
                    "cron": "0 9 * * 1-5",
                    "timezone": "Europe/Berlin",
                    "input": {"report": "daily"},
                }
            ]
        },
    )
    workflow_id: str = Field(min_length=1, max_length=64)
    cron: str = Field(
        min_length=1,
        max_length=200,
        description=_CRON_DESCRIPTION,
        examples=["0 9 * * 1-5", "30 */5 * * * *"],
    )
    timezone: str = Field("UTC", min_length=1, max_length=64, description="IANA time zone.")
    name: str | None = Field(None, max_length=200)
    input: Any = None
    enabled: bool = True
    misfire_policy: Literal["fire_once", "skip"] | None = None


class SchedulePatch(ApiModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"cron": "*/5 * * * *", "enabled": False}]},
    )
    cron: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        description=_CRON_DESCRIPTION,
        examples=["*/5 * * * *", "*/10 * * * * *"],
    )
    timezone: str | None = Field(None, min_length=1, max_length=64)
    name: str | None = Field(None, max_length=200)
    input: Any = None
    enabled: bool | None = None
    misfire_policy: Literal["fire_once", "skip"] | None = None


class ScheduleTickOut(ApiModel):
    """One recorded tick of a schedule."""

    fire_time: datetime = Field(description="The tick instant (UTC).")
    outcome: Literal["fired", "collapsed", "skipped", "cancelled", "disabled"] = Field(
        description=(
            "`fired`: its execution was created; `collapsed`: missed beyond the misfire grace "
            "and folded into a later run (`fire_once`); `skipped`: missed, policy `skip`; "
            "`cancelled`: recorded ahead, then the schedule was edited, disabled or deleted "
            "before the instant; `disabled`: the workflow was disabled (no execution)."
        )
    )
    execution_id: str | None = None
    created_at: datetime = Field(
        description="When the tick was recorded: up to SCHEDULER_LOOKAHEAD_MS before fireTime."
    )


class ScheduleOut(ApiModel):
    id: str
    workflow_id: str
    name: str | None = None
    cron: str = Field(examples=["0 9 * * 1-5"])
    timezone: str = Field(examples=["Europe/Berlin"])
    enabled: bool
    input: Any = None
    misfire_policy: str | None = None
    next_fire_at: datetime | None = Field(None, description="Next fire instant (UTC).")
    last_fired_at: datetime | None = None
    created_at: datetime
    updated_at: datetime
