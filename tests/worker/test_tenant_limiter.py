"""The tenant limits' Lua scripts against the real Redis, with an injected clock (ms): leases
(cap, expiry, renew, release, parked jobs popped into free slots, sweeps) and the start-rate
bucket (burst, spacing, reservations)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from conveyor.dispatch import EffectiveLimits, TenantLimiter, keys
from conveyor.dispatch.limits import MAX_RESERVE_MS, effective_limits
from conveyor.settings import load_settings
from conveyor.store import TenantLimits
from tests.conftest import REDIS_HOST, REDIS_PORT
from tests.helpers import redis_server

Q = "workflow.execute.us"
TTL = 2_000


class Clock:
    def __init__(self, now: int = 1_765_000_000_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now


@pytest.fixture
async def redis() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    yield client
    await client.aclose()


def limiter(redis: aioredis.Redis, prefix: str, clock: Clock) -> TenantLimiter:
    return TenantLimiter(redis, prefix, lease_ttl_ms=TTL, clock=clock)


CAP2 = EffectiveLimits(concurrency=2)


async def test_cap_parks_and_release_pops_the_oldest(
    redis: aioredis.Redis, redis_prefix: str
) -> None:
    clock = Clock()
    w1, w2 = limiter(redis, redis_prefix, clock), limiter(redis, redis_prefix, clock)
    assert (await w1.acquire("t", "j1", Q, CAP2)).started
    assert (await w2.acquire("t", "j2", Q, CAP2)).started
    assert (await w1.acquire("t", "j1", Q, CAP2)).started  # a lease held is held (redelivery)
    v3 = await w1.acquire("t", "j3", Q, CAP2)
    assert (v3.started, v3.reason, v3.parked, v3.wait_ms) == (False, "concurrency", 1, TTL)
    clock.now += 1
    v4 = await w2.acquire("t", "j4", Q, CAP2)
    assert (v4.reason, v4.parked) == ("concurrency", 2)
    assert (await w1.acquire("t", "j3", Q, CAP2)).parked == 2  # parked again: keeps its place
    assert await redis.sismember(keys.limit_waiting(redis_prefix), "t")
    assert (await w1.acquire("u", "other", Q, CAP2)).started  # tenants are independent
    # any worker's release promotes the oldest parked job, whoever parked it
    assert await w2.release("t", "j1") == [(Q, "j3")]
    assert (await w1.acquire("t", "j3", Q, CAP2)).started  # the promoted job takes the slot
    assert await w1.release("t", "j3") == [(Q, "j4")]
    assert (await w1.acquire("t", "j4", Q, CAP2)).started
    assert not await redis.sismember(keys.limit_waiting(redis_prefix), "t")
    assert await w1.release("t", "j4") == []  # nothing parked any more
    assert await redis.zcard(keys.limit_leases(redis_prefix, "t")) == 1  # j2


async def test_leases_expire_and_renew(redis: aioredis.Redis, redis_prefix: str) -> None:
    clock = Clock()
    dead, alive = limiter(redis, redis_prefix, clock), limiter(redis, redis_prefix, clock)
    assert (await dead.acquire("t", "d1", Q, CAP2)).started
    assert (await alive.acquire("t", "a1", Q, CAP2)).started
    assert not (await alive.acquire("t", "a2", Q, CAP2)).started
    clock.now += TTL - 500
    assert await alive.renew() == []  # a1 renewed to now + TTL; d1 (crashed) is not
    clock.now += 499
    assert not (await alive.acquire("t", "a2", Q, CAP2)).started  # d1 is 1 ms from expiry
    clock.now += 1
    # d1 expired: its slot is free again; a sweep pops the parked job into it
    popped, wait = await alive.sweep()
    assert popped == [(Q, "a2")] and wait is None
    assert (await alive.acquire("t", "a2", Q, CAP2)).started
    clock.now += TTL  # a1 and a2 expired too (not renewed): renewing re-adds them (they run)
    assert sorted(await alive.renew()) == ["a1", "a2"]
    assert await redis.zcard(keys.limit_leases(redis_prefix, "t")) == 2
    assert 0 < await redis.pttl(keys.limit_leases(redis_prefix, "t")) <= 2 * TTL


async def test_sweep_reports_when_the_next_lease_expires(
    redis: aioredis.Redis, redis_prefix: str
) -> None:
    clock = Clock()
    w = limiter(redis, redis_prefix, clock)
    assert await w.sweep() == ([], None)
    one = EffectiveLimits(concurrency=1)
    assert (await w.acquire("t", "j1", Q, one)).started
    assert not (await w.acquire("t", "j2", Q, one)).started
    clock.now += 300
    assert await w.sweep() == ([], TTL - 300)
    clock.now += TTL
    assert await w.sweep() == ([(Q, "j2")], None)


async def test_release_without_lease_pops_free_slots(
    redis: aioredis.Redis, redis_prefix: str
) -> None:
    clock = Clock()
    w = limiter(redis, redis_prefix, clock)
    for j in ("j1", "j2"):
        assert (await w.acquire("t", j, Q, CAP2)).started
    for j in ("j3", "j4", "j5"):
        assert not (await w.acquire("t", j, Q, CAP2)).started
    clock.now += TTL  # both leases expired (their worker died)
    assert await w.release("t", None) == [(Q, "j3"), (Q, "j4")]


async def test_start_rate_burst_then_spaced_reservations(
    redis: aioredis.Redis, redis_prefix: str
) -> None:
    clock = Clock()
    w = limiter(redis, redis_prefix, clock)
    rate = EffectiveLimits(concurrency=100, start_rate=4, start_burst=2)  # one per 250 ms
    t0 = clock.now
    assert (await w.acquire("t", "j1", Q, rate)).started  # the burst
    assert (await w.acquire("t", "j2", Q, rate)).started
    waits = [(await w.acquire("t", f"j{i}", Q, rate)).wait_ms for i in range(3, 7)]
    assert waits == [250, 500, 750, 1000]  # each job reserved its own start: spaced exactly
    v = await w.acquire("t", "j3", Q, rate)  # back early (promoted): not yet
    assert (v.started, v.reason, v.wait_ms) == (False, "rate", 250)
    clock.now = t0 + 250 - 50  # within the slack: its reservation lets it start
    assert (await w.acquire("t", "j3", Q, rate)).started
    assert (await w.acquire("t", "j3", Q, rate)).wait_ms > 0  # the reservation was used up
    clock.now = t0 + 1000
    assert (await w.acquire("t", "j6", Q, rate)).started
    assert not (await w.acquire("t", "late", Q, rate)).started  # the bucket is still empty
    clock.now = t0 + 10_000  # idle: the bucket refills to the burst, not beyond
    assert (await w.acquire("t", "k1", Q, rate)).started
    assert (await w.acquire("t", "k2", Q, rate)).started
    assert (await w.acquire("t", "k3", Q, rate)).wait_ms == 250


async def test_rate_reservations_are_bounded(redis: aioredis.Redis, redis_prefix: str) -> None:
    clock = Clock()
    w = limiter(redis, redis_prefix, clock)
    slow = EffectiveLimits(concurrency=100, start_rate=0.001, start_burst=1)  # one per 1000 s
    assert (await w.acquire("t", "j1", Q, slow)).started
    v = await w.acquire("t", "j2", Q, slow)
    assert (v.reason, v.wait_ms) == ("rate", MAX_RESERVE_MS)  # too far ahead: ask again then
    assert not await redis.hexists(keys.limit_bucket(redis_prefix, "t"), "r:j2")


async def test_rate_and_cap_together(redis: aioredis.Redis, redis_prefix: str) -> None:
    clock = Clock()
    w = limiter(redis, redis_prefix, clock)
    both = EffectiveLimits(concurrency=1, start_rate=10, start_burst=1)
    assert (await w.acquire("t", "j1", Q, both)).started
    # at the cap: parked, and no start token is spent on it
    assert (await w.acquire("t", "j2", Q, both)).reason == "concurrency"
    clock.now += 1000
    assert await w.release("t", "j1") == [(Q, "j2")]
    assert (await w.acquire("t", "j2", Q, both)).started


def test_effective_limits_fall_back_on_the_settings() -> None:
    s = load_settings({"EXECUTION_WORKER_CONCURRENCY": "4", "EXECUTION_TENANT_START_RATE": "2.5"})
    assert effective_limits(s) == EffectiveLimits(4, 2.5, 3)
    own = TenantLimits("t", concurrency=1, start_burst=7)
    assert effective_limits(s, own) == EffectiveLimits(1, 2.5, 7)
    s = load_settings({"EXECUTION_TENANT_CONCURRENCY": "9"})
    assert effective_limits(s) == EffectiveLimits(9)
    assert effective_limits(s, TenantLimits("t", start_rate=0.5)) == EffectiveLimits(9, 0.5, 1)


async def test_concurrent_calls_share_pipelines_and_survive_a_script_flush() -> None:
    with redis_server() as server:  # a throwaway server: SCRIPT FLUSH touches nobody else
        client = aioredis.Redis(host="127.0.0.1", port=server.port)
        try:
            clock = Clock()
            w = limiter(client, "p", clock)
            cap = EffectiveLimits(concurrency=5)
            verdicts = await asyncio.gather(
                *(w.acquire("t", f"j{i}", Q, cap) for i in range(8))
            )  # scripts unknown to this server yet: loaded on NOSCRIPT, then sent again
            assert sum(v.started for v in verdicts) == 5
            assert sorted(v.parked for v in verdicts if not v.started) == [1, 2, 3]
            batches = w._batcher.batches
            await client.script_flush()
            popped = await asyncio.gather(*(w.release("t", f"j{i}") for i in range(3)))
            assert sorted(p for ps in popped for p in ps) == [(Q, "j5"), (Q, "j6"), (Q, "j7")]
            assert w._batcher.batches - batches <= 2  # one pipeline, maybe two: not three
        finally:
            await client.aclose()


async def test_acquire_takes_over_an_unsent_release(
    redis: aioredis.Redis, redis_prefix: str
) -> None:
    clock = Clock()
    w = limiter(redis, redis_prefix, clock)
    one = EffectiveLimits(concurrency=1)
    assert (await w.acquire("t", "j1", Q, one)).started
    # j1 ended here, its release not sent yet: j2 takes its slot in the same call
    assert (await w.acquire("t", "j2", Q, one, replaces="j1")).started
    members = await redis.zrange(keys.limit_leases(redis_prefix, "t"), 0, -1)
    assert members == [b"j2"]
    assert not (await w.acquire("t", "j3", Q, one)).started  # the cap still holds
