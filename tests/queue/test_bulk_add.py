"""The producer's bulk add (:func:`conveyor.queue.bullmq.compat.add_bulk`): bullmq's own
``addBulk`` calls in one ``MULTI``/``EXEC`` sent without redis-py's pipeline. It must write
exactly what bullmq's ``addBulk`` writes, load the scripts a server lost without adding any
job twice, raise an error reply, and fail within the deadline on a frozen server. Real Redis
(throwaway servers where a test flushes scripts or freezes the server)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import bullmq
import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from conveyor.errors import QueueUnavailable
from conveyor.queue import QueueFactory
from conveyor.queue.bullmq import compat
from conveyor.queue.scripts import transaction
from tests.helpers import redis_server
from tests.queue.conftest import TEST_QUEUE, make_settings
from tests.queue.payload import Probe

STAMP = 1_700_000_000_000


def mixed_jobs(tag: str) -> list[dict[str, Any]]:
    """Standard, prioritized and delayed jobs; custom ids and bullmq's own ones."""
    return [
        {"name": "probe", "data": {"n": 1, "tag": tag}, "opts": {"jobId": f"{tag}-a"}},
        {"name": "probe", "data": {"n": 2}, "opts": {"priority": 3, "jobId": f"{tag}-b"}},
        {"name": "probe", "data": {"n": 3}, "opts": {"delay": 60_000, "jobId": f"{tag}-c"}},
        {"name": "probe", "data": {"n": 4}, "opts": {}},  # an id from the queue's counter
        {"name": "probe", "data": {"n": 5}, "opts": {"priority": 1, "attempts": 4}},
        {"name": "probe", "data": {"n": 6}, "opts": {"jobId": f"{tag}-a"}},  # a duplicate
    ]


@asynccontextmanager
async def bull_queue(client: aioredis.Redis, prefix: str) -> AsyncIterator[Any]:
    queue = bullmq.Queue(
        TEST_QUEUE,
        {
            "connection": client,
            "prefix": prefix,
            "defaultJobOptions": {"removeOnFail": 100, "timestamp": STAMP},
            "skipVersionCheck": True,
        },
    )
    try:
        yield queue
    finally:
        await queue.close()


async def dump(client: aioredis.Redis, prefix: str) -> dict[str, Any]:
    """Every key under ``prefix`` (the prefix cut off) with its content; stream entries
    without their ids (times)."""
    found: dict[str, Any] = {}
    async for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        kind = await client.type(key)
        if kind == "hash":
            value: Any = await client.hgetall(key)
        elif kind == "zset":
            value = await client.zrange(key, 0, -1, withscores=True)
        elif kind == "list":
            value = await client.lrange(key, 0, -1)
        elif kind == "stream":
            entries: Any = await client.xrange(key)
            value = [fields for _id, fields in entries]
        else:
            value = await client.get(key)
        found[key.removeprefix(prefix)] = (kind, value)
    return found


async def test_a_bulk_add_writes_exactly_what_bullmqs_add_bulk_writes(
    redis_client: aioredis.Redis,
) -> None:
    ours, theirs = f"{_prefix()}o", f"{_prefix()}t"
    try:
        async with bull_queue(redis_client, ours) as q1, bull_queue(redis_client, theirs) as q2:
            ids = await compat.add_bulk(q1, mixed_jobs("x"))
            added = await q2.addBulk(mixed_jobs("x"))
            assert ids == [job.id for job in added]
            assert ids[:3] == ["x-a", "x-b", "x-c"] and ids[5] == "x-a"
            mine, reference = await dump(redis_client, ours), await dump(redis_client, theirs)
            assert mine == reference
            assert len([k for k in mine if k.count(":") == 2 and mine[k][0] == "hash"]) >= 5
    finally:
        for prefix in (ours, theirs):
            keys = [k async for k in redis_client.scan_iter(match=f"{prefix}:*", count=1000)]
            if keys:
                await redis_client.delete(*keys)


