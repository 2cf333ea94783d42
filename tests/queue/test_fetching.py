"""How the bullmq worker fetches: one fetch at a time, and the next job with each completion.

bullmq's Python port started ``concurrency`` fetches whenever a slot freed, ~25 ``moveToActive``
calls per job at a low rate with concurrency 10; these tests count the calls on a real Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from typing import Any

import pytest

from conveyor.queue import JobContext, QueueFactory
from tests.helpers import redis_server
from tests.queue.conftest import TEST_QUEUE, eventually, make_settings, running
from tests.queue.payload import Probe


def count_fetches(worker: Any) -> list[int]:
    """Count ``moveToActive`` calls (empty or not) made by ``worker``'s bullmq backend."""
    backend = worker.bullmq_worker.backend
    calls = [0]
    move = backend.moveToActive

    async def counted(*args: Any) -> Any:
        calls[0] += 1
        return await move(*args)

    backend.moveToActive = counted
    return calls


async def test_an_idle_worker_fetches_one_job_at_a_time(bull_qf: QueueFactory) -> None:
    queue = bull_qf.create_queue(TEST_QUEUE)
    seen: Counter[int] = Counter()

    async def process(payload: Probe, ctx: JobContext) -> None:
        seen[payload.n] += 1

    worker = bull_qf.create_worker(TEST_QUEUE, process, concurrency=10)
    fetches = count_fetches(worker)
    async with running(worker):
        await asyncio.sleep(0.2)
        for n in range(20):
            await queue.add(Probe(n=n))
            await asyncio.sleep(0.03)
        await eventually(lambda: len(seen) == 20)
    assert set(seen.values()) == {1}
    # Per job: the fetch woken by its marker, and one woken by the marker that taking a job
    # leaves for other workers, which finds the queue empty. (bullmq's own loop: ~25.)
    assert fetches[0] <= 2 * 20 + 4, fetches[0]


async def test_a_busy_worker_gets_the_next_job_with_each_completion(
    bull_qf: QueueFactory,
) -> None:
    queue = bull_qf.create_queue(TEST_QUEUE)
    seen: Counter[int] = Counter()
    in_flight = peak = 0

    async def process(payload: Probe, ctx: JobContext) -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.001)
        seen[payload.n] += 1
        in_flight -= 1

    await queue.add_bulk([(Probe(n=n), {}) for n in range(300)])
    worker = bull_qf.create_worker(TEST_QUEUE, process, concurrency=4)
    fetches = count_fetches(worker)
    async with running(worker):
        await eventually(lambda: len(seen) == 300, within=20)
    assert set(seen.values()) == {1}
    assert peak == 4
    # Filling the 4 slots, and finding the queue empty at the end; every other job arrived
    # with its predecessor's completion.
    assert fetches[0] <= 12, fetches[0]


async def test_jobs_added_while_busy_are_not_left_waiting(bull_qf: QueueFactory) -> None:
    """A job that arrives while every slot is busy starts when one frees, not at the next
    blocking wait's timeout."""
    queue = bull_qf.create_queue(TEST_QUEUE)
    release = asyncio.Event()
    started: dict[int, float] = {}

    async def process(payload: Probe, ctx: JobContext) -> None:
        started[payload.n] = time.monotonic()
        if payload.n < 2:
            await release.wait()

    worker = bull_qf.create_worker(TEST_QUEUE, process, concurrency=2)
    async with running(worker):
        await queue.add(Probe(n=0))
        await queue.add(Probe(n=1))
        await eventually(lambda: len(started) == 2)
        await queue.add(Probe(n=2))
        await asyncio.sleep(0.1)
        assert 2 not in started  # both slots are taken
        freed = time.monotonic()
        release.set()
        await eventually(lambda: 2 in started, within=3)
    assert started[2] - freed < 1.0


async def test_an_idle_worker_closes_at_once(bull_qf: QueueFactory) -> None:
    async def process(payload: Probe, ctx: JobContext) -> None:
        return None

    worker = bull_qf.create_worker(TEST_QUEUE, process, concurrency=5)
    task = asyncio.create_task(worker.run())
    await asyncio.sleep(0.3)  # blocked in BZPOPMIN
    begin = time.monotonic()
    await worker.close(timeout_s=5)
    await asyncio.wait_for(task, 5)
    assert time.monotonic() - begin < 1.0


@pytest.mark.slow
async def test_a_worker_closes_promptly_while_redis_is_down(redis_prefix: str) -> None:
    """A fetch that keeps failing is retried after ``runRetryDelay``, and not at all once the
    worker closes (bullmq would retry at once, in a tight loop, while closing)."""
    with redis_server() as server:
        settings = make_settings(redis_prefix, QUEUE_REDIS_PORT=str(server.port))
        async with QueueFactory(settings) as qf:
            seen: list[int] = []

            async def process(payload: Probe, ctx: JobContext) -> None:
                seen.append(payload.n)

            worker = qf.create_worker(TEST_QUEUE, process, concurrency=3)
            bull = worker.bullmq_worker  # type: ignore[attr-defined]
            fetch, fetches = bull.fetch_next, [0]

            async def counted(*args: Any) -> Any:
                fetches[0] += 1
                return await fetch(*args)

            bull.fetch_next = counted
            task = asyncio.create_task(worker.run())
            await qf.create_queue(TEST_QUEUE).add(Probe(n=1))
            await eventually(lambda: seen == [1])
            server.stop()
            await asyncio.sleep(2.5)
            during = fetches[0]
            begin = time.monotonic()
            await worker.close(timeout_s=2)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, 5)
            assert time.monotonic() - begin < 4
            await asyncio.sleep(0.5)
            assert fetches[0] - during <= 2  # nothing after the close
            assert during < 20  # retried about once a second, not spinning


