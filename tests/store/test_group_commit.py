"""GroupCommit (``conveyor.store._group_commit``): a lone item goes at once on its own, items
arriving while a batch is on its way go together next, each caller gets its own result, and a
failed batch fails every caller of that batch only."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest

from conveyor.errors import Conflict, DatabaseUnavailable, NotFound
from conveyor.store import Store
from conveyor.store._group_commit import MAX_BATCH, GroupCommit


class Recorder:
    """Stands in for the statements: records batches, can fail or stall."""

    def __init__(self) -> None:
        self.calls: list[list[int]] = []
        self.fail: Exception | None = None
        self.gate: asyncio.Event | None = None

    async def one(self, item: int) -> str:
        return (await self.many([item]))[0]

    async def many(self, items: Sequence[int]) -> list[str]:
        self.calls.append(list(items))
        if self.gate is not None:
            await self.gate.wait()
        await asyncio.sleep(0)
        if self.fail is not None:
            raise self.fail
        return [f"r{n}" for n in items]


def _group(recorder: Recorder, *, max_batch: int = MAX_BATCH) -> GroupCommit[int, str]:
    return GroupCommit(recorder.one, recorder.many, name="test", max_batch=max_batch)


async def test_an_item_whose_caller_was_cancelled_is_told_to_orphaned() -> None:
    """A caller cancelled while its batch is on its way: its item is still stored (the batch
    is not withdrawn), the others get their results, and ``orphaned`` is told of the
    cancelled caller's item and result — what was stored for nobody."""
    recorder = Recorder()
    recorder.gate = asyncio.Event()
    orphans: list[tuple[int, str]] = []
    group = GroupCommit(
        recorder.one, recorder.many, name="test", orphaned=lambda i, r: orphans.append((i, r))
    )
    callers = [asyncio.create_task(group.submit(n)) for n in range(3)]
    await asyncio.sleep(0.01)
    assert recorder.calls == [[0, 1, 2]]  # on its way
    callers[1].cancel()
    recorder.gate.set()
    assert await callers[0] == "r0" and await callers[2] == "r2"
    with pytest.raises(asyncio.CancelledError):
        await callers[1]
    assert orphans == [(1, "r1")]


async def test_lone_item_goes_at_once_and_concurrent_ones_share_a_batch() -> None:
    recorder = Recorder()
    group = _group(recorder)
    assert await group.submit(0) == "r0"
    assert recorder.calls == [[0]]
    results = await asyncio.gather(*(group.submit(n) for n in range(1, 6)))
    assert results == ["r1", "r2", "r3", "r4", "r5"], "each caller gets its own result"
    assert recorder.calls[1:] == [[1, 2, 3, 4, 5]], "submitted in one turn: one batch"
    assert (group.batches, group.items) == (2, 6)


async def test_arrivals_during_a_send_go_together_next() -> None:
    recorder = Recorder()
    recorder.gate = asyncio.Event()
    group = _group(recorder, max_batch=3)
    first = asyncio.create_task(group.submit(0))
    await asyncio.sleep(0.01)
    later = [asyncio.create_task(group.submit(n)) for n in range(1, 6)]
    await asyncio.sleep(0.01)
    assert recorder.calls == [[0]] and group.waiting == 5 and not first.done()
    recorder.gate.set()
    assert await asyncio.gather(first, *later) == [f"r{n}" for n in range(6)]
    assert recorder.calls == [[0], [1, 2, 3], [4, 5]]


async def test_failure_reaches_every_caller_of_the_batch_only() -> None:
    recorder = Recorder()
    recorder.gate = asyncio.Event()
    group = _group(recorder)
    first = asyncio.create_task(group.submit(0))
    await asyncio.sleep(0.01)
    batch = [asyncio.create_task(group.submit(n)) for n in (1, 2, 3)]
    await asyncio.sleep(0.01)
    recorder.fail = DatabaseUnavailable("database is down")
    recorder.gate.set()
    results = await asyncio.gather(first, *batch, return_exceptions=True)
    assert all(isinstance(r, DatabaseUnavailable) for r in results)
    recorder.fail = None
    assert await group.submit(9) == "r9", "the next batch goes as usual"


async def test_a_short_answer_fails_the_batch() -> None:
    recorder = Recorder()

    async def short(items: Sequence[int]) -> list[str]:
        return ["x"]

    group: GroupCommit[int, str] = GroupCommit(recorder.one, short, name="test")
    gate = asyncio.Event()
    recorder.gate = gate
    first = asyncio.create_task(group.submit(0))
    await asyncio.sleep(0.01)
    rest = [asyncio.create_task(group.submit(n)) for n in (1, 2)]
    await asyncio.sleep(0.01)
    gate.set()
    assert await first == "r0"
    for task in rest:
        with pytest.raises(RuntimeError):
            await task


async def test_an_item_submitted_as_the_sender_finishes_is_sent() -> None:
    recorder = Recorder()
    group = _group(recorder)

    async def two_in_a_row() -> list[str]:
        return [await group.submit(0), await group.submit(1)]

    assert await asyncio.wait_for(two_in_a_row(), 2) == ["r0", "r1"]
    assert recorder.calls == [[0], [1]]


NOOP = {"name": "wf", "steps": [{"id": "a", "type": "noop"}]}


async def test_one_batch_mixing_workflows_tenants_and_keys(store: Store) -> None:
    """One batch (on both databases): keys are per tenant, a key reused for another workflow
    of the same tenant is a Conflict, a disabled or missing workflow fails only its own
    request, and the others are created."""
    acme = (await store.tenants.create("acme")).id
    globex = (await store.tenants.create("globex")).id
    wf1 = (await store.workflows.create(acme, NOOP)).id
    wf2 = (await store.workflows.create(acme, NOOP)).id
    wf3 = (await store.workflows.create(globex, NOOP)).id
    for tenant, wf in ((acme, wf1), (acme, wf2), (globex, wf3)):
        await store.executions.create(tenant, wf)  # this process learns the versions
    group = store.executions.group_commit
    calls = [
        store.executions.create(acme, wf1),
        store.executions.create(acme, wf1, {"n": 1}, idempotency_key="k"),
        store.executions.create(acme, wf2, {"n": 2}, idempotency_key="k"),
        store.executions.create(globex, wf3, {"n": 3}, idempotency_key="k"),
        store.executions.create(globex, wf1, {"n": 4}),  # another tenant's workflow
        store.executions.create(acme, wf1, {"n": 5}),
    ]
    batches = group.batches
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert group.batches - batches == 1, "submitted in one turn: one batch"
    held, first, second, third, missing, plain = results
    assert not isinstance(held, BaseException) and held[1]
    assert not isinstance(first, BaseException) and first[1]
    assert isinstance(second, Conflict), "the key was used for another workflow"
    assert not isinstance(third, BaseException) and third[1], "keys are per tenant"
    assert third[0].id != first[0].id and third[0].tenant_id == globex
    assert isinstance(missing, NotFound)
    assert not isinstance(plain, BaseException) and plain[1]
    page = await store.executions.list(acme, workflow_id=wf2)
    assert len(page.items) == 1, "nothing stored for the conflicting key"
