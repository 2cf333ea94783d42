"""bullmq-python 3.4.4: close()/pause() only wait for the tasks in `worker.processing` when
they are called, and run() releases the lock manager when its loop exits.

A. close() while a fetch is in flight: the job that fetch brings back (already active and
   locked to this worker) starts after close() began, and close() returns while it runs.
B. close() while two jobs run: the first one to end makes run() exit and close the lock
   manager, so the other job's lock is no longer renewed while close() still waits for it.
C. pause() while a fetch is in flight that returns after another job ended: the fetched job
   is neither started nor lock-tracked until resume(); it stalls and runs twice.

For A and C, `worker.backend.moveToActive` is wrapped to delay its *reply* (the Lua script
has already run) by a few hundred ms: a slow round trip, to make the race deterministic.
Needs Redis at 127.0.0.1:6379. Uses a random key prefix and deletes only its own keys.
Run: python close_pause_inflight.py
"""

import asyncio
import contextlib
import time
import uuid
from collections import Counter

import redis.asyncio as aioredis
from bullmq import Queue, Worker

REDIS = {"host": "127.0.0.1", "port": 6379}
PREFIX = f"repro-{uuid.uuid4().hex[:12]}"
LOCK_MS = 1000


class Harness:
    """A stock Worker and Queue; records processor runs and can slow moveToActive replies."""

    def __init__(self, name: str, durations: dict[str, float], **opts) -> None:
        self.queue = Queue(name, {"connection": REDIS, "prefix": PREFIX})
        self.durations = durations
        self.started: Counter[str] = Counter()
        self.running: set[str] = set()
        self.events: list[str] = []
        self.reply_delay = 0.0
        self.changed = asyncio.Event()
        self.worker = Worker(
            name,
            self.process,
            {"connection": REDIS, "prefix": PREFIX, "autorun": False, **opts},
        )
        for event in ("stalled", "error", "failed"):
            self.worker.on(event, lambda *a, _e=event: self.events.append(f"{_e}: {a[0]}"))
        move = self.worker.backend.moveToActive

        async def slow_reply(*args, **kwargs):
            result = await move(*args, **kwargs)
            if self.reply_delay:
                await asyncio.sleep(self.reply_delay)
            return result

        self.worker.backend.moveToActive = slow_reply
        self.run = asyncio.ensure_future(self.worker.run())

    async def process(self, job, token):
        name = job.data["name"]
        self.started[name] += 1
        self.running.add(name)
        self.changed.set()
        try:
            await asyncio.sleep(self.durations[name])
        finally:
            self.running.discard(name)
            self.changed.set()

    async def add(self, name: str) -> str:
        return (await self.queue.add(name, {"name": name})).id

    async def state(self, job_id: str) -> str:
        return await self.queue.getJobState(job_id)

    async def lock_ttl(self, job_id: str) -> int:
        return await self.queue.backend.conn.pttl(f"{PREFIX}:{self.queue.name}:{job_id}:lock")

    async def until(self, predicate, within: float = 5.0) -> None:
        """Wait (at most `within` s) until a processor start/end makes `predicate()` true."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(within):
                while not predicate():
                    self.changed.clear()
                    await self.changed.wait()

    async def stop(self) -> None:
        if not self.worker.closed:
            await asyncio.wait_for(self.worker.close(force=True), 5)
        await asyncio.wait([self.run], timeout=5)
        await self.queue.close()


async def part_a() -> None:
    h = Harness("close-a", {"J": 2.0}, concurrency=1, lockDuration=LOCK_MS)
    try:
        await asyncio.sleep(0.3)  # idle, blocked in BZPOPMIN
        h.reply_delay = 0.3
        job = await h.add("J")
        await asyncio.sleep(0.1)  # BZPOPMIN woke; J is active, the reply is on its way
        t0 = time.monotonic()
        await h.worker.close()
        took = time.monotonic() - t0
        running = "J" in h.running
        state, ttl = await h.state(job), await h.lock_ttl(job)
        await h.until(lambda: h.started["J"] and "J" not in h.running)
        await asyncio.sleep(0.3)
        reopened = h.worker.backend.conn.connection is not None
        print(
            f"A. close() returned after {took:.2f} s; J's processor still running: {running}; "
            f"J {state} with lock TTL {ttl} ms. After J's processor ended: "
            f"J {await h.state(job)}, lock TTL {await h.lock_ttl(job)} ms; events: {h.events}; "
            f"worker's closed client reconnected by J's moveToFinished: {reopened}"
        )
        await h.worker.backend.connection.close()
    finally:
        await h.stop()


async def part_b() -> None:
    durations = {"short": 0.3, "long": 2.5}
    h = Harness("close-b", durations, concurrency=2, lockDuration=LOCK_MS)
    try:
        ids = {name: await h.add(name) for name in durations}
        await h.until(lambda: len(h.running) == 2)
        t0 = time.monotonic()
        close = asyncio.ensure_future(h.worker.close())
        await h.until(lambda: "short" not in h.running)
        await asyncio.sleep(LOCK_MS / 1000 + 0.3)
        ttl = await h.lock_ttl(ids["long"])
        still = "long" in h.running
        await close
        took = time.monotonic() - t0
        print(
            f"B. close() waited {took:.2f} s for the long job, but {LOCK_MS + 300} ms after "
            f"the short job ended (long job still running: {still}) the long job's lock TTL "
            f"was {ttl} ms (-2: expired, not renewed). Long job now "
            f"{await h.state(ids['long'])}; events: {h.events}"
        )
    finally:
        await h.stop()


async def part_c() -> None:
    h = Harness(
        "pause-c",
        {"J1": 0.6, "J2": 0.1},
        concurrency=2,
        lockDuration=LOCK_MS,
        stalledInterval=500,
    )
    try:
        await h.add("J1")
        await h.until(lambda: "J1" in h.running)
        await asyncio.sleep(0.1)  # the free slot is blocked in BZPOPMIN
        h.reply_delay = 0.8
        j2 = await h.add("J2")
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        await h.worker.pause()  # J1 ends at ~0.4 s, J2's fetch replies at ~0.8 s
        took = time.monotonic() - t0
        h.reply_delay = 0.0
        state, ttl = await h.state(j2), await h.lock_ttl(j2)
        await asyncio.sleep(2.5)  # paused: J2 is not started and its lock is not renewed
        print(
            f"C. pause() returned after {took:.2f} s; J2 then {state} (lock TTL {ttl} ms), "
            f"J2 processor runs while paused: {h.started['J2']}; 2.5 s later J2 is "
            f"{await h.state(j2)}; events: {h.events}"
        )
        h.worker.resume()
        await asyncio.sleep(1.5)
        print(
            f"   after resume(): J2 processor runs: {h.started['J2']}, "
            f"J2 {await h.state(j2)}; events: {h.events}"
        )
    finally:
        await h.stop()


async def cleanup() -> int:
    client = aioredis.Redis(**REDIS)
    deleted = 0
    async for key in client.scan_iter(match=f"{PREFIX}:*", count=500):
        deleted += await client.delete(key)
    await client.aclose()
    return deleted


async def main() -> None:
    try:
        await part_a()
        await part_b()
        await part_c()
    finally:
        print(f"cleanup: deleted {await cleanup()} keys under {PREFIX}:")


if __name__ == "__main__":
    asyncio.run(main())
