"""bullmq-python 3.4.4: Worker.run starts up to `concurrency` fetches whenever a slot frees.

Feeds 300 jobs at 100 jobs/s to a stock `bullmq.Worker` and counts the `moveToActive` Lua
calls it makes (wrapping `worker.backend.moveToActive`), for concurrency 1 and 10.

Needs Redis at 127.0.0.1:6379. Uses a random key prefix and deletes only its own keys.
Run: python fetch_storm.py
"""

import asyncio
import contextlib
import time
import uuid

import redis.asyncio as aioredis
from bullmq import Queue, Worker

REDIS = {"host": "127.0.0.1", "port": 6379}
PREFIX = f"repro-{uuid.uuid4().hex[:12]}"
RATE = 100  # jobs per second
JOBS = 300


async def measure(concurrency: int) -> dict:
    name = f"storm-c{concurrency}"
    queue = Queue(name, {"connection": REDIS, "prefix": PREFIX})
    done: set[str] = set()
    all_done = asyncio.Event()

    async def process(job, token):
        done.add(job.id)
        if len(done) == JOBS:
            all_done.set()

    worker = Worker(
        name,
        process,
        {"connection": REDIS, "prefix": PREFIX, "concurrency": concurrency, "autorun": False},
    )
    calls = {"total": 0, "empty": 0}
    move = worker.backend.moveToActive

    async def counted(*args, **kwargs):
        result = await move(*args, **kwargs)
        calls["total"] += 1
        if not result or not result[0]:
            calls["empty"] += 1
        return result

    worker.backend.moveToActive = counted
    run = asyncio.ensure_future(worker.run())
    await asyncio.sleep(0.5)  # idle: the worker is now waiting on the marker
    calls.update(total=0, empty=0)

    cpu0, start = time.process_time(), time.monotonic()
    for n in range(JOBS):  # a steady 100 jobs/s
        await asyncio.sleep(max(0.0, start + n / RATE - time.monotonic()))
        await queue.add("job", {"n": n})
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(all_done.wait(), 10)
    cpu = time.process_time() - cpu0
    result = dict(calls, processed=len(done), cpu_ms_per_job=1000 * cpu / JOBS)

    await worker.close()
    await asyncio.wait_for(run, 10)
    await queue.close()
    return result


async def cleanup() -> int:
    client = aioredis.Redis(**REDIS)
    deleted = 0
    async for key in client.scan_iter(match=f"{PREFIX}:*", count=500):
        deleted += await client.delete(key)
    await client.aclose()
    return deleted


async def main() -> None:
    print(f"bullmq 3.4.4 Worker, {JOBS} jobs at {RATE} jobs/s, trivial processor")
    try:
        for concurrency in (1, 10):
            r = await measure(concurrency)
            print(
                f"concurrency={concurrency:2}: processed {r['processed']}/{JOBS}, "
                f"moveToActive calls: {r['total']} ({r['empty']} found the queue empty), "
                f"moveToActive calls per job: {r['total'] / JOBS:.1f}, "
                f"process CPU per job: {r['cpu_ms_per_job']:.2f} ms"
            )
        print("expected (one fetch at a time, as Node BullMQ): <= 2 moveToActive calls per job")
    finally:
        print(f"cleanup: deleted {await cleanup()} keys under {PREFIX}:")


if __name__ == "__main__":
    asyncio.run(main())
