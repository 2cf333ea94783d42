"""bullmq-python 3.4.4: once the worker is closing, a failing fetch is retried with no delay.

Starts a throwaway redis-server on a free port, lets a stock `bullmq.Worker` go idle on it,
stops that server (by PID), then calls `worker.close()`. Counts the Redis calls the fetch
makes (wrapping `worker.backend.waitForJob` and `worker.backend.moveToActive`) before and
after `close()`, and checks whether `close()` returns while Redis is down.

The worker is given a client without client-side retries so each attempt fails at once
(bullmq's own retry is what is measured). Never touches the Redis server on port 6379.
Run: python closing_retry_spin.py
"""

import asyncio
import contextlib
import shutil
import socket
import subprocess
import tempfile
import time
import uuid

import redis.asyncio as aioredis
from bullmq import Worker
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

PREFIX = f"repro-{uuid.uuid4().hex[:12]}"
RUN_RETRY_DELAY_MS = 1000  # bullmq's default is 15000; shortened to keep the run short


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def start_redis(port: int, workdir: str) -> asyncio.subprocess.Process:
    args = ["--port", str(port), "--bind", "127.0.0.1"]
    args += ["--save", "", "--appendonly", "no", "--dir", workdir]
    proc = await asyncio.create_subprocess_exec(
        "redis-server", *args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    probe = aioredis.Redis(host="127.0.0.1", port=port)
    try:
        for _ in range(100):
            with contextlib.suppress(Exception):
                if await probe.ping():
                    return proc
            await asyncio.sleep(0.05)
    finally:
        await probe.aclose()
    proc.kill()
    await proc.wait()
    raise RuntimeError("throwaway redis-server did not start")


async def cleanup_keys(port: int) -> int:
    client = aioredis.Redis(host="127.0.0.1", port=port)
    deleted = 0
    async for key in client.scan_iter(match=f"{PREFIX}:*", count=500):
        deleted += await client.delete(key)
    await client.aclose()
    return deleted


async def main() -> None:
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="bullmq-repro-")
    server = await start_redis(port, workdir)
    print(f"throwaway redis-server pid={server.pid} port={port}")
    client = aioredis.Redis(
        host="127.0.0.1", port=port, decode_responses=True, retry=Retry(NoBackoff(), 0)
    )

    async def process(job, token):
        return None

    worker = Worker(
        "spin",
        process,
        {
            "connection": client,
            "prefix": PREFIX,
            "autorun": False,
            "runRetryDelay": RUN_RETRY_DELAY_MS,
        },
    )
    worker.on("error", lambda *args: None)
    calls = [0]
    by_method = {"waitForJob": 0, "moveToActive": 0}
    for method in by_method:
        original = getattr(worker.backend, method)

        async def counted(*args, _original=original, _method=method, **kwargs):
            calls[0] += 1
            by_method[_method] += 1
            return await _original(*args, **kwargs)

        setattr(worker.backend, method, counted)

    run = asyncio.ensure_future(worker.run())
    close = None
    try:
        await asyncio.sleep(0.5)  # idle, blocked in BZPOPMIN on the marker
        print(f"deleted {await cleanup_keys(port)} keys under {PREFIX}: before stopping Redis")
        server.terminate()  # stop the throwaway server (by PID)
        await asyncio.wait_for(server.wait(), 5)
        before = calls[0]
        await asyncio.sleep(2.0)
        print(
            f"Redis down, worker not closing: {calls[0] - before} fetch calls in 2.0 s "
            f"(runRetryDelay={RUN_RETRY_DELAY_MS} ms)"
        )

        close = asyncio.ensure_future(worker.close())
        await asyncio.sleep(RUN_RETRY_DELAY_MS / 1000 + 0.2)  # the pending retry sleep ends
        before, cpu0, t0 = calls[0], time.process_time(), time.monotonic()
        await asyncio.sleep(0.5)
        n, wall = calls[0] - before, time.monotonic() - t0
        cpu = time.process_time() - cpu0
        print(
            f"Redis down, worker closing: {n} fetch calls in {wall:.2f} s "
            f"({n / wall:.0f}/s, process CPU {100 * cpu / wall:.0f}%); all calls so far: {by_method}"
        )
        await asyncio.sleep(1.5)
        print(f"graceful close() returned 3 s after it was called: {close.done()}")
    finally:
        if server.returncode is None:
            server.kill()
            await asyncio.wait_for(server.wait(), 5)
        forced = asyncio.ensure_future(worker.close(force=True))
        await asyncio.wait([forced, run] + ([close] if close else []), timeout=5)
        for task in (forced, run, close):
            if task is not None and not task.done():
                task.cancel()
        await asyncio.gather(forced, run, *([close] if close else []), return_exceptions=True)
        shutil.rmtree(workdir, ignore_errors=True)
        print("stopped: close(force=True) ended the loop; throwaway server gone (no persistence)")


if __name__ == "__main__":
    asyncio.run(main())
