"""Conveyor's queues are plain BullMQ queues: Node.js BullMQ (npm ``bullmq``) reads and writes them."""

from __future__ import annotations

import json
from typing import Any

import pytest

from conveyor.queue import (
    JobContext,
    QueueFactory,
    WorkflowExecute,
    bull_name,
    execution_queue_name,
)
from tests.conftest import REDIS_PORT
from tests.interop.node import node_binary, run_node
from tests.queue.conftest import eventually, make_settings, running

QUEUE = execution_queue_name("us")


@pytest.fixture(scope="module")
def node() -> str:
    return node_binary()


async def test_node_producer_to_conveyor_worker_and_node_reads_counts(
    node: str, redis_prefix: str
) -> None:
    data = {
        "executionId": "exec-node-1",
        "tenantId": "tenant-a",
        "workflowId": "wf-a",
        "region": "us",
        "workflowVersion": 2,
        "enqueuedAt": 1_700_000_000_000,
        "somethingNewer": {"ignored": True},
    }
    added = await run_node(
        node,
        "producer.mjs",
        str(REDIS_PORT),
        redis_prefix,
        QUEUE,
        "workflow.execute",
        "exec-node-1",
        json.dumps(data),
    )
    assert added == {"id": "exec-node-1"}
    received: list[tuple[WorkflowExecute, JobContext]] = []

    async def process(payload: WorkflowExecute, ctx: JobContext) -> dict[str, str]:
        received.append((payload, ctx))
        return {"status": "succeeded"}

    async with QueueFactory(make_settings(redis_prefix)) as qf:
        queue = qf.create_queue(QUEUE)
        async with running(qf.create_worker(QUEUE, process)):
            await eventually(lambda: received, within=10)
            await eventually(lambda: _completed(queue), within=5)
    payload, ctx = received[0]
    assert isinstance(payload, WorkflowExecute)
    assert (payload.execution_id, payload.tenant_id, payload.workflow_id, payload.region) == (
        "exec-node-1",
        "tenant-a",
        "wf-a",
        "us",
    )
    assert payload.workflow_version == 2 and payload.reason is None
    assert (ctx.id, ctx.name, ctx.queue_name) == ("exec-node-1", "workflow.execute", QUEUE)

    seen = await run_node(node, "counts.mjs", str(REDIS_PORT), redis_prefix, QUEUE)
    assert seen["counts"] == {"waiting": 0, "active": 0, "delayed": 0, "completed": 1, "failed": 0}
    assert seen["completed"] == [{"id": "exec-node-1", "returnvalue": {"status": "succeeded"}}]


async def _completed(queue: Any) -> bool:
    return bool((await queue.get_job_counts("completed"))["completed"] == 1)


async def test_node_worker_reads_a_conveyor_job(node: str, redis_prefix: str) -> None:
    async with QueueFactory(make_settings(redis_prefix)) as qf:
        job_id = await qf.create_queue(QUEUE).add(
            WorkflowExecute(execution_id="exec-py-1", tenant_id="t", workflow_id="w", region="us")
        )
    assert job_id == "exec-py-1"
    job = await run_node(node, "consumer.mjs", str(REDIS_PORT), redis_prefix, QUEUE)
    assert job["id"] == "exec-py-1" and job["name"] == "workflow.execute" and job["attempts"] == 5
    assert job["data"] == {
        "executionId": "exec-py-1",
        "tenantId": "t",
        "workflowId": "w",
        "region": "us",
        "workflowVersion": None,
        "enqueuedAt": None,
        "reason": None,
    }


@pytest.mark.slow
async def test_node_bullmq_reads_and_writes_conveyor_queues_on_a_redis_cluster(
    node: str, redis_prefix: str
) -> None:
    """On Redis Cluster Node BullMQ uses the queue's hash-tagged name (``{<queue>}``) with an
    ioredis ``Cluster`` connection and the same prefix."""
    from tests.redis_cluster._cluster import redis_cluster

    with redis_cluster() as cluster:
        settings = make_settings(redis_prefix, **cluster.env())
        tagged = bull_name(QUEUE, True)
        assert tagged == "{" + QUEUE + "}"
        async with QueueFactory(settings) as qf:
            job_id = await qf.create_queue(QUEUE).add(
                WorkflowExecute(execution_id="exec-py-c", tenant_id="t", workflow_id="w",
                                region="us")
            )  # fmt: skip
            job = await run_node(node, "cluster.mjs", cluster.setting, redis_prefix, tagged,
                                 "consume")  # fmt: skip
            assert job["id"] == job_id == "exec-py-c" and job["name"] == "workflow.execute"
            assert job["data"]["executionId"] == "exec-py-c" and job["attempts"] == 5

            data = {"executionId": "exec-node-c", "tenantId": "t", "workflowId": "w",
                    "region": "us"}  # fmt: skip
            added = await run_node(node, "cluster.mjs", cluster.setting, redis_prefix, tagged,
                                   "produce", "workflow.execute", "exec-node-c", json.dumps(data))  # fmt: skip
            assert added == {"id": "exec-node-c"}
            received: list[str] = []

            async def process(payload: WorkflowExecute, ctx: JobContext) -> dict[str, str]:
                received.append(payload.execution_id)
                return {"status": "succeeded"}

            queue = qf.create_queue(QUEUE)
            async with running(qf.create_worker(QUEUE, process)):
                await eventually(lambda: received == ["exec-node-c"], within=10)
                await eventually(lambda: _completed_n(queue, 2), within=5)
            seen = await run_node(node, "cluster.mjs", cluster.setting, redis_prefix, tagged,
                                  "counts")  # fmt: skip
        assert seen["counts"] == {"waiting": 0, "active": 0, "delayed": 0, "completed": 2,
                                  "failed": 0}  # fmt: skip
        assert {"id": "exec-node-c", "returnvalue": {"status": "succeeded"}} in seen["completed"]


async def _completed_n(queue: Any, n: int) -> bool:
    return bool((await queue.get_job_counts("completed"))["completed"] == n)
