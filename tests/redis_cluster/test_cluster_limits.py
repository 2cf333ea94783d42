"""Cluster-wide tenant limits on a real Redis Cluster (three masters, three replicas).

The limits scripts touch a tenant's keys with the shared ``caps``/``waiting`` keys, and the
renew and sweep scripts several tenants' keys at once: on a cluster every limits key is in the
``{conveyor}`` slot, and the scripts are loaded on the masters (a cluster pipeline sends
``EVALSHA`` unchecked). First the limiter alone (an injected clock), then two real worker
processes: a tenant capped at 2 never has more than 2 executions running, and a tenant's start
rate holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from sqlalchemy import func, select

from conveyor.dispatch import EffectiveLimits, TenantLimiter, keys
from conveyor.queue import QueueFactory
from conveyor.settings import Settings
from conveyor.store import TenantLimits, migrate
from conveyor.store.schema import executions
from tests.redis_cluster._cluster import Cluster, redis_cluster
from tests.worker._support import (
    http_recorder,
    make_settings,
    wait_started,
    worker_env,
    worker_process,
)
from tests.worker.conftest import Seeder, seeder

pytestmark = pytest.mark.slow

Q = "workflow.execute.us"
TTL = 2_000


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with redis_cluster() as started:
        yield started


class Clock:
    def __init__(self, now: int = 1_765_000_000_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture
async def queues(cluster: Cluster, redis_prefix: str) -> AsyncIterator[QueueFactory]:
    async with QueueFactory(make_settings(redis_prefix, **cluster.env())) as qf:
        assert isinstance(qf.redis, RedisCluster)
        yield qf


def _flush_scripts(cluster: Cluster) -> None:
    for node in cluster.masters():
        assert node.client().script_flush() is True


async def test_limits_scripts_run_in_the_conveyor_slot_and_reload_after_a_script_flush(
    cluster: Cluster, queues: QueueFactory, redis_prefix: str
) -> None:
    _flush_scripts(cluster)  # whatever an earlier test loaded: start from bare masters
    clock = Clock()
    cap2 = EffectiveLimits(concurrency=2)
    w1, w2 = (
        TenantLimiter(queues.redis, redis_prefix, lease_ttl_ms=TTL, cluster=True, clock=clock)
        for _ in range(2)
    )
    # Two tenants: a renew and a sweep touch both tenants' keys in one script call.
    for tenant, w1_job, w2_job in (("t1", "a1", "a2"), ("t2", "b1", "b2")):
        assert (await w1.acquire(tenant, w1_job, Q, cap2)).started
        assert (await w2.acquire(tenant, w2_job, Q, cap2)).started
    for tenant, job in (("t1", "a3"), ("t2", "b3")):
        parked = await w2.acquire(tenant, job, Q, cap2)
        assert (parked.started, parked.reason, parked.parked) == (False, "concurrency", 1)

    names = keys.limit_sweep_keys(redis_prefix, ["t1", "t2"], cluster=True)
    assert all(name.startswith(f"{redis_prefix}:{{conveyor}}:limits:") for name in names)
    assert len({key_slot(name.encode()) for name in names}) == 1
    master = cluster.master_of(names[0]).client()
    leases = {t: keys.limit_leases(redis_prefix, t, cluster=True) for t in ("t1", "t2")}
    assert [master.zcard(leases[t]) for t in ("t1", "t2")] == [2, 2]
    assert master.smembers(names[1]) == {"t1", "t2"}

    clock.now += TTL - 1
    assert await w1.renew() == []  # a1 (t1) and b1 (t2): one script, two tenants' keys
    clock.now += 2  # w2's leases (not renewed) expired: the sweep frees their slots
    assert await w2.sweep() == ([(Q, "a3"), (Q, "b3")], None)

    # The masters lose every script (a restart, a replica promoted without them): each
    # script is loaded again once and the refused calls go through.
    _flush_scripts(cluster)
    loads = w1._batcher.loads
    four, five, lost = await asyncio.gather(
        w1.acquire("t1", "a4", Q, cap2), w1.acquire("t1", "a5", Q, cap2), w1.renew()
    )
    assert (four.started, five.started, five.reason) == (True, False, "concurrency")
    assert lost == []
    assert w1._batcher.loads - loads <= 2  # acquire and renew: one load each at most
    assert await w1.release("t1", "a1") == [(Q, "a5")]
    assert master.zrange(leases["t1"], 0, -1) == ["a4"]
    # Nothing of the limits landed outside the {conveyor} slot.
    client = cluster.client()
    try:
        stray = [k for k in client.scan_iter(match=f"{redis_prefix}:conveyor:*")]
        assert stray == []
    finally:
        client.close()


async def _running(s: Seeder, tenant: str) -> int:
    query = select(func.count()).where(
        executions.c.tenant_id == tenant, executions.c.status == "running"
    )
    async with s.store.engine.connect() as conn:
        return int((await conn.execute(query)).scalar_one())


async def _start_times(s: Seeder, ids: list[str]) -> list[float]:
    async with s.store.engine.connect() as conn:
        rows = await conn.execute(select(executions.c.started_at).where(executions.c.id.in_(ids)))
        return sorted(r.started_at.timestamp() for r in rows)


@pytest.mark.timeout(120)
async def test_cap_and_start_rate_hold_across_two_workers_on_a_cluster(
    cluster: Cluster, fresh_pg_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    settings: Settings = make_settings(redis_prefix, fresh_pg_url, **cluster.env())
    await migrate(settings)
    env = worker_env(
        redis_prefix,
        fresh_pg_url,
        HTTP_ALLOWLIST="127.0.0.1",
        EXECUTION_WORKER_CONCURRENCY="4",
        EXECUTION_TENANT_CONCURRENCY="50",
        **cluster.env(),
    )
    rate, n_rate = 10.0, 21
    # Bounded below pytest-timeout: a hang then fails with the traceback of the await that
    # hung (pytest-timeout dumps threads, not coroutines).
    async with asyncio.timeout(100):
        with http_recorder() as rec:
            async with seeder(settings) as s:
                a, b = await s.tenant("capped"), await s.tenant("rated")
                await s.store.limits.set(TenantLimits(a, concurrency=2))
                await s.store.limits.set(
                    TenantLimits(b, concurrency=100, start_rate=rate, start_burst=1)
                )
                slow = [{"id": "c", "type": "http", "url": rec.url("/slow", ms=150)}]
                wa = await s.workflow(a, slow)
                wb = await s.workflow(b, [{"id": "n", "type": "noop"}])
                with ExitStack() as stack:
                    procs = [
                        stack.enter_context(worker_process(env, tmp_path, f"w{i}"))
                        for i in range(2)
                    ]
                    for wp in procs:
                        await asyncio.to_thread(wait_started, wp)
                    a_ids = await s.executions(a, wa, [None] * 16)
                    b_ids = await s.executions(b, wb, [None] * n_rate)
                    samples: list[int] = []
                    lease_counts: list[int] = []
                    leases = keys.limit_leases(redis_prefix, a, cluster=True)

                    async def sample() -> None:
                        while True:
                            samples.append(await _running(s, a))
                            lease_counts.append(int(await s.queues.redis.zcard(leases)))
                            await asyncio.sleep(0.01)

                    sampler = asyncio.create_task(sample())
                    try:
                        await s.wait_status(a_ids + b_ids, within=60)
                    finally:
                        sampler.cancel()
                        with contextlib.suppress(asyncio.CancelledError):
                            await sampler
                    for wp in procs:
                        wp.signal(signal.SIGTERM)
                    for wp in procs:
                        assert await asyncio.to_thread(wp.wait, 20) == 0, wp.output()[-2000:]
                        assert "CROSSSLOT" not in wp.output() and "NOSCRIPT" not in wp.output()
                        assert "limits_unavailable" not in wp.output(), wp.output()[-2000:]
                starts = await _start_times(s, b_ids)
    assert len(samples) > 30, len(samples)  # sampled throughout the run
    assert max(samples) <= 2, max(samples)  # never more than the cap, across both workers
    assert max(samples) == 2  # ... and the cap is used
    assert max(lease_counts) <= 2, max(lease_counts)
    hits = rec.finished()
    assert len(hits) == 16
    edges = sorted([(h.start, 1) for h in hits] + [(h.end, -1) for h in hits])
    most = now = 0
    for _t, step in edges:
        now += step
        most = max(most, now)
    assert most == 2  # the HTTP target agrees: two of A's calls at once, never three
    measured = (n_rate - 1) / (starts[-1] - starts[0])
    assert abs(measured - rate) <= 0.1 * rate, measured
