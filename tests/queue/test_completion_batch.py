"""Jobs that finish together complete together: their ``moveToFinished`` calls share one
pipeline, each keeping bullmq's semantics (lock token, events, ``removeOnComplete``), and a job
whose lock was lost fails alone. A lone completion goes at once, alone. Real Redis."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import signal
import time
from typing import Any

import pytest
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from conveyor.queue import JobContext, QueueFactory
from conveyor.queue.bullmq import compat
from conveyor.queue.scripts import ScriptBatcher
from tests.conftest import REDIS_HOST, REDIS_PORT
from tests.helpers import redis_server
from tests.queue.conftest import TEST_QUEUE, eventually, make_settings, running
from tests.queue.payload import Probe


def batch_sizes(worker: Any) -> list[int]:
    """The number of completions in each pipeline ``worker`` sends (recorded as sent)."""
    finisher = worker.bullmq_worker._finisher
    sizes: list[int] = []
    send = finisher._send

    async def counted(batch: list[Any]) -> None:
        sizes.append(len(batch))
        await send(batch)

    finisher._send = counted
    return sizes


async def _events(client: Any, prefix: str) -> list[tuple[str, str]]:
    entries = await client.xrange(f"{prefix}:{TEST_QUEUE}:events")
    return [(f["event"], f.get("jobId", "")) for _id, f in entries if f["event"] == "completed"]


async def test_jobs_finishing_together_complete_in_one_pipeline_and_a_lost_lock_fails_alone(
    redis_prefix: str, redis_client: Any
) -> None:
    async with QueueFactory(make_settings(redis_prefix)) as qf:
        queue = qf.create_queue(TEST_QUEUE)
        started: dict[int, str] = {}
        release = asyncio.Event()

        async def process(payload: Probe, ctx: JobContext) -> dict[str, int]:
            started[payload.n] = ctx.id
            await release.wait()
            return {"n": payload.n}

        worker = qf.create_worker(TEST_QUEUE, process, concurrency=6, lock_duration_ms=10_000)
        bull = worker.bullmq_worker  # type: ignore[attr-defined]
        errors: list[BaseException] = []
        bull.on("error", lambda err, *_: errors.append(err))
        sizes = batch_sizes(worker)
        producer: Any = getattr(queue, "bullmq_queue")  # noqa: B009 - the driver's handle
        for n in range(6):  # keep 3 completed jobs (bullmq's keepJobs, per job)
            await producer.add("probe", {"n": n}, {"removeOnComplete": 3})
        async with running(worker):
            await eventually(lambda: len(started) == 6)
            lost = started[4]
            await redis_client.delete(f"{redis_prefix}:{TEST_QUEUE}:{lost}:lock")  # a racer
            release.set()  # all six finish in the same turn of the loop
            await eventually(lambda: len(errors) == 1)
            counts = await queue.get_job_counts("active", "completed", "failed")
        assert sizes == [6]  # one pipeline for the six completions
        assert counts == {"active": 1, "completed": 3, "failed": 0}  # 5 completed, 3 kept
        assert await redis_client.hget(f"{redis_prefix}:{TEST_QUEUE}:{lost}", "finishedOn") is None
        assert "Missing lock" in str(errors[0])
        completed = await _events(redis_client, redis_prefix)
        others = {started[n] for n in range(6) if n != 4}
        assert {job_id for _event, job_id in completed} == others  # one event each, none for 4
        assert len(completed) == 5
        kept = await redis_client.zrange(f"{redis_prefix}:{TEST_QUEUE}:completed", 0, -1)
        assert len(kept) == 3 and set(kept) <= others
        for job_id in kept:  # bullmq's fields, as its own call writes them
            fields = await redis_client.hgetall(f"{redis_prefix}:{TEST_QUEUE}:{job_id}")
            assert fields["returnvalue"] == f'{{"n":{_n(started, job_id)}}}'
            assert fields["finishedOn"] and fields["processedOn"]
            assert "lock" not in fields


def _n(started: dict[int, str], job_id: str) -> int:
    return next(n for n, jid in started.items() if jid == job_id)


async def test_a_lone_completion_goes_at_once_alone(bull_qf: QueueFactory) -> None:
    queue = bull_qf.create_queue(TEST_QUEUE)
    done: list[int] = []

    async def process(payload: Probe, ctx: JobContext) -> None:
        done.append(payload.n)

    worker = bull_qf.create_worker(TEST_QUEUE, process, concurrency=10)
    sizes = batch_sizes(worker)
    async with running(worker):
        for n in range(5):
            await queue.add(Probe(n=n))
            await eventually(lambda n=n: _completed(queue, n + 1), within=5, interval=0.005)
    assert done == [0, 1, 2, 3, 4]
    assert sizes == [1, 1, 1, 1, 1]  # nobody waited for a batch to fill


async def _completed(queue: Any, n: int) -> bool:
    counts = await queue.get_job_counts("completed")
    return bool(counts["completed"] == n)


def test_the_batched_completion_is_bullmqs_call() -> None:
    """The pieces of bullmq it reuses are still there (checked with the other internals)."""
    assert not [p for p in compat.missing_internals() if "moveTo" in p or "finished" in p]


async def test_a_script_batch_keeps_each_calls_reply_in_order(redis_prefix: str) -> None:
    """One batch: replies in order, an error reply is its call's own error, a script Redis
    does not know yet is loaded and sent again; the connection stays usable."""
    client = aioredis.Redis(host=REDIS_HOST, port=REDIS_PORT, decode_responses=True)
    echo = "return ARGV[1]"
    fail = "return redis.error_reply('boom ' .. ARGV[1])"
    fresh = f"return '{redis_prefix}:' .. KEYS[1] .. ARGV[1]"  # never loaded before
    try:
        await client.script_load(echo)
        await client.script_load(fail)
        batcher = ScriptBatcher(client)
        calls: list[tuple[str, list[Any]]] = [
            (echo, ["a"]),
            (fail, ["b"]),
            (fresh, [1.5]),
            (echo, [7]),
        ]
        futures = [
            batcher.submit(src, _sha(src), ["k"] if src == fresh else [], args)
            for src, args in calls
        ]
        results = await asyncio.gather(*futures, return_exceptions=True)
        assert results[0] == "a" and results[3] == "7"
        assert isinstance(results[1], ResponseError) and "boom b" in str(results[1])
        assert results[2] == f"{redis_prefix}:k1.5"
        assert batcher.batches == 1 and batcher.loads == 1
        assert await batcher.call(echo, _sha(echo), [], ["again"]) == "again"
        assert await client.ping()
    finally:
        await client.aclose()


def _sha(source: str) -> str:
    return hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()


SLOW = """local t = redis.call('TIME')
local until_us = t[1] * 1000000 + t[2] + tonumber(ARGV[1]) * 1000
repeat t = redis.call('TIME') until t[1] * 1000000 + t[2] >= until_us
return ARGV[1]"""
"""Busy for ARGV[1] ms on the server, then its argument back."""


async def test_a_script_batch_times_out_only_when_no_reply_came_for_the_socket_timeout() -> None:
    """Each reply of a batch is due within the client's socket timeout (0.3 s here) of the
    one before, as redis-py bounds each read. Eight calls of 100 ms with 100 kB arguments each
    (Redis reads them in pieces and answers each call in turn) take 0.8 s and succeed; three
    calls of 150 ms with small arguments (Redis answers them together, after 0.45 s) time
    out as redis-py's ``TimeoutError``, the connection dropped (its replies are still coming)
    and the next batch served on a fresh one. A frozen server is a timeout too, not a hang;
    once it thaws, calls succeed again. A throwaway ``redis-server``."""
    with redis_server() as server:
        client = aioredis.Redis(
            host="127.0.0.1",
            port=server.port,
            socket_timeout=0.3,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )
        try:
            await client.script_load(SLOW)
            batcher = ScriptBatcher(client)
            sha = _sha(SLOW)
            pad = "x" * 100_000
            started = time.monotonic()
            replies = await asyncio.gather(
                *[batcher.submit(SLOW, sha, [], [100, pad]) for _ in range(8)]
            )
            assert replies == ["100"] * 8
            assert time.monotonic() - started > 0.75  # longer than the timeout, in steps

            calls = [batcher.submit(SLOW, sha, [], [150]) for _ in range(3)]
            started = time.monotonic()
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert time.monotonic() - started < 1.0
            assert batcher.batches == 2
            assert all(isinstance(r, RedisTimeoutError) for r in results), results
            assert await batcher.call(SLOW, sha, [], [1]) == "1"

            assert server.proc is not None
            server.proc.send_signal(signal.SIGSTOP)
            try:
                started = time.monotonic()
                with pytest.raises(RedisTimeoutError):
                    await batcher.call(SLOW, sha, [], [1])
                assert time.monotonic() - started < 1.0
            finally:
                server.proc.send_signal(signal.SIGCONT)
            assert await batcher.call(SLOW, sha, [], [2]) == "2"
        finally:
            await client.aclose()


COUNT = "return redis.call('INCR', KEYS[1])"
"""Not harmless twice: counts its runs."""


async def test_a_late_reply_is_not_asked_for_again_but_a_lost_connection_is() -> None:
    """With the client's retry policy on (two more tries), a batch whose reply came later than
    the socket timeout raises the timeout and is not sent again: Redis ran it (the count says
    once) — a script run twice would pop parked jobs twice or take two start tokens. A batch
    on a connection Redis dropped (``CLIENT KILL``, as a restart leaves pooled connections) is
    sent again on a fresh one and runs once. A throwaway ``redis-server``."""
    with redis_server() as server:
        client = aioredis.Redis(
            host="127.0.0.1",
            port=server.port,
            socket_timeout=0.3,
            retry=Retry(NoBackoff(), 2),
            decode_responses=True,
        )
        admin = aioredis.Redis(host="127.0.0.1", port=server.port, decode_responses=True)
        try:
            await client.script_load(SLOW)
            await client.script_load(COUNT)
            batcher = ScriptBatcher(client)
            calls = [
                batcher.submit(COUNT, _sha(COUNT), ["runs"], []),
                batcher.submit(SLOW, _sha(SLOW), [], [450]),
            ]
            results = await asyncio.gather(*calls, return_exceptions=True)
            assert all(isinstance(r, RedisTimeoutError) for r in results), results
            assert batcher.batches == 1
            assert await admin.get("runs") == "1", "the late batch was sent again"

            assert await batcher.call(COUNT, _sha(COUNT), ["runs"], []) == 2
            killed = await admin.client_kill_filter(_type="normal", skipme=True)
            assert killed >= 1
            assert await batcher.call(COUNT, _sha(COUNT), ["runs"], []) == 3
            assert await admin.get("runs") == "3"
        finally:
            await client.aclose()
            await admin.aclose()


async def test_a_close_cut_short_by_its_callers_deadline_does_not_hang_the_next(
    bull_qf: QueueFactory,
) -> None:
    """A worker stopping with a job that does not finish: its close is cut short by the
    caller's deadline (the drain's) — a later close (the factory's, at exit) returns at
    once instead of waiting for the first to finish, which it never will."""
    queue = bull_qf.create_queue(TEST_QUEUE)
    started = asyncio.Event()

    async def process(payload: Probe, ctx: JobContext) -> None:
        started.set()
        await asyncio.Event().wait()  # never finishes by itself

    worker = bull_qf.create_worker(TEST_QUEUE, process, concurrency=1)
    run = asyncio.create_task(worker.run())
    await queue.add(Probe(n=1))
    await asyncio.wait_for(started.wait(), 5)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(worker.close(timeout_s=5), timeout=0.2)
    await asyncio.wait_for(worker.close(), timeout=2)  # returns: the first one gave up
    run.cancel()
    with contextlib.suppress(BaseException):
        await asyncio.wait_for(run, 10)
