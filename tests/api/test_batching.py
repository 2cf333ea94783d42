"""Enqueue group commit (``conveyor.api.batching``): unit tests against a recording dispatcher,
plus concurrent triggers through the API landing on the real queue."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest

from conveyor.dispatch import EnqueueBatcher
from conveyor.errors import QueueUnavailable
from conveyor.queue import WorkflowExecute
from tests.api.conftest import Api


def _payload(n: int) -> WorkflowExecute:
    return WorkflowExecute(
        execution_id=f"e{n}", tenant_id="t", workflow_id="w", region="us", reason="api"
    )


class Recorder:
    """Stands in for ExecutionDispatcher: records calls, can fail or stall."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.fail: Exception | None = None
        self.gate: asyncio.Event | None = None

    async def enqueue(self, payload: WorkflowExecute) -> str:
        await self._record([payload])
        return payload.execution_id

    async def enqueue_many(self, payloads: Sequence[WorkflowExecute]) -> list[str]:
        await self._record(payloads)
        return [p.execution_id for p in payloads]

    async def _record(self, payloads: Sequence[WorkflowExecute]) -> None:
        self.calls.append([p.execution_id for p in payloads])
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(0)
        if self.fail is not None:
            raise self.fail


def _batcher(recorder: Recorder, **kwargs: Any) -> EnqueueBatcher:
    return EnqueueBatcher(recorder.enqueue, recorder.enqueue_many, **kwargs)


async def test_lone_and_concurrent_enqueues() -> None:
    recorder = Recorder()
    batcher = _batcher(recorder)
    await batcher.enqueue(_payload(0))
    assert recorder.calls == [["e0"]]
    await asyncio.gather(*(batcher.enqueue(_payload(n)) for n in range(1, 6)))
    assert recorder.calls[1:] == [["e1", "e2", "e3", "e4", "e5"]]


async def test_an_enqueue_made_as_the_sender_finishes_is_sent() -> None:
    """A caller woken by the end of a batch that enqueues again at once (before the finished
    sender's task is cleaned up) is sent, not left waiting for a sender that has gone.
    (Seen as a 3 s wait and a 503 for 1 in ~12 bursts of concurrent triggers.)"""
    recorder = Recorder()
    batcher = _batcher(recorder)

    async def two_in_a_row() -> None:
        await batcher.enqueue(_payload(0))
        await batcher.enqueue(_payload(1))

    await asyncio.wait_for(two_in_a_row(), 2)
    assert recorder.calls == [["e0"], ["e1"]]


async def test_arrivals_during_a_send_go_together_next() -> None:
    recorder = Recorder()
    recorder.gate = asyncio.Event()
    batcher = _batcher(recorder, max_batch=3, max_in_flight=1)
    first = asyncio.create_task(batcher.enqueue(_payload(0)))
    await asyncio.sleep(0.01)
    later = [asyncio.create_task(batcher.enqueue(_payload(n))) for n in range(1, 6)]
    await asyncio.sleep(0.01)
    assert recorder.calls == [["e0"]] and not first.done()
    recorder.gate.set()
    await asyncio.gather(first, *later)
    assert recorder.calls == [["e0"], ["e1", "e2", "e3"], ["e4", "e5"]]


async def test_a_second_batch_goes_while_the_first_is_on_its_way() -> None:
    recorder = Recorder()
    recorder.gate = asyncio.Event()
    batcher = _batcher(recorder, max_in_flight=2)
    first = asyncio.create_task(batcher.enqueue(_payload(0)))
    await asyncio.sleep(0.01)
    second = [asyncio.create_task(batcher.enqueue(_payload(n))) for n in (1, 2)]
    await asyncio.sleep(0.01)
    third = [asyncio.create_task(batcher.enqueue(_payload(n))) for n in (3, 4)]
    await asyncio.sleep(0.01)
    assert recorder.calls == [["e0"], ["e1", "e2"]], "two in flight, the third batch waits"
    recorder.gate.set()
    await asyncio.gather(first, *second, *third)
    assert recorder.calls[2:] == [["e3", "e4"]]


async def test_failure_reaches_every_caller_of_the_batch_only() -> None:
    recorder = Recorder()
    batcher = _batcher(recorder)
    recorder.fail = QueueUnavailable("redis is down")
    results = await asyncio.gather(
        *(batcher.enqueue(_payload(n)) for n in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, QueueUnavailable) for r in results)
    recorder.fail = None
    await batcher.enqueue(_payload(9))
    assert recorder.calls[-1] == ["e9"]


async def test_a_caller_giving_up_does_not_withdraw_its_job() -> None:
    recorder = Recorder()
    recorder.gate = asyncio.Event()
    batcher = _batcher(recorder)
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await batcher.enqueue(_payload(0))
    other = asyncio.create_task(batcher.enqueue(_payload(1)))
    recorder.gate.set()
    await other
    assert recorder.calls == [["e0"], ["e1"]]


async def test_concurrent_triggers_all_land_on_the_queue(api: Api) -> None:
    auth = await api.tenant()
    wf = await api.workflow(auth)
    url = f"/api/workflows/{wf}/executions"
    answers = await asyncio.gather(
        *(api.client.post(url, json={"input": n}, headers=auth) for n in range(24))
    )
    assert [r.status_code for r in answers] == [202] * 24
    queue = api.ctx.execution_queue("us")
    for r in answers:
        state = await queue.get_job_state(r.json()["data"]["id"])
        assert state in ("waiting", "prioritized")
    counts = await queue.get_job_counts("waiting", "prioritized")
    assert sum(counts.values()) == 24


async def test_close_waits_then_cancels_a_stuck_batch() -> None:
    recorder = Recorder()
    recorder.gate = asyncio.Event()
    batcher = _batcher(recorder)
    waiter = asyncio.create_task(batcher.enqueue(_payload(0)))
    await asyncio.sleep(0.01)
    await batcher.close(timeout_s=0.05)
    with pytest.raises(asyncio.CancelledError):
        await waiter
    await batcher.close()  # nothing left: returns at once
