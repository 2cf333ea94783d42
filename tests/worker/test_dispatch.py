"""The dispatcher's fairness priorities and the worker's ledger, against the real Redis."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from conveyor.dispatch import ExecutionDispatcher, FairnessLedger, keys
from conveyor.errors import QueueUnavailable
from conveyor.queue import QueueFactory
from tests.helpers import free_port, redis_server
from tests.worker._support import make_settings, payload

QUEUE = "workflow.execute.us"


@pytest.fixture
async def qf(redis_prefix: str) -> AsyncIterator[QueueFactory]:
    async with QueueFactory(make_settings(redis_prefix)) as factory:
        yield factory


async def _order(client: aioredis.Redis, prefix: str) -> list[str]:
    """Job ids in the order BullMQ will hand them out (prioritized set)."""
    ids = await client.zrange(f"{prefix}:{QUEUE}:prioritized", 0, -1)
    return [str(i) for i in ids]


async def test_priorities_round_robin_tenants(
    qf: QueueFactory, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    dispatcher = ExecutionDispatcher(qf, qf.settings)
    a_ids = [await dispatcher.enqueue(payload("tenant-a", f"a-{i}")) for i in range(5)]
    b_id = await dispatcher.enqueue(payload("tenant-b", "b-0"))
    assert a_ids == [f"a-{i}" for i in range(5)] and b_id == "b-0"
    order = await _order(redis_client, redis_prefix)
    assert order[:3] == ["a-0", "b-0", "a-1"]  # B's first job goes right behind A's first
    assert await redis_client.hget(f"{redis_prefix}:{QUEUE}:a-4", "priority") == "5"
    counts = await redis_client.hgetall(keys.fair(qf.settings.queue_prefix, QUEUE))
    assert counts == {"tenant-a": "5", "tenant-b": "1"}
    job = await redis_client.hget(f"{redis_prefix}:{QUEUE}:b-0", "data")
    assert job is not None and '"enqueuedAt"' in job and '"enqueuedAt": null' not in job


async def test_duplicate_dispatch_is_not_counted(
    qf: QueueFactory, redis_client: aioredis.Redis
) -> None:
    dispatcher = ExecutionDispatcher(qf, qf.settings)
    p = payload("tenant-a", "same-1")
    assert await dispatcher.enqueue(p) == "same-1"
    assert await dispatcher.enqueue(p) == "same-1"
    assert await dispatcher.enqueue_many([p, p]) == ["same-1", "same-1"]
    assert await redis_client.hget(keys.fair(qf.settings.queue_prefix, QUEUE), "tenant-a") == "1"


async def test_enqueue_many_counts_per_tenant(
    qf: QueueFactory, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    dispatcher = ExecutionDispatcher(qf, qf.settings)
    await dispatcher.enqueue(payload("tenant-a", "first-a"))
    batch = [payload("tenant-a", f"a-{i}") for i in range(3)] + [payload("tenant-b", "b-0")]
    ids = await dispatcher.enqueue_many(batch)
    assert ids == ["a-0", "a-1", "a-2", "b-0"]
    prios = {i: await redis_client.hget(f"{redis_prefix}:{QUEUE}:{i}", "priority") for i in ids}
    assert prios == {"a-0": "2", "a-1": "3", "a-2": "4", "b-0": "1"}
    assert (await _order(redis_client, redis_prefix))[:2] == ["first-a", "b-0"]


async def test_newcomers_wait_one_round_at_most_and_a_busy_tenant_one_round_per_job(
    qf: QueueFactory, redis_client: aioredis.Redis, redis_prefix: str
) -> None:
    """The bounds docs/fairness.md states: a tenant with nothing pending joins the end of the
    first round while it runs, and goes ahead of every later round once it has run; each further
    pending job of a tenant waits one round more."""
    dispatcher = ExecutionDispatcher(qf, qf.settings)
    heavy = ["tenant-a", "tenant-b", "tenant-c"]
    await dispatcher.enqueue_many([payload(t, f"{t[-1]}-{k}") for k in range(3) for t in heavy])
    await dispatcher.enqueue(payload("tenant-n", "n-0"))  # arrives with the first round
    order = await _order(redis_client, redis_prefix)
    assert order[:5] == ["a-0", "b-0", "c-0", "n-0", "a-1"]
    # the first round runs: its jobs leave the queue and the worker's ledger counts them started
    ledger = FairnessLedger(qf, qf.settings, [QUEUE])
    for job_id in order[:4]:
        assert await redis_client.zrem(f"{redis_prefix}:{QUEUE}:prioritized", job_id) == 1
        ledger.started(QUEUE, f"tenant-{job_id[0]}")
    await ledger.flush()
    await dispatcher.enqueue(payload("tenant-m", "m-0"))  # a newcomer now: ahead of round 2
    await dispatcher.enqueue(payload("tenant-n", "n-1"))  # nothing pending any more: the same
    await dispatcher.enqueue(payload("tenant-n", "n-2"))  # its 2nd pending job: a round later
    order = await _order(redis_client, redis_prefix)
    assert order == ["m-0", "n-1", "a-1", "b-1", "c-1", "n-2", "a-2", "b-2", "c-2"]


async def test_ledger_decrements_in_batches_and_clamps(
    qf: QueueFactory, redis_client: aioredis.Redis
) -> None:
    dispatcher = ExecutionDispatcher(qf, qf.settings)
    await dispatcher.enqueue_many([payload("tenant-a", f"a-{i}") for i in range(4)])
    ledger = FairnessLedger(qf, qf.settings, [QUEUE])
    for _ in range(3):
        ledger.started(QUEUE, "tenant-a")
    ledger.started(QUEUE, "tenant-x")  # never counted (e.g. an external producer): floor at 0
    await ledger.flush()
    key = keys.fair(qf.settings.queue_prefix, QUEUE)
    assert await redis_client.hgetall(key) == {"tenant-a": "1"}
    await redis_client.hset(key, mapping={"tenant-a": 1000, "ghost": 7})  # drift
    backlog = await ledger.clamp()
    assert backlog == {QUEUE: 4}
    assert await redis_client.hgetall(key) == {"tenant-a": "4", "ghost": "4"}
    # an empty queue resets the counters
    await redis_client.delete(f"{qf.settings.queue_prefix}:{QUEUE}:prioritized")
    assert await ledger.clamp() == {QUEUE: 0}
    assert await redis_client.exists(key) == 0


async def test_a_deferred_job_is_pending_again(
    qf: QueueFactory, redis_client: aioredis.Redis
) -> None:
    """A job that started and went back to the queue (deferred: the database down, the
    execution busy elsewhere) counts as pending again — when its decrement already went, as an
    increment — so its next start does not lower the tenant's count below its backlog (the
    clamp only lowers counts: a count too low would let the tenant's next enqueues jump its own
    backlog)."""
    dispatcher = ExecutionDispatcher(qf, qf.settings)
    await dispatcher.enqueue_many([payload("tenant-a", f"a-{i}") for i in range(3)])
    key = keys.fair(qf.settings.queue_prefix, QUEUE)
    ledger = FairnessLedger(qf, qf.settings, [QUEUE])
    ledger.started(QUEUE, "tenant-a")
    ledger.started(QUEUE, "tenant-a")
    await ledger.flush()
    assert await redis_client.hget(key, "tenant-a") == "1"
    ledger.unstarted(QUEUE, "tenant-a")  # one of the two deferred after its decrement went
    await ledger.flush()
    assert await redis_client.hget(key, "tenant-a") == "2"
    ledger.started(QUEUE, "tenant-a")  # started and deferred within one flush: no change
    ledger.unstarted(QUEUE, "tenant-a")
    await ledger.flush()
    assert await redis_client.hget(key, "tenant-a") == "2"
    ledger.started(QUEUE, "tenant-a")  # the deferred job and the third run
    ledger.started(QUEUE, "tenant-a")
    await ledger.flush()
    assert await redis_client.hget(key, "tenant-a") is None


async def test_enqueue_fails_fast_when_redis_is_down(redis_prefix: str) -> None:
    settings = make_settings(redis_prefix, QUEUE_REDIS_PORT=str(free_port()))
    async with QueueFactory(settings) as factory:
        dispatcher = ExecutionDispatcher(factory, settings)
        started = time.monotonic()
        with pytest.raises(QueueUnavailable):
            await dispatcher.enqueue(payload("tenant-a"))
        assert time.monotonic() - started < 5


async def _calls(client: aioredis.Redis) -> dict[str, int]:
    stats = await client.info("commandstats")
    return {k.removeprefix("cmdstat_"): int(v["calls"]) for k, v in stats.items()}


async def test_an_enqueue_is_one_round_trip_and_a_wrong_guess_is_corrected(
    redis_prefix: str,
) -> None:
    """Count and add go in one MULTI; the add's priority is a guess (1 for a tenant without
    backlog, else one more than this process last counted), re-ranked (without holding the
    caller) when the count differs."""
    with redis_server() as server:
        settings = make_settings(redis_prefix, QUEUE_REDIS_PORT=str(server.port))
        client = aioredis.Redis(host="127.0.0.1", port=server.port, decode_responses=True)
        async with QueueFactory(settings) as factory:
            here = ExecutionDispatcher(factory, settings)
            elsewhere = ExecutionDispatcher(factory, settings)  # another producer process
            await elsewhere.enqueue(payload("warm-up", "w-0"))
            await here.enqueue(payload("warm-up", "w-1"))  # scripts loaded (re-rank's too)
            before = await _calls(client)
            await here.enqueue(payload("tenant-b", "b-0"))  # no backlog: guessed 1, right
            await here.enqueue(payload("tenant-b", "b-1"))  # this process counted 1: guess 2
            after = await _calls(client)
            assert after["exec"] - before["exec"] == 2
            assert after["evalsha"] - before["evalsha"] == 4  # count + add, twice; no re-rank
            assert after.get("script|exists") == before.get("script|exists")  # no extra trip
            for i in range(3):
                await elsewhere.enqueue(payload("tenant-a", f"a-{i}"))
            before = await _calls(client)
            await here.enqueue(payload("tenant-a", "a-3"))  # guessed 1; the count says 4
            await here.reranked()  # the re-rank goes on after the enqueue returned
            after = await _calls(client)
            assert after["evalsha"] - before["evalsha"] == 3  # count + add + re-rank
            job = f"{redis_prefix}:{QUEUE}:"
            assert await client.hget(job + "a-3", "priority") == "4"
            assert await client.hget(job + "b-1", "priority") == "2"
            order = await client.zrange(job + "prioritized", 0, -1)
            assert order == ["w-0", "b-0", "a-0", "w-1", "b-1", "a-1", "a-2", "a-3"]
            # Redis loses its scripts (a restart, SCRIPT FLUSH): loaded again, sent again.
            await client.script_flush()
            await here.enqueue(payload("tenant-c", "c-0"))
            assert await client.hget(job + "c-0", "priority") == "1"
            assert (
                await client.hget(keys.fair(factory.settings.queue_prefix, QUEUE), "tenant-c")
                == "1"
            )
        await client.aclose()


async def test_a_batch_enqueue_survives_lost_scripts_and_counts_each_job_once(
    redis_prefix: str,
) -> None:
    """The batch path (count, then bulk add): a server that lost its scripts (a restart,
    ``SCRIPT FLUSH``) gets them again, each new job is counted and added once, and an id that
    exists is neither counted nor added again."""
    with redis_server() as server:  # a throwaway server: SCRIPT FLUSH touches nobody else
        settings = make_settings(redis_prefix, QUEUE_REDIS_PORT=str(server.port))
        client = aioredis.Redis(host="127.0.0.1", port=server.port, decode_responses=True)
        try:
            async with QueueFactory(settings) as factory:
                dispatcher = ExecutionDispatcher(factory, settings)
                first = [payload("t-a", "a-0"), payload("t-a", "a-1"), payload("t-b", "b-0")]
                assert await dispatcher.enqueue_many(first) == ["a-0", "a-1", "b-0"]
                await client.script_flush()
                again = [payload("t-a", "a-1"), payload("t-a", "a-2"), payload("t-b", "b-1")]
                assert await dispatcher.enqueue_many(again) == ["a-1", "a-2", "b-1"]
                fair = await client.hgetall(keys.fair(settings.queue_prefix, QUEUE))
                job = f"{redis_prefix}:{QUEUE}:"
                priorities = {
                    j: await client.hget(job + j, "priority")
                    for j in ("a-0", "a-1", "a-2", "b-0", "b-1")
                }
                order = await client.zrange(job + "prioritized", 0, -1)
        finally:
            await client.aclose()
    assert fair == {"t-a": "3", "t-b": "2"}  # a-1 (already there) not counted twice
    assert priorities == {"a-0": "1", "a-1": "2", "a-2": "3", "b-0": "1", "b-1": "2"}
    assert sorted(order) == ["a-0", "a-1", "a-2", "b-0", "b-1"]  # five jobs, none twice


@pytest.mark.parametrize("kept", ["count", "add"])
async def test_an_enqueue_that_lost_one_script_sends_only_that_call_again(
    redis_prefix: str, kept: str
) -> None:
    """Count and add go in one ``MULTI``; a server that knows only one of the two scripts runs
    that one and refuses the other (``NOSCRIPT`` inside ``EXEC`` does not stop the rest): only
    the refused call is sent again, so the job is added once and counted at most once — never
    twice. (With the count lost and the add run, the count finds the job already there: 0, as
    for a duplicate delivery; the fairness ledger's clamp repairs that drift.)"""
    with redis_server() as server:  # a fresh server: no script loaded yet
        settings = make_settings(redis_prefix, QUEUE_REDIS_PORT=str(server.port))
        client = aioredis.Redis(host="127.0.0.1", port=server.port, decode_responses=True)
        try:
            async with QueueFactory(settings) as factory:
                dispatcher = ExecutionDispatcher(factory, settings)
                commands = dispatcher.queue("us")._bull.backend.connection.commands  # type: ignore[attr-defined]
                if kept == "count":
                    await client.script_load(keys.COUNT_SCRIPT)
                else:
                    await client.script_load(commands["addStandardJob"].script)
                    await client.script_load(commands["addPrioritizedJob"].script)
                before = await _calls(client)
                assert await dispatcher.enqueue(payload("t-a", "a-0")) == "a-0"
                after = await _calls(client)
                fair = await client.hgetall(keys.fair(settings.queue_prefix, QUEUE))
                job = f"{redis_prefix}:{QUEUE}:"
                waiting: list[Any] = list(await client.zrange(job + "prioritized", 0, -1))
                waiting += list(await client.lrange(job + "wait", 0, -1))
                # a second enqueue of the same id: neither counted nor added again
                assert await dispatcher.enqueue(payload("t-a", "a-0")) == "a-0"
                fair_again = await client.hgetall(keys.fair(settings.queue_prefix, QUEUE))
        finally:
            await client.aclose()
    assert waiting == ["a-0"]  # added once
    # the transaction, then the refused call alone: count + add, then one of them again
    assert after["exec"] - before.get("exec", 0) == 2
    assert after["evalsha"] - before.get("evalsha", 0) == 3
    assert fair == ({"t-a": "1"} if kept == "count" else {})
    assert fair_again == fair
