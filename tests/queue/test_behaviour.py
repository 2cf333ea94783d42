"""Behaviour every driver must show; each test runs against ``bullmq`` (real Redis) and ``inmemory``."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import bullmq
import pytest

from conveyor.errors import PayloadInvalid
from conveyor.queue import JobContext, JobDeferred, QueueEvent, QueueFactory
from tests.conftest import REDIS_HOST, REDIS_PORT
from tests.queue.conftest import TEST_QUEUE, eventually, running
from tests.queue.payload import Probe


async def raw_add(qf: QueueFactory, data: Any, job_id: str) -> None:
    """Enqueue ``data`` unvalidated, as a foreign producer could."""
    if qf.driver == "inmemory":
        qf.create_queue(TEST_QUEUE).add_raw(data, job_id)  # type: ignore[attr-defined]
        return
    raw = bullmq.Queue(
        TEST_QUEUE,
        {
            "connection": {"host": REDIS_HOST, "port": REDIS_PORT},
            "prefix": qf.settings.queue_prefix,
        },
    )
    try:
        await raw.add("foreign", data, {"jobId": job_id, "attempts": 3})
    finally:
        await raw.close()


async def test_processor_gets_typed_payload_and_context(qf: QueueFactory) -> None:
    queue = qf.create_queue(TEST_QUEUE)
    seen: list[tuple[Probe, JobContext]] = []

    async def process(payload: Probe, ctx: JobContext) -> dict[str, int]:
        seen.append((payload, ctx))
        return {"double": payload.n * 2}

    first = await queue.add(Probe(n=1, tag="model"), job_id="job-1")
    second = await queue.add({"n": 2, "unknownKey": True})
    assert first == "job-1" and second
    async with running(qf.create_worker(TEST_QUEUE, process)):
        await eventually(lambda: len(seen) == 2)
        await eventually(lambda: queue.get_job_state("job-1"), within=2)
        await eventually(lambda: _state_is(queue, "job-1", "completed"))
    payloads = sorted(seen, key=lambda item: item[0].n)
    assert payloads[0][0] == Probe(n=1, tag="model")
    assert isinstance(payloads[1][0], Probe) and payloads[1][0].n == 2
    ctx = payloads[0][1]
    assert (ctx.id, ctx.queue_name, ctx.attempts_made) == ("job-1", TEST_QUEUE, 0)
    assert ctx.timestamp_ms > 0 and not ctx.lock_lost.is_set()
    counts = await queue.get_job_counts()
    assert counts["completed"] == 2 and counts["waiting"] == 0 and counts["active"] == 0
    assert set(counts) == {
        "waiting",
        "active",
        "delayed",
        "prioritized",
        "completed",
        "failed",
        "paused",
    }


async def _state_is(queue: Any, job_id: str, state: str) -> bool:
    return bool(await queue.get_job_state(job_id) == state)


async def test_enqueue_validates_and_names_the_bad_field(qf: QueueFactory) -> None:
    queue = qf.create_queue(TEST_QUEUE)
    with pytest.raises(PayloadInvalid, match=r"n: Input should be a valid integer"):
        await queue.add({"n": "many"})
    with pytest.raises(PayloadInvalid, match=r"n: Field required") as info:
        await queue.add({"tag": "no n"})
    assert info.value.details["errors"] == [{"field": "n", "message": "Field required"}]
    with pytest.raises(ValueError, match="non-integer"):
        await queue.add(Probe(n=1), job_id="42")
    assert (await queue.get_job_counts("waiting")) == {"waiting": 0}


async def test_job_id_dedupes(qf: QueueFactory) -> None:
    queue = qf.create_queue(TEST_QUEUE)
    assert await queue.add(Probe(n=1), job_id="same") == "same"
    assert await queue.add(Probe(n=2), job_id="same") == "same"
    assert await queue.add_bulk(
        [(Probe(n=3), {"job_id": "same"}), (Probe(n=4), {"job_id": "other"})]
    ) == [
        "same",
        "other",
    ]
    assert (await queue.get_job_counts("waiting"))["waiting"] == 2


async def test_priorities_order_jobs(qf: QueueFactory) -> None:
    queue = qf.create_queue(TEST_QUEUE)
    order: list[str] = []

    async def process(payload: Probe, ctx: JobContext) -> None:
        order.append(payload.tag)

    await queue.add(Probe(n=1, tag="plain-1"))
    await queue.add(Probe(n=2, tag="low"), priority=50)
    await queue.add(Probe(n=3, tag="high"), priority=1)
    await queue.add(Probe(n=4, tag="plain-2"))
    counts = await queue.get_job_counts("waiting", "prioritized")
    assert counts == {"waiting": 2, "prioritized": 2}
    async with running(qf.create_worker(TEST_QUEUE, process, concurrency=1)):
        await eventually(lambda: len(order) == 4)
    assert order == ["plain-1", "plain-2", "high", "low"]


async def test_delay_and_promote(qf: QueueFactory) -> None:
    queue = qf.create_queue(TEST_QUEUE)
    done: dict[str, float] = {}

    async def process(payload: Probe, ctx: JobContext) -> None:
        done[ctx.id] = time.monotonic()

    start = time.monotonic()
    await queue.add(Probe(n=1), job_id="later", delay_ms=60_000)
    await queue.add(Probe(n=2), job_id="soon", delay_ms=400)
    assert await queue.get_job_state("later") == "delayed"
    assert (await queue.get_job_counts("delayed"))["delayed"] == 2
    async with running(qf.create_worker(TEST_QUEUE, process)):
        await eventually(lambda: "soon" in done, within=5)
        assert done["soon"] - start >= 0.35
        assert "later" not in done
        assert await queue.promote("later") is True
        await eventually(lambda: "later" in done, within=5)
        await eventually(lambda: _state_is(queue, "later", "completed"))
    assert await queue.promote("later") is False
    assert await queue.promote("missing") is False


async def test_job_deferred_goes_back_to_delayed_without_using_an_attempt(qf: QueueFactory) -> None:
    queue = qf.create_queue(TEST_QUEUE)
    calls: list[tuple[int, float]] = []
    failed: list[QueueEvent] = []
    events = qf.create_queue_events(TEST_QUEUE)
    events.on("failed", failed.append)
    events.start()

    async def process(payload: Probe, ctx: JobContext) -> str:
        calls.append((ctx.attempts_made, time.monotonic()))
        if len(calls) == 1:
            raise JobDeferred(300)
        return "done"

    await asyncio.sleep(0.05)
    await queue.add(Probe(n=1), job_id="defer-me")
    async with running(qf.create_worker(TEST_QUEUE, process)):
        await eventually(lambda: len(calls) == 1)
        await eventually(lambda: _state_is(queue, "defer-me", "delayed"), within=2)
        await eventually(lambda: len(calls) == 2, within=5)
        await eventually(lambda: _state_is(queue, "defer-me", "completed"))
    assert [attempts for attempts, _ in calls] == [0, 0]
    assert calls[1][1] - calls[0][1] >= 0.25
    assert failed == []


async def test_a_parked_job_comes_back_knowing_it_was_parked(qf: QueueFactory) -> None:
    """A job deferred as parked (held back by a limit) runs again with ``ctx.parked`` set;
    one deferred for another reason, or never deferred, without (the worker's fleet limits
    send a parked job through the acquire script, which drops its parked entry)."""
    queue = qf.create_queue(TEST_QUEUE)
    seen: dict[str, list[bool]] = {}

    async def process(payload: Probe, ctx: JobContext) -> str:
        runs = seen.setdefault(ctx.id, [])
        runs.append(ctx.parked)
        if len(runs) == 1 and ctx.id != "plain":
            raise JobDeferred(50, "tenant limit", parked=ctx.id == "parked")
        return "done"

    for job_id in ("parked", "deferred", "plain"):
        await queue.add(Probe(n=1), job_id=job_id)
    async with running(qf.create_worker(TEST_QUEUE, process)):
        await eventually(lambda: sum(map(len, seen.values())) == 5, within=5)
    assert seen == {"parked": [False, True], "deferred": [False, False], "plain": [False]}


async def test_concurrency_is_honoured(qf: QueueFactory) -> None:
    queue = qf.create_queue(TEST_QUEUE)
    in_flight = 0
    peak = 0
    finished = 0

    async def process(payload: Probe, ctx: JobContext) -> None:
        nonlocal in_flight, peak, finished
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.15)
        in_flight -= 1
        finished += 1

    await queue.add_bulk([(Probe(n=i), {}) for i in range(7)])
    worker = qf.create_worker(TEST_QUEUE, process, concurrency=3)
    async with running(worker):
        await eventually(lambda: worker.active_count == 3, within=3)
        await eventually(lambda: finished == 7, within=5)
    assert peak == 3


async def test_failures_retry_or_not(qf: QueueFactory) -> None:
    """PayloadInvalid fails at once; other errors retry up to ``attempts`` (3 here)."""
    queue = qf.create_queue(TEST_QUEUE)
    calls: dict[int, list[int]] = {1: [], 2: [], 3: []}
    failed: dict[str, str] = {}
    events = qf.create_queue_events(TEST_QUEUE)
    events.on("failed", lambda e: failed.__setitem__(str(e.job_id), str(e.data["failedReason"])))
    events.start()

    async def process(payload: Probe, ctx: JobContext) -> None:
        calls[payload.n].append(ctx.attempts_made)
        if payload.n == 1:
            raise PayloadInvalid("the payload makes no sense")
        if payload.n == 2 and ctx.attempts_made == 0:
            raise RuntimeError("flaky")
        if payload.n == 3:
            raise RuntimeError("always broken")

    await asyncio.sleep(0.05)
    for n in (1, 2, 3):
        await queue.add(Probe(n=n), job_id=f"job-{n}")
    async with running(qf.create_worker(TEST_QUEUE, process)):
        await eventually(lambda: len(failed) == 2, within=5)
        await eventually(lambda: _state_is(queue, "job-2", "completed"))
    assert calls == {1: [0], 2: [0, 1], 3: [0, 1, 2]}
    assert failed == {"job-1": "the payload makes no sense", "job-3": "always broken"}
    assert (await queue.get_job_counts("failed", "completed")) == {"failed": 2, "completed": 1}


async def test_invalid_payload_fails_without_retry_and_worker_keeps_running(
    qf: QueueFactory,
) -> None:
    queue = qf.create_queue(TEST_QUEUE)
    reasons: dict[str, str] = {}
    events = qf.create_queue_events(TEST_QUEUE)
    events.on("failed", lambda e: reasons.__setitem__(str(e.job_id), str(e.data["failedReason"])))
    events.start()
    processed: list[int] = []

    async def process(payload: Probe, ctx: JobContext) -> None:
        processed.append(payload.n)

    await asyncio.sleep(0.05)
    await raw_add(qf, {"n": "not a number", "tag": 7}, "bad-job")
    worker = qf.create_worker(TEST_QUEUE, process)
    async with running(worker) as task:
        await eventually(lambda: "bad-job" in reasons, within=5)
        await queue.add(Probe(n=5))
        await eventually(lambda: processed == [5], within=5)
        assert not task.done()
    assert "invalid payload for queue conveyor.test.q" in reasons["bad-job"]
    assert "n: Input should be a valid integer" in reasons["bad-job"]
    assert "tag: Input should be a valid string" in reasons["bad-job"]
    assert await queue.get_job_state("bad-job") == "failed"
    assert (await queue.get_job_counts("failed", "waiting", "delayed")) == {
        "failed": 1,
        "waiting": 0,
        "delayed": 0,
    }


async def test_remove(qf: QueueFactory) -> None:
    queue = qf.create_queue(TEST_QUEUE)
    await queue.add(Probe(n=1), job_id="gone")
    assert await queue.remove("gone") is True
    assert await queue.get_job_state("gone") is None
    assert await queue.remove("gone") is False
    assert (await queue.get_job_counts("waiting"))["waiting"] == 0


async def test_close_is_bounded_and_unfinished_work_is_not_lost(qf: QueueFactory) -> None:
    queue = qf.create_queue(TEST_QUEUE)
    started = asyncio.Event()

    async def process(payload: Probe, ctx: JobContext) -> None:
        started.set()
        await asyncio.sleep(30)

    await queue.add(Probe(n=1), job_id="slow")
    worker = qf.create_worker(TEST_QUEUE, process)
    task = asyncio.create_task(worker.run())
    await asyncio.wait_for(started.wait(), 5)
    begin = time.monotonic()
    await worker.close(timeout_s=0.3)
    await asyncio.wait_for(task, 5)
    assert time.monotonic() - begin < 2.5
    # bullmq: still active until its lock expires and a stalled check re-queues it;
    # inmemory: re-queued at once. Either way it was neither completed nor failed.
    assert await queue.get_job_state("slow") in ("active", "waiting")
    await worker.close()  # idempotent
