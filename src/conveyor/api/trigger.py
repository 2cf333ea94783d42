"""Triggering executions without losing work.

1. The execution row is committed (status ``queued``) before anything touches Redis, so a
   worker never receives a job whose execution is not visible yet.
2. The job is added through :class:`~conveyor.dispatch.ExecutionDispatcher` with job id =
   execution id: adding it twice is harmless. Concurrent requests share the Redis round trips
   (:class:`~conveyor.dispatch.EnqueueBatcher`); each still answers only once its own job
   was added.
3. The database is the source of truth: once the row is committed the trigger **has
   succeeded**. If Redis is unavailable the enqueue gives up within :data:`ENQUEUE_TIMEOUT_S`
   and the request still answers 202 with the execution (``queued``): the scheduler's
   reconciler enqueues it within seconds of Redis being back. (Answering 503 would make clients
   that retry 5xx — most HTTP libraries — create a second execution.) Replaying the request with
   the same ``Idempotency-Key`` returns the same execution and tries the enqueue again
   (harmless). Only a database failure answers 503.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.exceptions import RedisClusterException, RedisError

from conveyor import tracing
from conveyor.api.context import ApiContext
from conveyor.dispatch import payload_for
from conveyor.errors import QueueError
from conveyor.logs import EXECUTION_ID
from conveyor.store import Execution

log = logging.getLogger(__name__)

ENQUEUE_TIMEOUT_S = 3.0
"""Longest an enqueue may take before the request answers 503 (the row stays ``queued``)."""


async def enqueue(ctx: ApiContext, execution: Execution, *, reason: str) -> bool:
    """Put ``execution`` on its region's queue; False when Redis is unavailable (the stored,
    ``queued`` execution is then enqueued by the reconciler once Redis is back)."""
    payload = payload_for(execution, reason=reason)
    try:
        async with asyncio.timeout(ENQUEUE_TIMEOUT_S):
            await ctx.dispatcher.enqueue(payload)
    except (QueueError, RedisError, RedisClusterException, OSError, TimeoutError) as exc:
        log.warning(
            "api.enqueue_deferred",
            extra={"executionId": execution.id, "error": repr(exc)[:300]},
        )
        return False
    return True


async def trigger(
    ctx: ApiContext,
    tenant_id: str,
    workflow_id: str,
    input: Any,
    *,
    idempotency_key: str | None,
    triggered_by: str,
) -> tuple[Execution, bool]:
    """Create (or find, by idempotency key) an execution and enqueue it.

    Returns ``(execution, created)``. An idempotent replay of a still-``queued`` execution is
    enqueued again (a no-op when its job exists), which repairs an earlier failed enqueue.

    With tracing on, a ``trigger`` span covers both (its enqueue span is its child, and the
    job carries the trace to the worker); log lines of the enqueue carry the execution id.
    """
    if tracing.enabled:
        attributes = {
            "conveyor.tenant_id": tenant_id,
            "conveyor.workflow_id": workflow_id,
            "conveyor.triggered_by": triggered_by,
        }
        with tracing.start_span("trigger", attributes):
            execution, created = await _trigger(
                ctx, tenant_id, workflow_id, input, idempotency_key, triggered_by
            )
            tracing.set_attributes(
                {"conveyor.execution_id": execution.id, "conveyor.created": created}
            )
            return execution, created
    return await _trigger(ctx, tenant_id, workflow_id, input, idempotency_key, triggered_by)


async def _trigger(
    ctx: ApiContext,
    tenant_id: str,
    workflow_id: str,
    input: Any,
    idempotency_key: str | None,
    triggered_by: str,
) -> tuple[Execution, bool]:
    execution, created = await ctx.store.executions.create(
        tenant_id,
        workflow_id,
        input,
        idempotency_key=idempotency_key,
        triggered_by=triggered_by,
    )
    if execution.status == "queued":
        token = EXECUTION_ID.set(execution.id)
        try:
            await enqueue(ctx, execution, reason=triggered_by)
        finally:
            EXECUTION_ID.reset(token)
    return execution, created