async def test_scripts_a_server_lost_are_loaded_and_no_job_is_added_twice() -> None:
    with redis_server() as server:  # a throwaway server: SCRIPT FLUSH touches nobody else
        client = aioredis.Redis(host="127.0.0.1", port=server.port, decode_responses=True)
        try:
            async with bull_queue(client, "cvq") as queue:
                # A fresh server knows none of the add scripts: all refused, loaded, sent again.
                assert len(await compat.add_bulk(queue, mixed_jobs("one"))) == 6
                await client.script_flush()
                # Only the standard add known again: the EXEC runs those adds and refuses the
                # others; only the refused ones are sent again (ids from the counter included).
                await client.script_load(queue.backend.connection.commands["addStandardJob"].script)
                ids = await compat.add_bulk(queue, mixed_jobs("two"))
                assert ids[:3] == ["two-a", "two-b", "two-c"] and ids[5] == "two-a"
                counts = await queue.getJobCounts("wait", "prioritized", "delayed")
            assert counts == {"wait": 4, "prioritized": 4, "delayed": 2}  # 5 distinct jobs each
            # bullmq's add scripts count every add that ran (custom ids too): 6 per batch, 12 —
            # 15 had the 3 adds that ran in the second batch's first EXEC been sent again.
            assert await client.get(f"cvq:{TEST_QUEUE}:id") == "12"
        finally:
            await client.aclose()


async def test_an_error_reply_is_raised_and_the_connection_stays_usable(
    redis_client: aioredis.Redis,
) -> None:
    prefix = _prefix()
    try:
        async with bull_queue(redis_client, prefix) as queue:
            await redis_client.hset(f"{prefix}:{TEST_QUEUE}:id", "not", "a counter")
            with pytest.raises(ResponseError, match="WRONGTYPE"):  # INCR on a hash, in the script
                await compat.add_bulk(queue, [{"name": "p", "data": {}, "opts": {}}])
            await redis_client.delete(f"{prefix}:{TEST_QUEUE}:id")
            assert await compat.add_bulk(queue, [{"name": "p", "data": {}, "opts": {}}]) == ["1"]
            assert await redis_client.ping()
    finally:
        keys = [k async for k in redis_client.scan_iter(match=f"{prefix}:*", count=1000)]
        await redis_client.delete(*keys)


async def test_a_transaction_refused_when_queued_runs_nothing(
    redis_client: aioredis.Redis,
) -> None:
    key = f"{_prefix()}:k"
    try:
        with pytest.raises(ResponseError, match="wrong number of arguments"):
            await transaction(redis_client, [("SET", key, "1"), ("GET",)])
        assert await redis_client.exists(key) == 0  # EXECABORT: the SET did not run
        assert await transaction(redis_client, [("SET", key, 1.5), ("GET", key)]) == ["OK", "1.5"]
    finally:
        await redis_client.delete(key)


async def test_a_bulk_add_on_a_frozen_redis_fails_within_the_deadline_then_works(
    redis_prefix: str,
) -> None:
    with redis_server() as server:
        assert server.proc is not None
        settings = make_settings(redis_prefix, QUEUE_REDIS_PORT=str(server.port))
        async with QueueFactory(settings) as qf:
            queue = qf.create_queue(TEST_QUEUE)
            assert len(await queue.add_bulk([(Probe(n=0), {})])) == 1  # connection pooled
            server.proc.send_signal(19)  # SIGSTOP
            try:
                begin = time.monotonic()
                with pytest.raises(QueueUnavailable):
                    await queue.add_bulk([(Probe(n=n), {}) for n in range(5)])
                deadline = settings.queue_redis_socket_timeout_ms / 1000
                assert time.monotonic() - begin < deadline + 1
            finally:
                server.proc.send_signal(18)  # SIGCONT
            ids = await queue.add_bulk([(Probe(n=n), {"job_id": f"after-{n}"}) for n in range(3)])
            assert ids == ["after-0", "after-1", "after-2"]  # no stale reply read as these


def _prefix() -> str:
    return f"cvt{uuid.uuid4().hex[:10]}"
