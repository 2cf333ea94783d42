"""``/api/workflows``: create, read, list, version, enable/disable and delete workflows."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path, Query, Response

from conveyor.api.context import ApiContext
from conveyor.api.deps import CtxDep, TenantDep
from conveyor.api.schemas import (
    Envelope,
    Page,
    WebhookSecretOut,
    WorkflowOut,
    WorkflowPatch,
    WorkflowVersionOut,
    error_responses,
)
from conveyor.errors import NotFound, WorkflowInvalid
from conveyor.store import Workflow
from conveyor.workflows import WorkflowStep, parse_definition

router = APIRouter(
    prefix="/api/workflows",
    tags=["workflows"],
    responses=error_responses(400, 401, 404, 413, 422, 503),
)

WorkflowId = Annotated[
    str, Path(alias="workflowId", min_length=1, max_length=64, description="Workflow id.")
]
Limit = Annotated[int, Query(ge=1, le=200, description="Page size (max 200).")]
Cursor = Annotated[
    str | None, Query(max_length=512, description="`nextCursor` of the previous page.")
]
Definition = Annotated[
    dict[str, Any],
    Body(description="The workflow definition (JSON Schema: `WorkflowDefinition`)."),
]

DEFINITION_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/WorkflowDefinition"}}
        },
    }
}
"""``openapi_extra`` documenting the body with the definition's own JSON Schema."""

CREATE_EXAMPLES: dict[str, dict[str, Any]] = {
    "http-transform-condition": {
        "summary": "Call an API, reshape the answer, branch",
        "description": "Fetch an order, summarise it and notify fulfilment of large orders "
        "(docs/workflows.md, A first workflow).",
        "value": {
            "name": "order-sync",
            "description": "Fetch an order, summarise it, notify fulfilment of large orders.",
            "input_schema": {
                "type": "object",
                "required": ["orderId"],
                "properties": {"orderId": {"type": "integer"}},
            },
            "steps": [
                {
                    "id": "fetch",
                    "type": "http",
                    "url": "https://api.example.test/orders/{{ input.orderId }}",
                    "timeout_s": 10,
                    "retry": {"attempts": 3, "backoff": "exponential", "delay_s": 1},
                    "select": "body",
                },
                {
                    "id": "summary",
                    "type": "transform",
                    "expression": "{orderId: steps.fetch.id, total: steps.fetch.total, "
                    "email: steps.fetch.customer.email}",
                },
                {
                    "id": "large",
                    "type": "condition",
                    "expression": "steps.summary.total >= `100`",
                    "then": "continue",
                    "else": "end",
                },
                {
                    "id": "notify",
                    "type": "http",
                    "method": "POST",
                    "url": "https://api.example.test/hooks/fulfilment",
                    "headers": {"Idempotency-Key": "order-{{ steps.summary.orderId }}"},
                    "body": {
                        "text": "Large order {{ steps.summary.orderId }}",
                        "order": "{{ steps.summary }}",
                    },
                    "select": "body",
                },
            ],
        },
    },
    "delay": {
        "summary": "Wait three days on a durable timer",
        "description": "A welcome mail now, a reminder three days later "
        "(docs/workflows.md, delay).",
        "value": {
            "name": "trial-reminder",
            "input_schema": {
                "type": "object",
                "required": ["email"],
                "properties": {"email": {"type": "string"}},
            },
            "steps": [
                {
                    "id": "welcome",
                    "type": "http",
                    "method": "POST",
                    "url": "https://api.example.test/hooks/email",
                    "body": {"to": "{{ input.email }}", "template": "welcome"},
                    "select": "status",
                },
                {"id": "wait", "type": "delay", "seconds": 259200},
                {
                    "id": "reminder",
                    "type": "http",
                    "method": "POST",
                    "url": "https://api.example.test/hooks/email",
                    "body": {"to": "{{ input.email }}", "template": "trial-ending"},
                    "select": "body.body",
                },
            ],
        },
    },
    "wait": {
        "summary": "Wait for an event, with a timeout",
        "description": "Pause until POST /api/executions/{id}/events/expense.decided arrives, "
        "at most two days (docs/workflows.md, wait).",
        "value": {
            "name": "expense-approval",
            "steps": [
                {
                    "id": "request",
                    "type": "transform",
                    "expression": "{amount: input.amount, employee: input.employee}",
                },
                {
                    "id": "decision",
                    "type": "wait",
                    "event": "expense.decided",
                    "timeout_s": 172800,
                    "on_timeout": "continue",
                },
            ],
            "output": "{amount: steps.request.amount, approved: steps.decision.payload.approved "
            "|| `false`, by: steps.decision.payload.by, timedOut: steps.decision.timedOut || "
            "`false`}",
        },
    },
    "webhook": {
        "summary": "Handle a webhook event",
        "description": "Triggered by POST /api/webhooks/{workflowId}: the event is the input; "
        "a guard lets only successful payments through (docs/workflows.md, A webhook flow).",
        "value": {
            "name": "payment-webhook",
            "description": "Confirm paid orders when the payment provider calls the webhook.",
            "steps": [
                {
                    "id": "paid",
                    "type": "condition",
                    "expression": "input.type == 'payment.succeeded' && input.data.amount > `0`",
                },
                {
                    "id": "order",
                    "type": "http",
                    "url": "https://api.example.test/orders/{{ input.data.orderId }}",
                    "retry": {
                        "attempts": 5,
                        "backoff": "exponential",
                        "delay_s": 2,
                        "max_delay_s": 60,
                    },
                    "select": "body",
                },
                {
                    "id": "confirm",
                    "type": "http",
                    "method": "POST",
                    "url": "https://api.example.test/hooks/fulfilment",
                    "headers": {"Idempotency-Key": "{{ input.id }}"},
                    "body": {
                        "orderId": "{{ steps.order.id }}",
                        "email": "{{ steps.order.customer.email }}",
                        "amount": "{{ input.data.amount }}",
                    },
                    "select": "{status: status, confirmed: body.body}",
                },
            ],
        },
    },
}
"""Request examples of ``POST /api/workflows`` (OpenAPI Example Objects). Each is a runnable
example of docs/workflows.md: ``tests/docs/test_workflow_docs.py`` validates and runs them."""

