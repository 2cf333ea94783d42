"""How much does ``conveyor.queue`` cost on top of raw ``bullmq``?

Pushes N no-op ``workflow.execute`` jobs (default 20,000) through a raw ``bullmq.Worker``
and through a Conveyor worker (typed payload validation, JobContext, telemetry attached:
QueueEvents consumer + metrics timer), against the same Redis, at the same concurrency,
with the same job options, in the same process and run. Jobs are enqueued first; the clock
runs from the worker's start until the queue is drained. Each run uses a unique key
prefix whose keys are deleted afterwards.

    .venv/bin/python bench/queue_overhead.py [--jobs 20000] [--concurrency 10] [--rounds 2]

The last line printed is one JSON object: ``conveyor_jobs_per_s``, ``raw_jobs_per_s``,
``ratio`` (target: >= 0.9).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import bullmq
import redis.asyncio as aioredis

from conveyor.queue import JobContext, QueueFactory, WorkflowExecute, execution_queue_name
from conveyor.queue.payloads import DEFAULT_JOB_OPTIONS
from conveyor.settings import Settings, load_settings

QUEUE = execution_queue_name("bench")
CHUNK = 1000


def payload(i: int) -> dict[str, Any]:
    return {
        "executionId": f"exec-{i:06d}",
        "tenantId": f"tenant-{i % 7}",
        "workflowId": "wf-bench",
        "region": "bench",
        "workflowVersion": 1,
        "enqueuedAt": int(time.time() * 1000),
        "reason": "bench",
    }


async def drained(client: aioredis.Redis, prefix: str) -> bool:
    base = f"{prefix}:{QUEUE}:"
    pipe = client.pipeline(transaction=False)
    pipe.llen(base + "wait")
    pipe.llen(base + "active")
    pipe.zcard(base + "delayed")
    pipe.zcard(base + "prioritized")
    return not any(await pipe.execute())


async def wait_drained(client: aioredis.Redis, prefix: str, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while not await drained(client, prefix):
        if time.monotonic() > deadline:
            raise TimeoutError("queue not drained in time")
        await asyncio.sleep(0.02)


async def cleanup(client: aioredis.Redis, prefix: str) -> None:
    keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
    for i in range(0, len(keys), 500):
        await client.delete(*keys[i : i + 500])


async def timed(
    client: aioredis.Redis, prefix: str, start: Callable[[], Awaitable[Any]], n: int
) -> tuple[float, float]:
    """Run until drained; return (jobs per second, CPU microseconds of this process per job)."""
    began, cpu = time.perf_counter(), time.process_time()
    await start()
    await wait_drained(client, prefix, limit_s=max(60.0, n / 200))
    return n / (time.perf_counter() - began), (time.process_time() - cpu) / n * 1e6


async def run_raw(
    settings: Settings, client: aioredis.Redis, n: int, concurrency: int
) -> tuple[float, float]:
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    connection = {"host": settings.queue_redis_host, "port": settings.queue_redis_port}
    queue = bullmq.Queue(QUEUE, {"connection": connection, "prefix": prefix})
    opts = dict(DEFAULT_JOB_OPTIONS)
    for base in range(0, n, CHUNK):
        await queue.addBulk(
            [
                {
                    "name": "workflow.execute",
                    "data": payload(i),
                    "opts": {**opts, "jobId": f"exec-{i:06d}"},
                }
                for i in range(base, min(base + CHUNK, n))
            ]
        )

    async def noop(job: Any, token: str) -> None:
        return None

    worker = bullmq.Worker(
        QUEUE,
        noop,
        {"connection": connection, "prefix": prefix, "concurrency": concurrency, "autorun": False},
    )
    task: asyncio.Task[Any] | None = None

    async def start() -> None:
        nonlocal task
        task = asyncio.create_task(worker.run())

    try:
        return await timed(client, prefix, start, n)
    finally:
        try:  # raw bullmq's close() has no time limit: bound it here
            await asyncio.wait_for(worker.close(), 30)
        except TimeoutError:
            await asyncio.wait_for(worker.close(force=True), 10)
        if task is not None:
            await asyncio.wait_for(task, 10)
        await queue.close()
        await cleanup(client, prefix)


async def run_conveyor(
    settings: Settings, client: aioredis.Redis, n: int, concurrency: int
) -> tuple[float, float]:
    prefix = f"bench{uuid.uuid4().hex[:8]}"
    settings = settings.model_copy(
        update={"queue_prefix": prefix, "queue_metrics_interval_ms": 1000}
    )
    metrics: list[dict[str, int]] = []
    async with QueueFactory(settings) as qf:
        queue = qf.create_queue(QUEUE)
        for base in range(0, n, CHUNK):
            await queue.add_bulk([(payload(i), {}) for i in range(base, min(base + CHUNK, n))])

        async def noop(job: WorkflowExecute, ctx: JobContext) -> None:
            return None

        worker = qf.create_worker(QUEUE, noop, concurrency=concurrency)
        events = qf.create_queue_events(QUEUE)
        task: asyncio.Task[None] | None = None

        async def start() -> None:
            nonlocal task
            # Worker mode, as the execution worker registers it (see conveyor.queue.telemetry).
            qf.register_queue_telemetry(queue, events, on_metrics=metrics.append, worker=worker)
            task = asyncio.create_task(worker.run())

        try:
            return await timed(client, prefix, start, n)
        finally:
            await worker.close(timeout_s=10)
            if task is not None:
                await task
            await cleanup(client, prefix)


async def main(args: argparse.Namespace) -> dict[str, float]:
    settings = load_settings()
    client = aioredis.Redis(host=settings.queue_redis_host, port=settings.queue_redis_port)
    raw: list[tuple[float, float]] = []
    conveyor: list[tuple[float, float]] = []
    try:
        for _ in range(args.rounds):  # alternate, so load from elsewhere hits both alike
            raw.append(await run_raw(settings, client, args.jobs, args.concurrency))
            print(
                f"raw bullmq      : {raw[-1][0]:8.0f} jobs/s  {raw[-1][1]:7.1f} us CPU/job",
                flush=True,
            )
            conveyor.append(await run_conveyor(settings, client, args.jobs, args.concurrency))
            print(
                f"conveyor.queue  : {conveyor[-1][0]:8.0f} jobs/s  {conveyor[-1][1]:7.1f} us CPU/job",
                flush=True,
            )
    finally:
        await client.aclose()
    best_raw, best_conveyor = max(r[0] for r in raw), max(c[0] for c in conveyor)
    cpu_raw, cpu_conveyor = min(r[1] for r in raw), min(c[1] for c in conveyor)
    ratio = best_conveyor / best_raw
    print(
        f"{args.jobs} no-op jobs, concurrency {args.concurrency}, best of {args.rounds}: "
        f"raw {best_raw:.0f}/s, conveyor {best_conveyor:.0f}/s, ratio {ratio:.3f} (target >= 0.9); "
        f"CPU per job raw {cpu_raw:.0f} us, conveyor {cpu_conveyor:.0f} us"
    )
    return {
        "conveyor_jobs_per_s": round(best_conveyor, 1),
        "raw_jobs_per_s": round(best_raw, 1),
        "ratio": round(ratio, 3),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    logging.basicConfig(level=os.environ.get("LOG_LEVEL", "WARNING"))
    result = asyncio.run(main(parser.parse_args()))
    print(json.dumps(result))
