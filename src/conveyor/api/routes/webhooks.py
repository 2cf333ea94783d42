"""``/api/webhooks/{workflowId}``: inbound webhooks that trigger a workflow.

Each workflow has its own webhook secret (issued on create, rotated with
``POST /api/workflows/{id}/webhook/rotate``), stored only as a SHA-256 digest and compared in
constant time. The caller sends it in the ``X-Webhook-Secret`` header or as the last path
segment (for senders that cannot set headers).

``POST /api/webhooks/{workflowId}/events/{name}?correlation=<value>`` (secret in the header)
sends an event to the workflow's executions parked on a ``wait`` step for ``name`` whose
correlation value is ``<value>``, or keeps it for the first one that waits on it. The request body becomes the execution input:
JSON bodies as parsed JSON, other bodies as ``{"contentType", "body"}`` text.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Path, Query, Request, Response

from conveyor.api.deps import CtxDep
from conveyor.api.errors import ApiError
from conveyor.api.events import check_payload, wake
from conveyor.api.routes.executions import EventName, IdempotencyKey, execution_out
from conveyor.api.schemas import Envelope, EventOut, ExecutionOut, error_responses
from conveyor.api.trigger import trigger
from conveyor.store import utcnow

router = APIRouter(prefix="/api/webhooks", tags=["webhooks"])

WorkflowId = Annotated[
    str, Path(alias="workflowId", min_length=1, max_length=64, description="Workflow id.")
]

ANY_BODY = {
    "requestBody": {
        "required": False,
        "description": "Becomes the execution input (JSON, or any text).",
        "content": {
            "application/json": {"schema": {}, "example": {"event": "order.created", "id": 42}},
            "text/plain": {"schema": {"type": "string"}},
        },
    }
}

RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Idempotent replay (same `Idempotency-Key`).",
          "model": Envelope[ExecutionOut]},
    **error_responses(400, 401, 409, 413, 422, 503),
}  # fmt: skip

DESCRIPTION = (
    "Triggers the workflow with the request body as input (202). Authenticated by the "
    "workflow's webhook secret, compared in constant time; a wrong secret or unknown workflow "
    "answers 401. Supports `Idempotency-Key` and the same enqueue semantics as "
    "`POST /api/workflows/{workflowId}/executions`."
)


def _input_from(body: bytes, content_type: str) -> Any:
    if not body:
        return None
    if not content_type or "json" in content_type:
        try:
            return json.loads(body)
        except (ValueError, RecursionError) as exc:
            raise ApiError(400, "malformed_json", "The request body is not valid JSON.") from exc
    try:
        text = body.decode()
    except UnicodeDecodeError as exc:
        raise ApiError(415, "unsupported_media_type", "Non-JSON bodies must be text.") from exc
    return {"contentType": content_type, "body": text}


async def _fire(
    ctx: CtxDep,
    request: Request,
    response: Response,
    workflow_id: str,
    secret: str | None,
    idempotency_key: str | None,
) -> dict[str, Any]:
    workflow = await ctx.store.workflows.verify_webhook(workflow_id, secret) if secret else None
    if workflow is None:
        raise ApiError(401, "unauthorized", "Invalid webhook secret.")
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    value = _input_from(await request.body(), content_type)
    execution, created = await trigger(
        ctx,
        workflow.tenant_id,
        workflow.id,
        value,
        idempotency_key=idempotency_key,
        triggered_by="webhook",
    )
    if not created:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
    return {"success": True, "data": execution_out(execution)}


@router.post(
    "/{workflowId}",
    status_code=202,
    response_model=Envelope[ExecutionOut],
    summary="Inbound webhook (secret in header)",
    description=DESCRIPTION,
    responses=RESPONSES,
    openapi_extra=ANY_BODY,
)
async def webhook(
    ctx: CtxDep,
    request: Request,
    response: Response,
    workflow_id: WorkflowId,
    secret: Annotated[
        str | None,
        Header(alias="X-Webhook-Secret", max_length=512, description="The webhook secret."),
    ] = None,
    idempotency_key: IdempotencyKey = None,
) -> dict[str, Any]:
    return await _fire(ctx, request, response, workflow_id, secret, idempotency_key)


@router.post(
    "/{workflowId}/{secret}",
    status_code=202,
    response_model=Envelope[ExecutionOut],
    summary="Inbound webhook (secret in the URL)",
    description=DESCRIPTION + " For senders that cannot set headers; URLs end up in logs, so "
    "prefer the header form.",
    responses=RESPONSES,
    openapi_extra=ANY_BODY,
)
async def webhook_with_secret(
    ctx: CtxDep,
    request: Request,
    response: Response,
    workflow_id: WorkflowId,
    secret: Annotated[str, Path(min_length=1, max_length=512)],
    idempotency_key: IdempotencyKey = None,
) -> dict[str, Any]:
    return await _fire(ctx, request, response, workflow_id, secret, idempotency_key)


EVENT_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "Idempotent replay: the event stored earlier with this key.",
          "model": Envelope[EventOut]},
    **error_responses(400, 401, 409, 413, 422, 503),
}  # fmt: skip


@router.post(
    "/{workflowId}/events/{name}",
    status_code=202,
    response_model=Envelope[EventOut],
    summary="Inbound webhook event (for wait steps)",
    description=(
        "Sends an event named `name` with the request body (any JSON, at most "
        "`STEP_OUTPUT_MAX_BYTES`) as its payload to the workflow's executions waiting on a "
        "`wait` step for `name` whose `correlation` expression evaluated to `correlation`: "
        "each of them receives it (`woken`). When none waits yet, the event is kept and the "
        "first execution of the workflow whose wait step for it has that correlation value "
        "receives it at once. Authenticated by the workflow's webhook secret "
        "(`X-Webhook-Secret`); a wrong secret or unknown workflow answers 401. "
        "`Idempotency-Key` as for `POST /api/executions/{executionId}/events/{name}`."
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
async def webhook_event(
    ctx: CtxDep,
    response: Response,
    workflow_id: WorkflowId,
    name: EventName,
    correlation: Annotated[
        str,
        Query(
            min_length=1,
            max_length=512,
            description="Matched against the waiting steps' correlation values.",
        ),
    ],
    payload: Annotated[Any, Body()] = None,
    secret: Annotated[
        str | None,
        Header(alias="X-Webhook-Secret", max_length=512, description="The webhook secret."),
    ] = None,
    idempotency_key: IdempotencyKey = None,
) -> dict[str, Any]:
    workflow = await ctx.store.workflows.verify_webhook(workflow_id, secret) if secret else None
    if workflow is None:
        raise ApiError(401, "unauthorized", "Invalid webhook secret.")
    check_payload(ctx, name, payload)
    now = utcnow()
    sent = await ctx.store.events.send_webhook(
        workflow.tenant_id, workflow.id, name, correlation, payload, now,
        idempotency_key=idempotency_key,
    )  # fmt: skip
    if sent.replayed is not None:
        response.status_code = 200
        response.headers["Idempotent-Replayed"] = "true"
        now = sent.replayed.received_at
    await wake(ctx, sent, workflow.tenant_id, workflow.id)
    data = {"id": sent.event_id, "name": name, "execution_id": None,
            "correlation": correlation, "received_at": now, "woken": list(sent.woken)}  # fmt: skip
    return {"success": True, "data": data}
