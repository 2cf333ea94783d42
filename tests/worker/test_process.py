"""The execution worker as a real process: tenant cap, fairness, crash, shutdown, start-up.

Workers run as subprocesses (``python -m conveyor.workers.execution``) against the real Redis
and Postgres; steps call a local HTTP server run by the test (allow-listed), which records
when each call started and ended. Every subprocess is killed at the end of its test.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from conveyor.dispatch import keys
from conveyor.runtime import list_processes, read_metrics
from conveyor.settings import Settings
from tests.helpers import free_port
from tests.worker._support import (
    Hit,
    eventually,
    http_recorder,
    wait_started,
    worker_env,
    worker_process,
)
from tests.worker.conftest import seeder

pytestmark = pytest.mark.slow


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    return worker_env(
        settings.queue_prefix, settings.database_url, HTTP_ALLOWLIST="127.0.0.1", **extra
    )


async def _until(predicate: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {within}s")
        await asyncio.sleep(0.02)


def _overlaps(a: Hit, b: Hit) -> bool:
    return a.start < b.end and b.start < a.end


async def test_tenant_cap_holds_while_other_tenants_run(
    wsettings: Settings, tmp_path: Path
) -> None:
    with http_recorder() as rec:
        async with seeder(wsettings) as s:
            slow = [
                {"id": "call", "type": "http", "url": rec.url("/slow", ms=250, t="{{ input.t }}")}
            ]
            a, b = await s.tenant("a"), await s.tenant("b")
            wa, wb = await s.workflow(a, slow), await s.workflow(b, slow)
            a_ids = await s.executions(a, wa, [{"t": "a"}] * 5)
            b_ids = await s.executions(b, wb, [{"t": "b"}] * 3)
            env = _env(
                wsettings, EXECUTION_WORKER_CONCURRENCY="4", EXECUTION_TENANT_CONCURRENCY="1"
            )
            with worker_process(env, tmp_path) as wp:
                await s.wait_status(a_ids + b_ids, within=30)
                wp.signal(signal.SIGTERM)
                assert wp.wait(timeout=15) == 0
    hits = rec.finished()
    a_hits = [h for h in hits if h.query["t"] == "a"]
    b_hits = [h for h in hits if h.query["t"] == "b"]
    assert len(a_hits) == 5 and len(b_hits) == 3
    for hits_of_one in (a_hits, b_hits):  # never more than one at a time per tenant
        for i, x in enumerate(hits_of_one):
            assert not any(_overlaps(x, y) for y in hits_of_one[i + 1 :]), hits_of_one
    assert any(_overlaps(x, y) for x in a_hits for y in b_hits)  # ... but side by side
    # held-back jobs were promoted as soon as their tenant's slot freed, not after their
    # fallback delay (5 s): A's five 250 ms calls ran back to back
    span = max(h.end for h in a_hits) - min(h.start for h in a_hits)
    assert span < 4.5, span


async def test_light_tenant_starts_before_a_flood_drains(
    wsettings: Settings, tmp_path: Path
) -> None:
    noop = [{"id": "n", "type": "noop"}]
    async with seeder(wsettings) as s:
        a, b = await s.tenant("a"), await s.tenant("b")
        wa, wb = await s.workflow(a, noop), await s.workflow(b, noop)
        a_ids = await s.executions(a, wa, [None] * 2000)  # tenant A floods first ...
        (b_id,) = await s.executions(b, wb, [None])  # ... then B enqueues one
        with worker_process(_env(wsettings, EXECUTION_WORKER_CONCURRENCY="2"), tmp_path) as wp:
            await s.wait_status([b_id], within=30)
            wp.signal(signal.SIGTERM)
            assert wp.wait(timeout=15) == 0
        ahead = await s.started_before(a, b_id)
        pending_a = sum(1 for st in (await s.statuses(a_ids)).values() if st == "queued")
    # FIFO would start all 2,000 of A's first; B goes right after A's first jobs.
    assert ahead <= 4, ahead
    assert pending_a > 1000


async def test_sigkill_mid_execution_second_worker_finishes(
    wsettings: Settings, tmp_path: Path
) -> None:
    fast = {"EXECUTION_LOCK_DURATION_MS": "2000", "EXECUTION_STALLED_INTERVAL_MS": "1000"}
    with http_recorder() as rec:
        async with seeder(wsettings) as s:
            steps = [
                {"id": "one", "type": "http", "url": rec.url("/one")},
                {"id": "two", "type": "http", "url": rec.url("/block")},
                {"id": "three", "type": "http", "url": rec.url("/three")},
            ]
            t = await s.tenant()
            (ex,) = await s.executions(t, await s.workflow(t, steps), [None])
            with worker_process(_env(wsettings, **fast), tmp_path, "first") as first:
                await _until(lambda: rec.count("/block") == 1, 20, "step two")
                with worker_process(_env(wsettings, **fast), tmp_path, "second") as second:
                    await asyncio.to_thread(wait_started, second)
                    first.proc.kill()  # SIGKILL mid-execution
                    first.wait(timeout=10)
                    rec.release.set()
                    await s.wait_status([ex], within=30)
                    second.signal(signal.SIGTERM)
                    assert second.wait(timeout=15) == 0
                    recovered = second.output()
            state = await s.queues.create_queue("workflow.execute.us").get_job_state(ex)
            steps_run = await s.store.executions.step_runs(t, ex)
            stalled = (await read_metrics(s.queues)).counters.get("jobs_stalled_total", [])
    assert rec.count("/one") == 1  # completed before the crash: never run again
    assert rec.count("/three") == 1
    assert rec.count("/block") == 2  # the step in flight at the crash ran again
    assert [r.step_id for r in steps_run] == ["one", "two", "three"]
    assert state == "completed"
    # the recovery is logged and counted by the worker whose stalled-job check took the job back
    assert "worker.job_stalled" in recovered and ex in recovered.split("worker.job_stalled")[1]
    assert stalled == [({"queue": "workflow.execute.us"}, 1.0)]


async def test_sigterm_lets_the_active_job_finish(wsettings: Settings, tmp_path: Path) -> None:
    with http_recorder() as rec:
        async with seeder(wsettings) as s:
            t = await s.tenant()
            wf = await s.workflow(
                t, [{"id": "s", "type": "http", "url": rec.url("/slow", ms=2000)}]
            )
            (ex,) = await s.executions(t, wf, [None])
            env = _env(wsettings, SHUTDOWN_GRACE_MS="10000", HEARTBEAT_INTERVAL_MS="200")
            with worker_process(env, tmp_path) as wp:
                await _until(lambda: rec.count("/slow") == 1, 20, "the slow step")

                async def busy() -> bool:
                    live = await list_processes(s.queues, role="worker")
                    return bool(live) and live[0]["activeByTenant"] == {t: 1}

                await eventually(busy, 5, "heartbeat shows the active job")
                wp.signal(signal.SIGTERM)
                assert wp.wait(timeout=15) == 0
                out = wp.output()
            assert (await s.statuses([ex]))[ex] == "succeeded"
            assert await s.queues.redis.zcard(keys.processes(s.queues.settings.queue_prefix)) == 0
    assert rec.finished() and "worker.stopped" in out


async def test_job_cut_off_by_grace_is_recovered_not_failed(
    wsettings: Settings, tmp_path: Path
) -> None:
    with http_recorder() as rec:
        async with seeder(wsettings) as s:
            t = await s.tenant()
            wf = await s.workflow(t, [{"id": "s", "type": "http", "url": rec.url("/block")}])
            (ex,) = await s.executions(t, wf, [None])
            env = _env(wsettings, SHUTDOWN_GRACE_MS="300")
            with worker_process(env, tmp_path, "first") as wp:
                await _until(lambda: rec.count("/block") == 1, 20, "the blocking step")
                with worker_process(_env(wsettings), tmp_path, "second") as standby:
                    await asyncio.to_thread(wait_started, standby)
                    wp.signal(signal.SIGTERM)  # grace 300 ms: the blocked step is cut off
                    assert wp.wait(timeout=15) == 0
                    assert "execution.handed_back" in wp.output()
                    rec.release.set()
                    await s.wait_status([ex], within=30)  # ... and the standby finishes it
                    standby.signal(signal.SIGTERM)
                    assert standby.wait(timeout=15) == 0
            queue = s.queues.create_queue("workflow.execute.us")
            assert await queue.get_job_state(ex) == "completed"
            job = await s.queues.redis.hgetall(f"{wsettings.queue_prefix}:workflow.execute.us:{ex}")
    assert "failedReason" not in job and job.get("stc", "0") == "0"  # never failed nor stalled
    assert rec.count("/block") == 2


def test_redis_unreachable_exits_nonzero_fast(
    worker_db: str, redis_prefix: str, tmp_path: Path
) -> None:
    env = worker_env(redis_prefix, worker_db, QUEUE_REDIS_PORT=str(free_port()), LOG_FORMAT="text")
    started = time.monotonic()
    with worker_process(env, tmp_path) as wp:
        code = wp.wait(timeout=20)
        out = wp.output()
    assert code != 0
    assert time.monotonic() - started < 10
    errors = [line for line in out.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "queue_not_ready" in errors[0] and "unreachable" in errors[0], out
