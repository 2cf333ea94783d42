"""Executions: trigger, read (with step runs), list, cancel, retry."""

from __future__ import annotations

from operator import attrgetter
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Path, Query, Response

from conveyor.api.deps import CtxDep, TenantDep
from conveyor.api.events import check_payload, wake
from conveyor.api.schemas import (
    Envelope,
    EventOut,
    EventRecordOut,
    ExecutionOut,
    ExecutionStatus,
    Page,
    RetryIn,
    TriggerIn,
    error_responses,
)
from conveyor.api.trigger import enqueue, trigger
from conveyor.store import Execution, StepRun, utcnow
from conveyor.workflows.step_models import EVENT_NAME_PATTERN

router = APIRouter(tags=["executions"], responses=error_responses(400, 401, 404, 413, 422, 503))

ExecutionId = Annotated[
    str, Path(alias="executionId", min_length=1, max_length=64, description="Execution id.")
]
WorkflowId = Annotated[
    str, Path(alias="workflowId", min_length=1, max_length=64, description="Workflow id.")
]
EventName = Annotated[
    str,
    Path(
        min_length=1,
        max_length=128,
        pattern=EVENT_NAME_PATTERN,
        description="The event's name (what a wait step's `event` names).",
    ),
]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        description="Same key (per tenant) → same execution; safe retries of the trigger.",
    ),
]


def step_out(step: StepRun) -> dict[str, Any]:
    return {
        "seq": step.seq,
        "step_id": step.step_id,
        "type": step.step_type,
        "status": step.status,
        "attempts": step.attempts,
        "input": step.input,
        "output": step.output,
        "output_truncated": step.output_truncated,
        "error": step.error,
        "started_at": step.started_at,
        "finished_at": step.finished_at,
        "duration_ms": round(step.duration_ms, 3),
        "reused_from": step.reused_from,
    }


_OUT_FIELDS = (
    "id", "workflow_id", "workflow_version", "status", "region", "triggered_by",
    "input", "output", "error", "attempts", "steps_run", "step_attempt", "step_errors",
    "idempotency_key",
    "schedule_id", "retry_of", "scheduled_for", "created_at", "queued_at", "started_at",
    "finished_at", "updated_at", "parent_execution_id", "parent_seq", "depth",
    "branch", "parent_index",
)  # fmt: skip
_out_values = attrgetter(*_OUT_FIELDS)


def execution_out(execution: Execution, *, with_steps: bool = False) -> dict[str, Any]:
    out = dict(zip(_OUT_FIELDS, _out_values(execution), strict=True))
    if with_steps:
        out["steps"] = [step_out(s) for s in execution.steps]
    return out


TRIGGER_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Idempotent replay: the execution created earlier with this key.",
          "model": Envelope[ExecutionOut]},
    **error_responses(409, 413, 503),
}  # fmt: skip


@router.post(
    "/api/workflows/{workflowId}/executions",
    status_code=202,
    response_model=Envelope[ExecutionOut],
    summary="Trigger an execution",
    description=(
        "Creates a `queued` execution of the workflow's current version with `input` and puts "
        "it on its region's queue (202). With `Idempotency-Key`, a repeated request returns "
        "the same execution (200, header `Idempotent-Replayed: true`). The execution row is "
        "committed before the job is added, and once it is the trigger has succeeded: if "
        "Redis is unavailable the answer is still 202 (the execution stays `queued` and the "
        "reconciler enqueues it within seconds of Redis being back), so clients that retry "
        "failures never create a second execution. 503 `database_unavailable` only when the "
        "database is down. 409 when the workflow is disabled or the key was used for another "
        "workflow."
    ),
    responses=TRIGGER_RESPONSES,
)
async def trigger_execution(
    ctx: CtxDep,
    auth: TenantDep,
    workflow_id: WorkflowId,
    response: Response,
    body: Annotated[TriggerIn | None, Body()] = None,
    idempotency_key: IdempotencyKey = None,
) -> dict[str, Any]:
    execution, created = await trigger(
        ctx,
        auth.tenant_id,
        workflow_id,
        body.input if body is not None else None,
        idempotency_key=idempotency_key,
        triggered_by="api",
    )
    if not created:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    return {"success": True, "data": execution_out(execution)}


