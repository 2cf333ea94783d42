"""What one kept (completed or failed) job and one events-stream entry cost in Redis.

Runs N ``workflow.execute`` jobs (default 2,000; half complete, half fail) through a Conveyor
worker with QUEUE_KEEP_* large enough to keep them all, then measures with ``MEMORY USAGE``:
every kept job's hash, the ``completed``/``failed`` sorted sets and the ``events`` stream, and
Redis ``used_memory`` before and after. Uses a unique key prefix whose keys are deleted after.

    .venv/bin/python bench/queue_memory.py [--jobs 2000]

The last line printed is one JSON object: ``bytes_per_completed_job``, ``bytes_per_failed_job``
(job hash plus its sorted-set entry), ``bytes_per_event``, ``used_memory_per_job``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import uuid
from typing import Any

import redis.asyncio as aioredis
from bullmq.custom_errors import UnrecoverableError

from conveyor.queue import JobContext, QueueFactory, WorkflowExecute
from conveyor.settings import load_settings

QUEUE = "workflow.execute.bench"


async def _keys_bytes(client: aioredis.Redis, keys: list[str]) -> int:
    pipe = client.pipeline(transaction=False)
    for key in keys:
        pipe.memory_usage(key, samples=0)
    return sum(int(v or 0) for v in await pipe.execute())


async def main(jobs: int) -> dict[str, Any]:
    prefix = f"qmem{uuid.uuid4().hex[:8]}"
    host = os.environ.get("QUEUE_REDIS_HOST", "127.0.0.1")
    port = int(os.environ.get("QUEUE_REDIS_PORT", "6379"))
    settings = load_settings({"QUEUE_REDIS_HOST": host, "QUEUE_REDIS_PORT": str(port),
        "QUEUE_PREFIX": prefix, "QUEUE_KEEP_COMPLETED": f"{jobs},1d",
        "QUEUE_KEEP_FAILED": f"{jobs},1d", "QUEUE_EVENTS_MAX_LEN": str(jobs * 20),
        "EXECUTION_WORKER_CONCURRENCY": "20"})  # fmt: skip
    client = aioredis.Redis(host=host, port=port, decode_responses=True)
    base = f"{prefix}:{QUEUE}"
    try:
        before = int((await client.info("memory"))["used_memory"])
        async with QueueFactory(settings) as qf:
            queue = qf.create_queue(QUEUE)
            for i in range(jobs):
                await queue.add(WorkflowExecute(
                    execution_id=f"{uuid.uuid4().hex}", tenant_id=uuid.uuid4().hex,
                    workflow_id=uuid.uuid4().hex, region="bench", workflow_version=1,
                    reason="trigger" if i % 2 else "schedule"))  # fmt: skip
            done = asyncio.Event()
            seen = 0

            async def process(payload: WorkflowExecute, ctx: JobContext) -> dict[str, Any]:
                nonlocal seen
                seen += 1
                if seen >= jobs:
                    done.set()
                if seen % 2:
                    raise UnrecoverableError("step failed: the API answered 404")
                return {"status": "succeeded"}

            worker = qf.create_worker(QUEUE, process, concurrency=20)
            task = asyncio.create_task(worker.run())
            await asyncio.wait_for(done.wait(), 120)
            for _ in range(200):
                counts = await queue.get_job_counts("waiting", "active", "delayed")
                if not any(counts.values()):
                    break
                await asyncio.sleep(0.05)
            await worker.close(timeout_s=5)
            await asyncio.wait_for(task, 10)
        completed = list(await client.zrange(f"{base}:completed", 0, -1))
        failed = list(await client.zrange(f"{base}:failed", 0, -1))
        job_c = await _keys_bytes(client, [f"{base}:{j}" for j in completed])
        job_f = await _keys_bytes(client, [f"{base}:{j}" for j in failed])
        zset_c = await _keys_bytes(client, [f"{base}:completed"])
        zset_f = await _keys_bytes(client, [f"{base}:failed"])
        events = await _keys_bytes(client, [f"{base}:events"])
        n_events = int(await client.xlen(f"{base}:events"))
        after = int((await client.info("memory"))["used_memory"])
        return {
            "jobs": jobs,
            "completed": len(completed),
            "failed": len(failed),
            "bytes_per_completed_job": round((job_c + zset_c) / max(1, len(completed))),
            "bytes_per_failed_job": round((job_f + zset_f) / max(1, len(failed))),
            "events": n_events,
            "bytes_per_event": round(events / max(1, n_events)),
            "used_memory_per_job": round((after - before) / jobs),
        }
    finally:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
        for i in range(0, len(keys), 500):
            await client.delete(*keys[i : i + 500])
        await client.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    print(json.dumps(asyncio.run(main(parser.parse_args().jobs))))
