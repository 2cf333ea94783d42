"""Conveyor's Redis use, piece by piece, on a real Redis Cluster (three masters, three
replicas; one cluster for the module, see :mod:`tests.redis_cluster._cluster`).

Every client is a ``RedisCluster``; each execution queue lives in its own slot (hash tag)
and Conveyor's scripts, transactions and multi-key commands run there: the count-and-add
transaction, the fairness ledger's decrements (a pipeline of scripts) and clamp, heartbeats
(``MGET``), metrics, the Redis leader lock.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from conveyor.dispatch import ExecutionDispatcher, FairnessLedger, keys
from conveyor.queue import JobContext, QueueFactory, WorkflowExecute, execution_queue_name
from conveyor.runtime.heartbeat import Heartbeat, list_processes
from conveyor.runtime.metrics import MetricsPublisher, read_metrics
from conveyor.settings import Settings
from conveyor.workers.leader import RedisLock
from tests.queue.conftest import eventually, make_settings, running
from tests.redis_cluster._cluster import Cluster, redis_cluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with redis_cluster() as started:
        yield started


def _settings(cluster: Cluster, prefix: str) -> Settings:
    return make_settings(prefix, EXECUTION_REGIONS="us,eu", **cluster.env())


def _payload(region: str, tenant: str) -> WorkflowExecute:
    return WorkflowExecute(execution_id=uuid.uuid4().hex, tenant_id=tenant, workflow_id="wf",
                           region=region, workflow_version=1)  # fmt: skip


async def test_every_client_is_a_cluster_client_and_health_reports_the_cluster(
    cluster: Cluster, redis_prefix: str
) -> None:
    settings = _settings(cluster, redis_prefix)
    async with QueueFactory(settings) as qf:
        await qf.assert_queue_is_ready()
        assert isinstance(qf.redis, RedisCluster)
        queue = qf.create_queue(execution_queue_name("us"))
        assert isinstance(queue.bullmq_queue.client, RedisCluster)
        report = await qf.health()
        assert report["status"] == "ready" and report["sentinel"] is None
        view = report["cluster"]
        assert view["state"] == "ok" and view["slotsOk"] == 16384 and view["failed"] == 0
        assert sorted(view["masters"]) == sorted(f"127.0.0.1:{n.port}" for n in cluster.masters())
        assert view["replicas"] == 3 and view["knownNodes"] == 6
        assert report["address"] == ",".join(view["masters"])
        assert report["warnings"] == [] and report["evictionPolicy"] == "noeviction"


async def test_enqueue_fairness_and_consumption_per_region(
    cluster: Cluster, redis_prefix: str
) -> None:
    settings = _settings(cluster, redis_prefix)
    async with QueueFactory(settings) as qf:
        dispatcher = ExecutionDispatcher(qf, settings)
        try:
            # One at a time (count-and-add in one MULTI) and in bulk (count, then addBulk).
            ids = {r: [await dispatcher.enqueue(_payload(r, "t1")) for _ in range(3)]
                   for r in ("us", "eu")}  # fmt: skip
            bulk = [_payload(r, "t2") for r in ("us", "eu", "us")]
            await dispatcher.enqueue_many(bulk)
            ids["us"] += [bulk[0].execution_id, bulk[2].execution_id]
            ids["eu"].append(bulk[1].execution_id)
            again = await dispatcher.enqueue(_payload("us", "t1").model_copy(
                update={"execution_id": ids["us"][0]}))  # fmt: skip
            assert again == ids["us"][0]  # a duplicate is neither counted nor added
        finally:
            await dispatcher.aclose()
        client = cluster.client()
        for region, expected in (("us", {"t1": "3", "t2": "2"}), ("eu", {"t1": "3", "t2": "1"})):
            name = execution_queue_name(region)
            fair = keys.fair(redis_prefix, name, cluster=True)
            assert client.hgetall(fair) == expected
            counts = await dispatcher.queue(region).get_job_counts("waiting", "prioritized")
            assert sum(counts.values()) == len(ids[region])
            # The queue's keys and its fairness hash are in the queue's slot, on its master.
            wait = keys.backlog(redis_prefix, name, cluster=True)[2]
            assert key_slot(wait.encode()) == key_slot(fair.encode())
            assert cluster.master_of(fair).client().exists(fair, wait) == 2

        ledger = FairnessLedger(qf, settings, [execution_queue_name(r) for r in ("us", "eu")])
        done: dict[str, list[str]] = {"us": [], "eu": []}

        def processor(region: str):  # type: ignore[no-untyped-def]
            async def process(payload: WorkflowExecute, ctx: JobContext) -> None:
                done[region].append(payload.execution_id)
                ledger.started(ctx.queue_name, payload.tenant_id)

            return process

        workers = [qf.create_worker(execution_queue_name(r), processor(r)) for r in ("us", "eu")]
        async with running(workers[0]), running(workers[1]):
            await eventually(lambda: all(len(done[r]) == len(ids[r]) for r in done), within=15)
        assert {r: sorted(v) for r, v in done.items()} == {r: sorted(v) for r, v in ids.items()}
        # The ledger's decrements: a pipeline of scripts, one per queue, across two shards.
        await ledger.flush()
        assert ledger.flushes == 1
        for region in ("us", "eu"):
            assert client.hgetall(keys.fair(redis_prefix, execution_queue_name(region),
                                            cluster=True)) == {}  # fmt: skip
        assert await ledger.clamp() == {execution_queue_name("us"): 0,
                                        execution_queue_name("eu"): 0}  # fmt: skip
        client.close()


async def test_heartbeats_metrics_and_the_redis_leader_lock(
    cluster: Cluster, redis_prefix: str
) -> None:
    settings = _settings(cluster, redis_prefix)
    async with QueueFactory(settings) as qf:
        beats = [Heartbeat(qf, role=role) for role in ("worker", "worker", "scheduler")]
        await asyncio.gather(*(b.beat() for b in beats))
        live = await list_processes(qf)  # ZRANGE + MGET over the processes' documents
        assert sorted(p["id"] for p in live) == sorted(b.process_id for b in beats)
        await beats[0].remove()
        assert len(await list_processes(qf)) == 2

        publisher = MetricsPublisher(qf)
        publisher.observe_execution(0.25, "succeeded")
        publisher.observe_step("http", "succeeded", 0.1)
        await publisher.flush()
        snapshot = await read_metrics(qf)
        assert snapshot.counters, snapshot
        assert int(snapshot.redis_memory["used_memory"]) > 0, snapshot.redis_memory

        key = keys.leader(redis_prefix, "scheduler", cluster=True)
        first = RedisLock(qf.redis, key, "a", ttl_ms=2000)
        second = RedisLock(qf.redis, key, "b", ttl_ms=2000)
        assert await first.try_acquire() and not await second.try_acquire()
        assert await first.keep() and await first.current_holder() == "a"
        await first.release()
        assert await second.try_acquire()
        await second.release()


async def test_scripts_missing_on_the_masters_are_loaded_again(
    cluster: Cluster, redis_prefix: str
) -> None:
    """A cluster pipeline never loads a script (a plain one checks ``SCRIPT EXISTS``): the
    bulk add, the count-and-add ``MULTI`` and the fairness flush load theirs on every master,
    first on a fresh handle and again after the masters lost them (``SCRIPT FLUSH``: a
    restart, or a replica promoted without them)."""

    def flush_scripts() -> None:
        for node in cluster.masters():
            assert node.client().script_flush() is True

    settings = _settings(cluster, redis_prefix)
    for _round in range(2):
        flush_scripts()
        async with QueueFactory(settings) as qf:
            dispatcher = ExecutionDispatcher(qf, settings)
            ledger = FairnessLedger(qf, settings, [execution_queue_name("us")])
            try:
                for _attempt in range(2):  # fresh handles, then handles that loaded before
                    bulk = [_payload(r, "t") for r in ("us", "eu")]
                    assert await dispatcher.enqueue_many(bulk) == [p.execution_id for p in bulk]
                    one = _payload("eu", "t")
                    assert await dispatcher.enqueue(one) == one.execution_id
                    ledger.started(execution_queue_name("us"), "t")
                    await ledger.flush()
                    flush_scripts()
                counts = await dispatcher.queue("us").get_job_counts("waiting", "prioritized")
                assert sum(counts.values()) == 2
            finally:
                await dispatcher.aclose()
        # Nothing counted twice nor lost: us has its two jobs and the flushes took them off.
        fair = keys.fair(redis_prefix, execution_queue_name("us"), cluster=True)
        client = cluster.client()
        assert client.hget(fair, "t") in (None, "0")
        client.close()
        redis_prefix += "x"  # the next round starts from empty queues
        settings = _settings(cluster, redis_prefix)