CREATE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"$ref": "#/components/schemas/WorkflowDefinition"},
                "examples": CREATE_EXAMPLES,
            }
        },
    }
}
"""``openapi_extra`` of ``POST /api/workflows``: :data:`DEFINITION_BODY` with examples."""


def webhook_url(workflow_id: str) -> str:
    return f"/api/webhooks/{workflow_id}"


def workflow_out(workflow: Workflow) -> dict[str, Any]:
    return {
        "id": workflow.id,
        "name": workflow.name,
        "region": workflow.region,
        "version": workflow.current_version,
        "enabled": workflow.enabled,
        "created_at": workflow.created_at,
        "updated_at": workflow.updated_at,
        "definition": workflow.definition,
        "webhook": {"url": webhook_url(workflow.id), "has_secret": workflow.has_webhook_secret},
        "webhook_secret": workflow.webhook_secret,
    }


@router.post(
    "",
    status_code=201,
    response_model=Envelope[WorkflowOut],
    response_model_exclude_none=True,
    summary="Create a workflow",
    description=(
        "Validates the definition (errors name the step id and field) and stores it as "
        "version 1. The answer includes the workflow's webhook secret, shown only once."
    ),
    openapi_extra=CREATE_BODY,
)
async def create_workflow(ctx: CtxDep, auth: TenantDep, body: Definition) -> dict[str, Any]:
    await _check_subworkflows(ctx, auth.tenant_id, body)
    workflow = await ctx.store.workflows.create(auth.tenant_id, body)
    return {"success": True, "data": workflow_out(workflow)}


@router.get(
    "",
    response_model=Envelope[Page[WorkflowOut]],
    response_model_exclude_none=True,
    summary="List workflows",
    description="Newest first, cursor-paginated; definitions are omitted.",
)
async def list_workflows(
    ctx: CtxDep,
    auth: TenantDep,
    limit: Limit = 50,
    cursor: Cursor = None,
    enabled: Annotated[bool | None, Query(description="Only enabled/disabled ones.")] = None,
) -> dict[str, Any]:
    page = await ctx.store.workflows.list(
        auth.tenant_id, limit=limit, cursor=cursor, enabled=enabled
    )
    items = [workflow_out(w) for w in page.items]
    return {"success": True, "data": {"items": items, "next_cursor": page.next_cursor}}


@router.get(
    "/{workflowId}",
    response_model=Envelope[WorkflowOut],
    response_model_exclude_none=True,
    summary="Get a workflow",
    description="The workflow with its current definition.",
)
async def get_workflow(ctx: CtxDep, auth: TenantDep, workflow_id: WorkflowId) -> dict[str, Any]:
    workflow = await ctx.store.workflows.get(auth.tenant_id, workflow_id)
    return {"success": True, "data": workflow_out(workflow)}


