"""Tenant limits across three real worker processes (against the real Redis and Postgres):
the cap holds for the fleet, a SIGKILLed worker's slots free themselves within the lock
duration, the start rate holds within 10 %."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
from sqlalchemy import func, select

from conveyor.runtime import read_metrics
from conveyor.settings import Settings
from conveyor.store import TenantLimits
from conveyor.store.schema import executions
from tests.worker._support import (
    Hit,
    WorkerProc,
    http_recorder,
    wait_started,
    worker_env,
    worker_process,
)
from tests.worker.conftest import Seeder, seeder

pytestmark = pytest.mark.slow


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    return worker_env(
        settings.queue_prefix,
        settings.database_url,
        HTTP_ALLOWLIST="127.0.0.1",
        EXECUTION_WORKER_CONCURRENCY="4",
        **extra,
    )


@contextmanager
def fleet(env: dict[str, str], tmp_path: Path, n: int = 3) -> Iterator[list[WorkerProc]]:
    with ExitStack() as stack:
        procs = [stack.enter_context(worker_process(env, tmp_path, f"w{i}")) for i in range(n)]
        for wp in procs:
            wait_started(wp)
        yield procs


def _stop(procs: list[WorkerProc]) -> None:
    for wp in procs:
        wp.signal(signal.SIGTERM)
    for wp in procs:
        assert wp.wait(timeout=20) == 0, wp.output()[-2000:]


async def _running(s: Seeder, tenant: str) -> int:
    query = select(func.count()).where(
        executions.c.tenant_id == tenant, executions.c.status == "running"
    )
    async with s.store.engine.connect() as conn:
        return int((await conn.execute(query)).scalar_one())


async def test_cap_holds_across_three_workers(wsettings: Settings, tmp_path: Path) -> None:
    with http_recorder() as rec:
        async with seeder(wsettings) as s:
            a, b = await s.tenant("a"), await s.tenant("b")
            await s.store.limits.set(TenantLimits(a, concurrency=3))  # the override

            def slow(t: str) -> list[dict[str, str]]:
                return [{"id": "call", "type": "http", "url": rec.url("/slow", ms=150, t=t)}]

            wa, wb = await s.workflow(a, slow("a")), await s.workflow(b, slow("b"))
            # the setting: 4 per worker, i.e. 12 for A without a fleet-wide cap
            with fleet(_env(wsettings, EXECUTION_TENANT_CONCURRENCY="50"), tmp_path) as procs:
                a_ids = await s.executions(a, wa, [None] * 36)
                b_ids = await s.executions(b, wb, [None] * 6)
                samples: list[int] = []

                async def sample() -> None:
                    while True:
                        samples.append(await _running(s, a))
                        await asyncio.sleep(0.01)

                sampler = asyncio.create_task(sample())
                try:
                    await s.wait_status(a_ids + b_ids, within=40)
                finally:
                    sampler.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await sampler
                _stop(procs)
            metrics = await read_metrics(s.queues)
            parked = {lb["reason"]: v for lb, v in metrics.counters.get("jobs_parked_total", [])}
    assert len(samples) > 30  # sampled throughout the run (every ~10 ms plus the query)
    assert max(samples) <= 3, max(samples)  # never more than the cap, fleet-wide
    assert max(samples) == 3  # ... and the cap is used
    hits = rec.finished()
    assert len(hits) == 42
    # the recorder agrees: never more than three of A's calls at once, B's ran beside them
    assert _most_at_once([h for h in hits if h.query["t"] == "a"]) == 3
    assert _most_at_once(hits) > 3
    assert parked.get("concurrency", 0) > 0


def _most_at_once(hits: list[Hit]) -> int:
    edges = sorted([(h.start, 1) for h in hits] + [(h.end, -1) for h in hits])
    most = now = 0
    for _t, step in edges:
        now += step
        most = max(most, now)
    return most


async def test_sigkilled_worker_frees_its_slots_within_the_lock_duration(
    wsettings: Settings, tmp_path: Path
) -> None:
    lock_ms = 2000
    env = _env(
        wsettings,
        EXECUTION_TENANT_CONCURRENCY="3",
        EXECUTION_LOCK_DURATION_MS=str(lock_ms),
        EXECUTION_STALLED_INTERVAL_MS="1000",
    )
    with http_recorder() as rec:
        async with seeder(wsettings) as s:
            a = await s.tenant("a")
            block = await s.workflow(a, [{"id": "b", "type": "http", "url": rec.url("/block")}])
            quick = await s.workflow(a, [{"id": "q", "type": "http", "url": rec.url("/quick")}])
            with worker_process(env, tmp_path, "victim") as victim:
                await asyncio.to_thread(wait_started, victim)
                blocked = await s.executions(a, block, [None] * 3)
                deadline = time.monotonic() + 20
                while rec.count("/block") < 3:  # the victim holds all three slots
                    assert time.monotonic() < deadline, victim.output()[-2000:]
                    await asyncio.sleep(0.02)
                with fleet(env, tmp_path, 2) as others:
                    quick_ids = await s.executions(a, quick, [None] * 4)
                    await asyncio.sleep(1.0)  # parked by the others: A is at its cap
                    assert rec.count("/quick") == 0
                    assert await _running(s, a) == 3
                    killed_at = time.monotonic()
                    victim.proc.kill()  # SIGKILL, holding three slots
                    victim.wait(timeout=10)
                    # the first start after the kill: a parked job promoted into a freed slot,
                    # or one of the victim's jobs recovered (stalled check) taking it first
                    while rec.count("/quick") == 0 and rec.count("/block") == 3:
                        assert time.monotonic() - killed_at < 10, "parked work never started"
                        await asyncio.sleep(0.01)
                    first = min(h.start for h in rec.hits if h.start > killed_at)
                    rec.release.set()
                    await s.wait_status(blocked + quick_ids, within=30)
                    _stop(others)
    freed_after = first - killed_at
    # the slots free when the leases expire (<= the lock duration after the last renewal);
    # the parked jobs' fallback delay (>= 5 s) is not what started them
    assert freed_after <= lock_ms / 1000 + 0.5, freed_after
    assert freed_after >= 0.5, freed_after  # ... and not before: the cap held meanwhile


async def test_start_rate_holds_across_three_workers(wsettings: Settings, tmp_path: Path) -> None:
    rate, n = 10.0, 31
    async with seeder(wsettings) as s:
        a = await s.tenant("a")
        await s.store.limits.set(TenantLimits(a, concurrency=100, start_rate=rate, start_burst=1))
        wf = await s.workflow(a, [{"id": "n", "type": "noop"}])
        with fleet(_env(wsettings), tmp_path) as procs:
            ids = await s.executions(a, wf, [None] * n)
            await s.wait_status(ids, within=30)
            _stop(procs)
        async with s.store.engine.connect() as conn:
            rows = await conn.execute(
                select(executions.c.started_at).where(executions.c.id.in_(ids))
            )
            starts = sorted(r.started_at.timestamp() for r in rows)
        parked = {
            labels["reason"]: v
            for labels, v in (await read_metrics(s.queues)).counters.get("jobs_parked_total", [])
        }
    measured = (n - 1) / (starts[-1] - starts[0])
    assert abs(measured - rate) <= 0.1 * rate, measured
    # spaced, not bunched: any ten consecutive intervals last about a second (one start may be
    # late by scheduling jitter on a busy machine, the next one is on time again)
    spans = [round(starts[i + 10] - starts[i], 3) for i in range(n - 10)]
    assert min(spans) >= 10 / rate - 0.15, spans
    assert parked.get("rate", 0) >= n - 2  # each parked (about) once: no busy cycling
    assert parked.get("rate", 0) <= n + 5


async def test_per_process_cap_with_a_larger_fleet_cap(wsettings: Settings, tmp_path: Path) -> None:
    env = _env(
        wsettings, EXECUTION_TENANT_CONCURRENCY="10", EXECUTION_TENANT_CONCURRENCY_PER_PROCESS="1"
    )
    with http_recorder() as rec:
        async with seeder(wsettings) as s:
            a = await s.tenant("a")
            wf = await s.workflow(a, [{"id": "c", "type": "http", "url": rec.url("/slow", ms=150)}])
            with fleet(env, tmp_path, 2) as procs:
                ids = await s.executions(a, wf, [None] * 8)
                await s.wait_status(ids, within=30)
                _stop(procs)
    # one at a time per process, two processes: never more than two at once, and two is used
    assert _most_at_once(rec.finished()) == 2
