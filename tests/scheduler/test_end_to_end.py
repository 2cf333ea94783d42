"""End to end with the execution worker: a durable delay survives restarts; the reconciler
rebuilds the queue from the database after a FLUSHDB."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from tests.helpers import redis_server
from tests.scheduler._support import (
    HttpHits,
    async_wait_until,
    base_env,
    create_and_enqueue,
    migrate,
    processes,
    seed_workflow,
    settings_for,
    statuses,
)

pytestmark = pytest.mark.slow

WORKER = "conveyor.workers.execution"
TIMERS = "conveyor.workers.timer_dispatcher"
SCHEDULER = "conveyor.workers.scheduler"


async def timer_due(env: dict[str, str], execution_id: str) -> Any:
    from conveyor.store import Store

    async with Store(settings_for(env), pool_size=1) as store:
        tenant = await _tenant(store, execution_id)
        timers = await store.timers.for_execution(tenant, execution_id)
    return timers[0].due_at if timers else None


async def _tenant(store: Any, execution_id: str) -> str:
    from sqlalchemy import select

    from conveyor.store.schema import executions

    async with store.engine.connect() as conn:
        row = (await conn.execute(
            select(executions.c.tenant_id).where(executions.c.id == execution_id))).one()  # fmt: skip
    return str(row.tenant_id)


async def test_durable_delay_resumes_across_worker_and_dispatcher_restart(
    settings_env: dict[str, str], fresh_pg_url: str
) -> None:
    env = base_env(settings_env, fresh_pg_url, HTTP_ALLOWLIST="127.0.0.1")
    await migrate(env)
    with HttpHits() as http, processes() as start:
        _tenant_id, wf = await seed_workflow(env, {"name": "delayed", "steps": [
            {"id": "a", "type": "http", "url": http.url("/a")},
            {"id": "wait", "type": "delay", "seconds": 3},
            {"id": "b", "type": "http", "url": http.url("/b")},
        ]})  # fmt: skip
        worker = start(WORKER, env, "worker1")
        timers = start(TIMERS, env, "timers1")
        (eid,) = await create_and_enqueue(env, _tenant_id, wf)
        await async_wait_until(lambda: http.at("/a"), 30)
        due = await async_wait_until(lambda: timer_due(env, eid), 5)
        assert (await statuses(env, [eid]))[eid] == "waiting"
        # during the wait: both processes die (no clean-up) and come back
        worker.kill()
        timers.kill()
        assert not http.at("/b")
        start(WORKER, env, "worker2")
        start(TIMERS, env, "timers2")
        await async_wait_until(lambda: http.at("/b"), 20)
        done = await async_wait_until(lambda: _is(statuses(env, [eid]), eid, "succeeded"), 10)
        assert done
    resumed = http.at("/b")[0]
    assert len(http.at("/a")) == 1 and len(http.at("/b")) == 1
    assert resumed >= due.timestamp(), "resumed before the delay ended"
    assert resumed - due.timestamp() < 5.0


async def _is(coro: Any, eid: str, status: str) -> bool:
    return bool((await coro).get(eid) == status)


async def test_reconciler_requeues_executions_after_flushdb(
    redis_prefix: str, fresh_pg_url: str
) -> None:
    from tests.helpers import env_for

    with redis_server() as server:
        env = base_env(
            env_for(QUEUE_REDIS_HOST="127.0.0.1", QUEUE_REDIS_PORT=str(server.port),
                    QUEUE_PREFIX=redis_prefix),
            fresh_pg_url,
        )  # fmt: skip
        await migrate(env)
        tenant, wf = await seed_workflow(env, {"name": "n", "steps": [{"id": "n", "type": "noop"}]})
        ids = await create_and_enqueue(env, tenant, wf, count=20)
        import redis

        client = redis.Redis(port=server.port)
        try:
            assert client.exists(f"{redis_prefix}:workflow.execute.us:{ids[0]}")
            client.flushdb()  # the throwaway server only: the jobs are gone, the rows remain
            assert not client.keys(f"{redis_prefix}:*")
        finally:
            client.close()
        await asyncio.sleep(1.0)  # older than RECONCILE_MIN_AGE_MS
        with processes() as start:
            scheduler = start(SCHEDULER, env, "scheduler")
            start(WORKER, env, "worker")
            started = time.monotonic()
            await async_wait_until(lambda: _all(statuses(env, ids), "succeeded"), 30, interval=0.2)
            assert time.monotonic() - started < 30
            assert "reconcile.recovered" in scheduler.log()


async def _all(coro: Any, status: str) -> bool:
    got = await coro
    return bool(got) and set(got.values()) == {status}
