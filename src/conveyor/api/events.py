"""Delivering events to ``wait`` steps from the API (see :mod:`conveyor.store.events`).

The event is committed first; executions it made due are then enqueued with job id
``event:<event id>:<execution id>`` (an execution's own job id is taken by the job that parked it). If Redis
is unavailable the answer is still 202: the execution's ``wake_at`` has passed, so the
reconciler enqueues it within seconds of Redis being back.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.exceptions import RedisError

from conveyor.api.context import ApiContext
from conveyor.api.errors import ApiError
from conveyor.errors import QueueError
from conveyor.queue.payloads import WorkflowExecute
from conveyor.store import Sent, dumps, has_nul
from conveyor.workflows.step_models import RESERVED_EVENT_PREFIX

log = logging.getLogger(__name__)

ENQUEUE_TIMEOUT_S = 3.0
_LONGEST_INSTANT = "2026-12-06T20:00:00.000000Z"
"""As long as any ``receivedAt`` of a wait step's output."""


def check_payload(ctx: ApiContext, name: str, payload: Any) -> None:
    """An event's payload becomes a wait step's output (``{"event", "payload",
    "receivedAt"}``): that must fit ``STEP_OUTPUT_MAX_BYTES`` (413) and be storable (400).
    Names starting with ``conveyor.`` are Conveyor's own (a sub-workflow's end): 400."""
    if name.startswith(RESERVED_EVENT_PREFIX):
        raise ApiError(
            400,
            "invalid_value",
            f"Event names starting with {RESERVED_EVENT_PREFIX!r} are reserved for Conveyor.",
        )
    output = {"event": name, "payload": payload, "receivedAt": _LONGEST_INSTANT}
    try:
        text = dumps(output)
    except (TypeError, ValueError, RecursionError):
        raise ApiError(400, "malformed_json", "The event payload is not valid JSON.") from None
    limit = ctx.settings.step_output_max_bytes
    size = len(text.encode())
    if size > limit:
        raise ApiError(
            413,
            "payload_too_large",
            f"The event would make a wait step's output of {size:,} bytes; the limit is "
            f"{limit:,} (STEP_OUTPUT_MAX_BYTES).",
            {"sizeBytes": size, "limitBytes": limit},
        )
    if has_nul(text):
        raise ApiError(
            400, "invalid_value", "The event payload contains a NUL character (\\u0000)."
        )


async def wake(ctx: ApiContext, sent: Sent, tenant_id: str, workflow_id: str) -> None:
    """Enqueue the executions ``sent`` made due (best effort: the reconciler backs it up)."""
    for execution_id, region in zip(sent.woken, sent.regions, strict=True):
        payload = WorkflowExecute(
            execution_id=execution_id,
            tenant_id=tenant_id,
            workflow_id=workflow_id,
            region=region,
            reason="event",
        )
        try:
            async with asyncio.timeout(ENQUEUE_TIMEOUT_S):
                await ctx.dispatcher.enqueue(
                    payload, job_id=f"event:{sent.event_id}:{execution_id}"
                )
        except (QueueError, RedisError, OSError, TimeoutError) as exc:
            log.warning(
                "api.event_enqueue_deferred",
                extra={"executionId": execution_id, "error": repr(exc)[:300]},
            )