async def test_a_graceful_close_finishes_every_job_it_fetched(bull_qf: QueueFactory) -> None:
    """Jobs that arrive with a completion just as the worker closes are run to the end too,
    not left active (to be found stalled and run again after ``stalledInterval``)."""
    queue = bull_qf.create_queue(TEST_QUEUE)
    started: Counter[int] = Counter()
    finished: Counter[int] = Counter()

    async def process(payload: Probe, ctx: JobContext) -> None:
        started[payload.n] += 1
        await asyncio.sleep(0.02)
        finished[payload.n] += 1

    await queue.add_bulk([(Probe(n=n), {}) for n in range(200)])
    worker = bull_qf.create_worker(TEST_QUEUE, process, concurrency=8)
    task = asyncio.create_task(worker.run())
    await eventually(lambda: len(finished) >= 40)
    await worker.close(timeout_s=5)
    await asyncio.wait_for(task, 5)
    assert started == finished
    counts = await queue.get_job_counts("active", "waiting", "prioritized", "completed")
    assert counts["active"] == 0
    assert counts["completed"] == len(finished)
    assert counts["waiting"] + counts["prioritized"] == 200 - len(finished)


def slow_completion(worker: Any, n: int, delay_s: float) -> asyncio.Event:
    """Delay the Redis call that completes job ``n`` (and fetches the next one); the event is
    set when that call starts."""
    bull = worker.bullmq_worker
    complete = bull._move_to_completed
    started = asyncio.Event()

    async def slow(job: Any, *args: Any) -> Any:
        if job.data.get("n") == n:
            started.set()
            await asyncio.sleep(delay_s)
        return await complete(job, *args)

    bull._move_to_completed = slow
    return started


async def test_a_graceful_close_waits_for_a_job_its_last_completion_brought(
    bull_qf: QueueFactory,
) -> None:
    """Job 0's completion is in flight (it will bring job 1, already locked to this worker)
    when the worker closes: the close waits for job 1, whose lock keeps being renewed (it runs
    longer than the lock lasts), and job 1 completes."""
    queue = bull_qf.create_queue(TEST_QUEUE)
    events: list[tuple[str, int]] = []

    async def process(payload: Probe, ctx: JobContext) -> None:
        events.append(("start", payload.n))
        await asyncio.sleep(0.01 if payload.n == 0 else 1.6)
        events.append(("end", payload.n))

    worker = bull_qf.create_worker(TEST_QUEUE, process, concurrency=1, lock_duration_ms=1000)
    completing = slow_completion(worker, 0, 0.3)
    await queue.add(Probe(n=0))
    await queue.add(Probe(n=1))
    task = asyncio.create_task(worker.run())
    await completing.wait()
    await worker.close(timeout_s=10)
    assert events == [("start", 0), ("end", 0), ("start", 1), ("end", 1)]
    await asyncio.wait_for(task, 5)
    counts = await queue.get_job_counts("active", "completed")
    assert counts == {"active": 0, "completed": 2}


async def test_a_job_fetched_before_a_pause_runs_once(bull_qf: QueueFactory) -> None:
    """Jobs a completion brings back after ``pause()`` are started (tracked, lock renewed),
    not left untracked to be found stalled and run twice."""
    queue = bull_qf.create_queue(TEST_QUEUE)
    starts: Counter[int] = Counter()
    stalled: list[str | None] = []

    async def process(payload: Probe, ctx: JobContext) -> None:
        starts[payload.n] += 1
        await asyncio.sleep(0.15 if payload.n == 1 else 0.01)

    worker = bull_qf.create_worker(
        TEST_QUEUE, process, concurrency=2, lock_duration_ms=1000, stalled_interval_ms=500
    )
    worker.on("stalled", lambda event: stalled.append(event.job_id))
    bull = worker.bullmq_worker  # type: ignore[attr-defined]
    completing = slow_completion(worker, 0, 0.3)
    for n in range(3):
        await queue.add(Probe(n=n))
    async with running(worker):
        await completing.wait()
        await bull.pause()
        await eventually(lambda: starts[2] == 1)  # brought by job 0's completion
        await asyncio.sleep(2.0)  # several lock lengths and stalled checks
        bull.resume()
        await asyncio.sleep(0.3)
    assert starts == Counter({0: 1, 1: 1, 2: 1})
    assert stalled == []


async def test_a_failure_after_a_job_completed_does_not_fail_it(bull_qf: QueueFactory) -> None:
    """If taking the job that came back with a completion fails, the completed job stays
    completed (bullmq would call moveToFailed on it); the worker carries on."""
    queue = bull_qf.create_queue(TEST_QUEUE)
    done: Counter[int] = Counter()
    failed: list[str | None] = []
    errors: list[BaseException | None] = []

    async def process(payload: Probe, ctx: JobContext) -> None:
        done[payload.n] += 1

    worker = bull_qf.create_worker(
        TEST_QUEUE, process, concurrency=1, lock_duration_ms=1000, stalled_interval_ms=500
    )
    worker.on("failed", lambda event: failed.append(event.job_id))
    worker.on("error", lambda event: errors.append(event.error))
    bull = worker.bullmq_worker  # type: ignore[attr-defined]
    take = bull._next_from
    calls = 0

    async def broken_once(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("could not take the next job")
        return await take(*args)

    bull._next_from = broken_once
    await queue.add_bulk([(Probe(n=n), {}) for n in range(3)])
    async with running(worker):
        # the job stranded by the failure is recovered by the stalled-job check
        await eventually(lambda: len(done) == 3, within=8)
    assert failed == []
    assert any(isinstance(e, RuntimeError) for e in errors)
    counts = await queue.get_job_counts("completed", "failed", "active")
    assert counts == {"completed": 3, "failed": 0, "active": 0}