@router.put(
    "/{workflowId}",
    response_model=Envelope[WorkflowOut],
    response_model_exclude_none=True,
    summary="Update a workflow (new version)",
    description=(
        "Stores the definition as the next version and makes it current. Executions already "
        "triggered keep running the version they were triggered with."
    ),
    openapi_extra=DEFINITION_BODY,
)
async def update_workflow(
    ctx: CtxDep, auth: TenantDep, workflow_id: WorkflowId, body: Definition
) -> dict[str, Any]:
    await _check_subworkflows(ctx, auth.tenant_id, body)
    workflow = await ctx.store.workflows.update(auth.tenant_id, workflow_id, body)
    return {"success": True, "data": workflow_out(workflow)}


@router.patch(
    "/{workflowId}",
    response_model=Envelope[WorkflowOut],
    response_model_exclude_none=True,
    summary="Enable or disable a workflow",
    description="A disabled workflow cannot be triggered (409) and its schedules skip.",
)
async def patch_workflow(
    ctx: CtxDep, auth: TenantDep, workflow_id: WorkflowId, body: WorkflowPatch
) -> dict[str, Any]:
    workflow = await ctx.store.workflows.set_enabled(auth.tenant_id, workflow_id, body.enabled)
    return {"success": True, "data": workflow_out(workflow)}


@router.delete(
    "/{workflowId}",
    status_code=204,
    response_class=Response,
    summary="Delete a workflow",
    description=(
        "Soft delete: the workflow disappears from reads, cannot be triggered, its schedules "
        "are disabled; its executions stay readable."
    ),
)
async def delete_workflow(ctx: CtxDep, auth: TenantDep, workflow_id: WorkflowId) -> Response:
    await ctx.store.workflows.delete(auth.tenant_id, workflow_id)
    return Response(status_code=204)


@router.get(
    "/{workflowId}/versions/{version}",
    response_model=Envelope[WorkflowVersionOut],
    summary="Get one version of a workflow",
)
async def get_version(
    ctx: CtxDep,
    auth: TenantDep,
    workflow_id: WorkflowId,
    version: Annotated[int, Path(ge=1, le=2**31 - 1)],
) -> dict[str, Any]:
    found = await ctx.store.workflows.get_version(auth.tenant_id, workflow_id, version)
    data = {
        "workflow_id": found.workflow_id,
        "version": found.version,
        "definition": found.definition,
        "created_at": found.created_at,
    }
    return {"success": True, "data": data}


@router.post(
    "/{workflowId}/webhook/rotate",
    response_model=Envelope[WebhookSecretOut],
    summary="Rotate the webhook secret",
    description="Issues a new webhook secret (shown only in this answer); the old one stops "
    "working at once.",
)
async def rotate_webhook(ctx: CtxDep, auth: TenantDep, workflow_id: WorkflowId) -> dict[str, Any]:
    secret = await ctx.store.workflows.rotate_webhook_secret(auth.tenant_id, workflow_id)
    data = {"url": webhook_url(workflow_id), "has_secret": True, "secret": secret}
    return {"success": True, "data": data}


async def _check_subworkflows(ctx: ApiContext, tenant_id: str, body: dict[str, Any]) -> None:
    """The workflows (and pinned versions) ``workflow`` steps call must be the tenant's: 422
    naming the step otherwise. (One deleted later fails its step when it runs.)"""
    definition = parse_definition(body)  # an invalid one: the same 422 as the store's
    problems: list[dict[str, Any]] = []
    for index, step in definition.all_steps():
        if not isinstance(step, WorkflowStep):
            continue
        try:
            if step.version == "latest":
                await ctx.store.workflows.get(tenant_id, step.workflow)
            else:
                await ctx.store.workflows.get_version(tenant_id, step.workflow, step.version)
        except NotFound:
            what = "workflow" if step.version == "latest" else f"version {step.version} of workflow"
            message = f"{what} {step.workflow!r} is not one of this tenant's"
            problems.append({"step": step.id, "index": index, "field": "workflow",
                             "message": message})  # fmt: skip
    if problems:
        first = problems[0]
        error = WorkflowInvalid(
            f"invalid workflow: step {first['step']!r} field 'workflow': {first['message']}"
        )
        error.details = problems
        raise error
