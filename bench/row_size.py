"""Bytes per execution, step run, timer and schedule tick on disk (capacity planning).

Creates a scratch PostgreSQL database (``BENCH_PG_DSN``'s server, dropped afterwards) and a
scratch SQLite file, migrates both, inserts N finished executions (default 20,000) each with S
step runs (default 3), a fired timer and a schedule tick — payloads of a typical small
workflow: an input of ~150 bytes of JSON, step outputs of ~250 — and compares
``pg_total_relation_size`` (table + indexes + TOAST, after VACUUM ANALYZE) / SQLite ``dbstat``
before and after. Then prunes them all (one retention pass) and reports the pruning rate.

    .venv/bin/python bench/row_size.py [--rows 20000] [--steps 3]

The last line printed is one JSON object per database: ``bytes_per_execution``,
``bytes_per_step_run``, ``bytes_per_timer``, ``bytes_per_tick``, ``prune_executions_per_s``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import text

from conveyor.settings import load_settings
from conveyor.store import Store, migrate, new_id
from conveyor.store.schema import executions, schedule_ticks, schedules, step_runs, timers
from conveyor.workers.retention import Retention

ADMIN_DSN = os.environ.get("BENCH_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
TABLES = ("executions", "step_runs", "timers", "schedule_ticks")
INPUT = {"orderId": "ord_8f14e45fceea167a5a36dedd4bea2543", "customer": {"id": 48213,
         "email": "someone@example.com"}, "amount": 129.5, "currency": "EUR"}  # fmt: skip
OUTPUT = {"status": 200, "body": {"id": "ch_3NqPvq2eZvKYlo2C0aK8", "paid": True,
          "receipt": "https://pay.example.com/r/3NqPvq2eZvKYlo2C", "amount": 12950},
          "headers": {"content-type": "application/json"}}  # fmt: skip


async def _sizes(store: Store) -> dict[str, int]:
    async with store.engine.connect() as conn:
        if store.is_postgres:
            await conn.execute(text("COMMIT"))
            await conn.execute(text("VACUUM ANALYZE"))
            rows = await conn.execute(  # a partitioned table: the sum of its partitions
                text("SELECT c.relname, sum(pg_total_relation_size(t.relid)) FROM pg_class c "
                     "CROSS JOIN LATERAL (SELECT relid FROM pg_partition_tree(c.oid) WHERE isleaf "
                     "UNION ALL SELECT c.oid WHERE c.relkind = 'r') t WHERE c.relname = ANY(:n) "
                     "AND c.relkind IN ('r', 'p') GROUP BY c.relname"),
                {"n": list(TABLES)})  # fmt: skip
        else:
            rows = await conn.execute(
                text("SELECT m.tbl_name, SUM(d.pgsize) FROM dbstat d JOIN sqlite_master m "
                     "ON m.name = d.name GROUP BY m.tbl_name"))  # fmt: skip
        return {name: int(size) for name, size in rows.all() if name in TABLES}


async def _fill(store: Store, n: int, steps: int) -> None:
    tenant = await store.tenants.create("bench")
    wf = await store.workflows.create(tenant.id, {"name": "wf", "steps": [
        {"id": f"s{i}", "type": "noop"} for i in range(steps)]})  # fmt: skip
    schedule_id = new_id()
    t0 = datetime.now(UTC) - timedelta(days=30)
    async with store.engine.begin() as conn:
        await conn.execute(schedules.insert().values(
            id=schedule_id, tenant_id=tenant.id, workflow_id=wf.id, cron="* * * * * *",
            timezone="UTC", created_at=t0, updated_at=t0))  # fmt: skip
    for start in range(0, n, 1000):
        ex, st, tm, tk = [], [], [], []
        for i in range(start, min(n, start + 1000)):
            eid, at = new_id(), t0 + timedelta(seconds=i)
            ex.append(dict(id=eid, tenant_id=tenant.id, workflow_id=wf.id, workflow_version=1,
                status="succeeded", region="us", triggered_by="schedule", input=INPUT,
                output=OUTPUT, next_step=steps, steps_run=steps, lease=1, attempts=1,
                schedule_id=schedule_id, created_at=at, queued_at=at, enqueued_at=at,
                started_at=at, finished_at=at, updated_at=at, scheduled_for=at))  # fmt: skip
            st += [dict(execution_id=eid, seq=k, tenant_id=tenant.id, step_id=f"s{k}",
                        step_type="http", status="succeeded", attempts=1, input=INPUT,
                        output=OUTPUT, started_at=at, finished_at=at) for k in range(steps)]  # fmt: skip
            tm.append(dict(id=new_id(), tenant_id=tenant.id, execution_id=eid, workflow_id=wf.id,
                           region="us", seq=0, due_at=at, status="fired", fired_at=at,
                           created_at=at))  # fmt: skip
            tk.append(dict(schedule_id=schedule_id, fire_time=at, tenant_id=tenant.id,
                           execution_id=eid, created_at=at))  # fmt: skip
        async with store.engine.begin() as conn:
            for table, rows in ((executions, ex), (step_runs, st), (timers, tm),
                                (schedule_ticks, tk)):  # fmt: skip
                await conn.execute(table.insert(), rows)


async def measure(url: str, n: int, steps: int) -> dict[str, Any]:
    settings = load_settings({}, database_url=url, retention_pause_ms=0)
    await migrate(settings)
    async with Store(settings, pool_size=2) as store:
        before = await _sizes(store)
        await _fill(store, n, steps)
        after = await _sizes(store)
        grew = {t: after[t] - before.get(t, 0) for t in TABLES}
        started = time.perf_counter()
        report = await Retention(store, settings).run_pass()
        prune_s = time.perf_counter() - started
    assert report.pruned.executions == n
    return {
        "database": "postgresql" if settings.is_postgres else "sqlite",
        "executions": n,
        "steps_per_execution": steps,
        "bytes_per_execution": round(grew["executions"] / n),
        "bytes_per_step_run": round(grew["step_runs"] / (n * steps)),
        "bytes_per_timer": round(grew["timers"] / n),
        "bytes_per_tick": round(grew["schedule_ticks"] / n),
        "bytes_per_execution_all_in": round(sum(grew.values()) / n),
        "prune_executions_per_s": round(n / prune_s),
    }


async def main(n: int, steps: int) -> list[dict[str, Any]]:
    name = f"conveyor_bench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        pg = await measure(f"{ADMIN_DSN.rsplit('/', 1)[0]}/{name}", n, steps)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    with tempfile.TemporaryDirectory() as tmp:
        lite = await measure(f"sqlite:///{tmp}/bench.db", n, steps)
    return [pg, lite]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.rows, args.steps))))
