"""A retention pass over many rows on PostgreSQL (``conveyor prune``, its own process, as the
scheduler is) while triggers run in this process: no trigger is lost and
trigger latency stays low (batches of RETENTION_BATCH_SIZE, one short transaction each, a pause
between them). Prints the trigger p50/p99 without (PRUNE_TRIGGERS triggers before the prune and
as many after) and during the prune (``pytest -s``).

PRUNE_ROWS (default 20,000 executions, each with two step runs and a fired timer) and
PRUNE_TRIGGERS (default 1,000) size it; docs/operations.md's figures were measured with
``PRUNE_ROWS=50000 PRUNE_TRIGGERS=2000``."""

from __future__ import annotations

import asyncio
import os
import statistics
import sys
import time
from datetime import timedelta
from typing import Any

import pytest

from conveyor.settings import load_settings
from conveyor.store import Store, migrate, utcnow
from tests.helpers import env_for
from tests.store import _retention_seed as seed

ROWS = int(os.environ.get("PRUNE_ROWS", "20000"))
TRIGGERS = int(os.environ.get("PRUNE_TRIGGERS", "1000"))
SEED_CHUNK = 25_000
CONCURRENCY = 4
P99_BOUND_MS = 250.0
"""Generous: a 2-core machine shared with other work. Measured figures are printed."""

_SEED_SQL = """
WITH e AS (
  INSERT INTO executions (id, tenant_id, workflow_id, workflow_version, status, region,
      triggered_by, input, output, next_step, steps_run, created_at, queued_at, started_at,
      finished_at, updated_at)
  SELECT CASE WHEN $5 THEN lpad(to_hex((extract(epoch FROM $3::timestamptz) * 1000)::bigint
                                       + g::bigint * 10000), 12, '0') || '7' || substr(md5(g::text), 1, 19)
              ELSE md5('old' || g) END, $1::text, $2::text, 1, 'succeeded', 'us', 'api', '{"order": 12345}'::jsonb,
         '{"ok": true, "total": 99.5}'::jsonb, 2, 2, $3::timestamptz, $3::timestamptz, $3::timestamptz, $3::timestamptz + g * interval '1 ms', $3::timestamptz
    FROM generate_series($6::int + 1, $6::int + $4::int) g
  RETURNING id, tenant_id, workflow_id, created_at
), s AS (
  INSERT INTO step_runs (execution_id, seq, tenant_id, step_id, step_type, status, attempts,
      input, output, output_truncated, error, started_at, finished_at)
  SELECT e.id, k, e.tenant_id, 'step' || k, 'http', 'succeeded', 1, '{"url": "https://x"}',
         '{"status": 200, "body": {"id": 1}}', false, NULL, e.created_at, e.created_at
    FROM e, generate_series(0, 1) k
)
INSERT INTO timers (id, tenant_id, execution_id, workflow_id, region, seq, due_at, status,
    fired_at, created_at)
SELECT md5('t' || e.id), e.tenant_id, e.id, e.workflow_id, 'us', 0, e.created_at, 'fired',
       e.created_at, e.created_at
  FROM e
"""


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _triggers(
    store: Store, tenant: str, workflow: str, until: asyncio.Event | int
) -> tuple[list[float], list[str]]:
    """Trigger from CONCURRENCY tasks until ``until`` is set (or that many triggers)."""
    latencies: list[float] = []
    made: list[str] = []

    async def one_task() -> None:
        while True:
            if isinstance(until, int):
                if len(made) >= until:
                    return
            elif until.is_set():
                return
            started = time.perf_counter()
            execution, created = await store.executions.create(tenant, workflow, {"n": 1})
            latencies.append((time.perf_counter() - started) * 1000)
            assert created
            made.append(execution.id)

    await asyncio.gather(*(one_task() for _ in range(CONCURRENCY)))
    return latencies, made


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["rows", "partitions"])
async def test_prune_under_load_loses_no_trigger(
    fresh_pg_url: str, redis_prefix: str, layout: str
) -> None:
    """``rows``: ids that are not time-ordered (all in the default partition): batched
    deletes. ``partitions``: time-ordered ids 30 days old, 10 s apart (a day's partitions hold
    8,640): whole days are dropped — DETACH locks the tables for a moment — while triggers
    run."""
    settings = load_settings({}, database_url=fresh_pg_url)
    await migrate(settings)
    async with Store(settings, pool_size=CONCURRENCY + 2) as store:
        owner = await seed.tenant(store, "busy", utcnow() - timedelta(days=90))
        old = utcnow() - timedelta(days=30)
        by_day = layout == "partitions"
        if by_day:  # the days the ids fall in, as the scheduler would have made them
            await store.partitions.ensure(old, ROWS * 10 // 86400 + 1)
        async with store.engine.begin() as conn:
            raw: Any = (await conn.get_raw_connection()).driver_connection
            for start in range(0, ROWS, SEED_CHUNK):  # statements of bounded duration
                count = min(SEED_CHUNK, ROWS - start)
                await raw.execute(_SEED_SQL, owner.id, owner.workflow_id, old, count, by_day, start)
            await raw.execute("ANALYZE")
        live = await store.workflows.create(owner.id, seed.NOOP)

        _, warm = await _triggers(store, owner.id, live.id, 200)  # warm pools and caches
        baseline, before = await _triggers(store, owner.id, live.id, TRIGGERS)

        done = asyncio.Event()

        async def prune() -> tuple[float, str]:
            """``conveyor prune`` in its own process, as the scheduler would run it."""
            started = time.perf_counter()
            try:
                proc = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "conveyor.cli", "prune",
                    env=env_for(DATABASE_URL=fresh_pg_url, QUEUE_PREFIX=redis_prefix),
                    stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                )  # fmt: skip
                out, err = await asyncio.wait_for(proc.communicate(), 600)
            finally:
                done.set()
            assert proc.returncode == 0, err.decode()[-2000:]
            return time.perf_counter() - started, out.decode()

        (prune_s, printed), (during, made) = await asyncio.gather(
            prune(), _triggers(store, owner.id, live.id, done)
        )
        total = next(line.split() for line in printed.splitlines() if line.startswith("total"))
        assert total[-4:-1] == [str(ROWS), str(2 * ROWS), str(ROWS)], (
            printed
        )  # execs, steps, timers
        assert ("partitions dropped" in printed) is by_day, printed

        after, later = await _triggers(store, owner.id, live.id, TRIGGERS)  # without, once more
        baseline += after
        before += later
        remaining = await seed.ids(store)  # every trigger's execution, and nothing old
        assert len(made) > 0 and set(made) <= remaining and set(before) <= remaining
        assert len(remaining) == len(warm) + len(before) + len(made)
        figures: dict[str, object] = {
            "layout": layout,
            "rows": ROWS,
            "prune_s": round(prune_s, 1),  # the process's start-up included
            "rows_per_s": round(ROWS / prune_s),
            "triggers_during": len(made),
            "p50_ms_without": round(statistics.median(baseline), 2),
            "p99_ms_without": round(_pct(baseline, 0.99), 2),
            "p50_ms_during": round(statistics.median(during), 2),
            "p99_ms_during": round(_pct(during, 0.99), 2),
            "max_ms_during": round(max(during), 2),
        }
        print(f"\nprune under load: {figures}")
        assert _pct(during, 0.99) < P99_BOUND_MS, figures
