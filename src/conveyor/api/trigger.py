"""Triggering executions without losing work.

1. The execution row is committed (status ``queued``) before anything touches Redis, so a
   worker never receives a job whose execution is not visible yet.
2. The job is added through :class:`~conveyor.dispatch.ExecutionDispatcher` with job id =
   execution id: adding it twice is harmless. Concurrent requests share the Redis round trips
   (:class:`~conveyor.dispatch.EnqueueBatcher`); each still answers only once its own job
   was added.
3. If Redis is unavailable the enqueue fails within :data:`ENQUEUE_TIMEOUT_S` and the request
   answers **503** ``queue_unavailable`` with the execution id in ``details``. The execution is
   *not* rolled back: it stays ``queued`` and the scheduler's reconciler enqueues it once Redis
   is back. Retrying the request with the same ``Idempotency-Key`` returns the same execution
   and enqueues it again (harmless) instead of creating a second one.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis.exceptions import RedisError

from conveyor.api.context import ApiContext
from conveyor.api.errors import ApiError
from conveyor.dispatch import payload_for
from conveyor.errors import QueueError
from conveyor.store import Execution

log = logging.getLogger(__name__)

ENQUEUE_TIMEOUT_S = 3.0
"""Longest an enqueue may take before the request answers 503 (the row stays ``queued``)."""


async def enqueue(ctx: ApiContext, execution: Execution, *, reason: str) -> None:
    """Put ``execution`` on its region's queue or raise a 503 :class:`ApiError`."""
    payload = payload_for(execution, reason=reason)
    try:
        async with asyncio.timeout(ENQUEUE_TIMEOUT_S):
            await ctx.dispatcher.enqueue(payload)
    except (QueueError, RedisError, OSError, TimeoutError) as exc:
        log.warning(
            "api.enqueue_failed",
            extra={"executionId": execution.id, "error": repr(exc)[:300]},
        )
        raise ApiError(
            503,
            "queue_unavailable",
            "The execution is stored but the queue is unavailable; it stays queued and will "
            "be enqueued automatically when the queue is back.",
            {"executionId": execution.id, "status": execution.status},
            headers={"Retry-After": "5"},
        ) from exc


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
    """
    execution, created = await ctx.store.executions.create(
        tenant_id,
        workflow_id,
        input,
        idempotency_key=idempotency_key,
        triggered_by=triggered_by,
    )
    if execution.status == "queued":
        await enqueue(ctx, execution, reason=triggered_by)
    return execution, created