@router.get(
    "/api/executions",
    response_model=Envelope[Page[ExecutionOut]],
    summary="List executions",
    description=(
        "Newest first, cursor-paginated (stable under concurrent inserts). Filter by one or "
        "more `status` values and/or `workflowId`."
    ),
)
async def list_executions(
    ctx: CtxDep,
    auth: TenantDep,
    status: Annotated[list[ExecutionStatus] | None, Query(description="Repeatable.")] = None,
    workflow_id: Annotated[str | None, Query(alias="workflowId", max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> dict[str, Any]:
    page = await ctx.store.executions.list(
        auth.tenant_id, status=status, workflow_id=workflow_id, limit=limit, cursor=cursor
    )
    items = [execution_out(e) for e in page.items]
    return {"success": True, "data": {"items": items, "next_cursor": page.next_cursor}}


@router.get(
    "/api/executions/{executionId}",
    response_model=Envelope[ExecutionOut],
    summary="Get an execution with its step runs",
    description="Status, input, output, error and every step's input/output/error/attempts.",
)
async def get_execution(ctx: CtxDep, auth: TenantDep, execution_id: ExecutionId) -> dict[str, Any]:
    execution = await ctx.store.executions.get(auth.tenant_id, execution_id, with_steps=True)
    return {"success": True, "data": execution_out(execution, with_steps=True)}


@router.post(
    "/api/executions/{executionId}/cancel",
    response_model=Envelope[ExecutionOut],
    summary="Cancel an execution",
    description=(
        "Cancels a queued, running or waiting execution (idempotent). A running one stops at "
        "its next step boundary. 409 if it already succeeded or failed."
    ),
    responses=error_responses(409),
)
async def cancel_execution(
    ctx: CtxDep, auth: TenantDep, execution_id: ExecutionId
) -> dict[str, Any]:
    execution = await ctx.store.executions.cancel(auth.tenant_id, execution_id)
    return {"success": True, "data": execution_out(execution)}


RETRY_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Idempotent replay: the retry created earlier with this key.",
          "model": Envelope[ExecutionOut]},
    **error_responses(409, 503),
}  # fmt: skip


@router.post(
    "/api/executions/{executionId}/retry",
    status_code=202,
    response_model=Envelope[ExecutionOut],
    summary="Retry a failed execution",
    description=(
        "Creates and enqueues a new execution of the same workflow version with the same "
        "input (`retryOf` = the original, `triggeredBy` = `retry`). "
        '`{"from": "start"}` (the default, also without a body) runs every step again; '
        'only failed or cancelled executions (409 otherwise). `{"from": "failed"}` '
        "resumes at the failed step: the step runs before it are copied into the new "
        "execution (`reusedFrom` = the original's id, same `seq`) and are not run again — "
        "later steps see their recorded outputs — and the failed step and what follows run; "
        "only a `failed` execution whose failure was a step's (409 `conflict` otherwise, e.g. "
        "when it failed evaluating the workflow's `output`). With `Idempotency-Key`, a repeated "
        "request returns the same retry (200, header `Idempotent-Replayed: true`); a key used "
        "for anything else is 409. As for a trigger, Redis being unavailable still answers "
        "202: the new execution is stored and the reconciler enqueues it."
    ),
    responses=RETRY_RESPONSES,
)
async def retry_execution(
    ctx: CtxDep,
    auth: TenantDep,
    execution_id: ExecutionId,
    response: Response,
    body: Annotated[RetryIn | None, Body()] = None,
    idempotency_key: IdempotencyKey = None,
) -> dict[str, Any]:
    execution, created = await ctx.store.executions.retry_from(
        auth.tenant_id,
        execution_id,
        start=body.from_ if body is not None else "start",
        idempotency_key=idempotency_key,
    )
    if created:
        await enqueue(ctx, execution, reason="retry")
    else:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    return {"success": True, "data": execution_out(execution)}


EVENT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Idempotent replay: the event stored earlier with this key.",
          "model": Envelope[EventOut]},
    **error_responses(409),
}  # fmt: skip


@router.post(
    "/api/executions/{executionId}/events/{name}",
    status_code=202,
    response_model=Envelope[EventOut],
    summary="Send an event to an execution",
    description=(
        "Stores an event named `name` for the execution, with the request body (any JSON; "
        "at most `STEP_OUTPUT_MAX_BYTES`, 413 above) as its payload, and answers 202. If the "
        "execution is parked on a `wait` step for this name it is resumed (`woken`); "
        "otherwise the event is kept and the first wait step for the name that the execution "
        "runs receives it at once. Each event is received by one wait step, once. 404 for an "
        "execution that is not this tenant's; 409 when it already finished or was cancelled. "
        "With `Idempotency-Key` (per tenant, its own key space), a repeated request answers "
        "the event stored the first time (200, `Idempotent-Replayed: true`), also after the "
        "execution finished; a key used for another event is 409."
    ),
    responses=EVENT_RESPONSES,
    openapi_extra={
        "requestBody": {
            "required": False,
            "description": "The event's payload (any JSON; none: null).",
            "content": {"application/json": {"schema": {}, "example": {"amount": 42}}},
        }
    },
)
async def send_event(
    ctx: CtxDep,
    auth: TenantDep,
    execution_id: ExecutionId,
    name: EventName,
    response: Response,
    payload: Annotated[Any, Body()] = None,
    idempotency_key: IdempotencyKey = None,
) -> dict[str, Any]:
    check_payload(ctx, name, payload)
    now = utcnow()
    sent, execution = await ctx.store.events.send(
        auth.tenant_id, execution_id, name, payload, now, idempotency_key=idempotency_key
    )
    if sent.replayed is not None:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
        now = sent.replayed.received_at
    await wake(ctx, sent, auth.tenant_id, execution.workflow_id)
    data = {"id": sent.event_id, "name": name, "execution_id": execution_id,
            "correlation": None, "received_at": now, "woken": list(sent.woken)}  # fmt: skip
    return {"success": True, "data": data}


@router.get(
    "/api/executions/{executionId}/events",
    response_model=Envelope[list[EventRecordOut]],
    summary="List an execution's events",
    description=(
        "The events sent to the execution (and webhook events it received), oldest first: "
        "`consumedAt`/`consumedSeq` name the wait step run that received each; an event "
        "without them is kept for the next wait step for its name."
    ),
)
async def list_events(ctx: CtxDep, auth: TenantDep, execution_id: ExecutionId) -> dict[str, Any]:
    await ctx.store.executions.get(auth.tenant_id, execution_id)  # 404 unless the tenant's
    events = await ctx.store.events.for_execution(auth.tenant_id, execution_id)
    items = [{name: getattr(e, name) for name in (
        "id", "name", "correlation", "payload", "source", "received_at", "consumed_at",
        "consumed_seq")} for e in events]  # fmt: skip
    return {"success": True, "data": items}
