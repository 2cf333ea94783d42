"""QUEUE_KEEP_COMPLETED / QUEUE_KEEP_FAILED reach BullMQ (finished jobs beyond them are removed
from Redis), QUEUE_EVENTS_MAX_LEN caps the events stream, and what one kept job costs in Redis
(``MEMORY USAGE``)."""

from __future__ import annotations

import json
from typing import Any

from conveyor.queue import JobContext, QueueFactory
from conveyor.queue.payloads import DEFAULT_JOB_OPTIONS, WorkflowExecute, payload_spec
from conveyor.settings import load_settings
from tests.queue.conftest import eventually, make_settings, running

QUEUE = "workflow.execute.us"
KEPT_JOB_MAX_BYTES = 2048
"""A finished execution job in Redis (hash of data, options, return value, timestamps) weighs
about 1 KB (docs/operations.md#capacity-and-retention); far more means the payload grew."""


def _payload(i: int) -> WorkflowExecute:
    return WorkflowExecute(
        execution_id=f"exec-{i:04d}", tenant_id="t1", workflow_id="wf1", region="us",
        workflow_version=1, reason="trigger",
    )  # fmt: skip


async def test_keep_settings_reach_bullmq_and_remove_finished_jobs(
    redis_prefix: str, redis_client: Any
) -> None:
    settings = make_settings(
        redis_prefix,
        QUEUE_KEEP_COMPLETED="2,1h",
        QUEUE_KEEP_FAILED="1,2h",
        QUEUE_EVENTS_MAX_LEN="100",
    )
    base = f"{redis_prefix}:{QUEUE}"
    async with QueueFactory(settings) as qf:
        queue = qf.create_queue(QUEUE)
        for i in range(5):
            await queue.add(_payload(i))
        opts = json.loads(await redis_client.hget(f"{base}:exec-0000", "opts"))
        assert opts["removeOnComplete"] == {"age": 3600, "count": 2}
        assert opts["removeOnFail"] == {"age": 7200, "count": 1}
        assert await redis_client.hget(f"{base}:meta", "opts.maxLenEvents") == "100"
        # Jobs a producer added without removeOn* (e.g. a Node producer) are bounded too.
        bull: Any = getattr(queue, "bullmq_queue")  # noqa: B009 - the bullmq driver's handle
        for i in range(3):
            await bull.add("workflow.execute", {"not": "a payload"},
                                         {"jobId": f"bad-{i}", "removeOnComplete": None,
                                          "removeOnFail": None})  # fmt: skip

        async def process(payload: WorkflowExecute, ctx: JobContext) -> None:
            return None

        async with running(qf.create_worker(QUEUE, process)):
            await eventually(
                lambda: _counts(queue), within=10
            )  # every job finished: 5 completed (2 kept), 3 failed (1 kept)

    assert await redis_client.zcard(f"{base}:completed") == 2
    assert await redis_client.zcard(f"{base}:failed") == 1
    kept = set(await redis_client.zrange(f"{base}:completed", 0, -1))
    assert kept == {"exec-0003", "exec-0004"}
    for gone in ("exec-0000", "exec-0001", "exec-0002", "bad-0", "bad-1"):
        assert await redis_client.exists(f"{base}:{gone}") == 0, gone
    assert await redis_client.exists(f"{base}:bad-2") == 1
    size = await redis_client.memory_usage(f"{base}:exec-0004")
    assert 0 < size <= KEPT_JOB_MAX_BYTES, size


async def _counts(queue: Any) -> bool:
    counts = await queue.get_job_counts("completed", "failed", "waiting", "active")
    return bool(counts["waiting"] == 0 and counts["active"] == 0 and counts["failed"] >= 1)


def test_defaults_are_the_documented_ones() -> None:
    settings = load_settings({})
    opts = payload_spec(QUEUE).options_for(settings)
    assert opts["removeOnComplete"] == {"age": 24 * 3600, "count": 1000}
    assert opts["removeOnFail"] == {"age": 7 * 24 * 3600, "count": 10000}
    assert opts["removeOnComplete"] == DEFAULT_JOB_OPTIONS["removeOnComplete"]
    assert opts["removeOnFail"] == DEFAULT_JOB_OPTIONS["removeOnFail"]
    assert settings.queue_events_max_len == 10000
    assert str(settings.queue_keep_failed) == "10000,7d"
