"""Benchmark: server time of the operations console's pages at a million stored executions.

Creates a throwaway PostgreSQL database, migrates it, creates 20 tenants with 5 workflows
each and a schedule through the store, then inserts ``--rows`` executions with one
``INSERT ... SELECT generate_series`` (spread over the last ``rows x 2.5 s``, 3% failed, 1%
cancelled, every hundredth from the schedule) and a few step runs for the execution the
detail page shows. The console then runs in process (the real application over
``httpx.ASGITransport``, real Redis under a throwaway key prefix, no network in the timing)
and each page is requested ``--requests`` times after a warm-up:

* ``overview``: the live overview (status document from Redis, last hour's activity, next
  timers);
* ``executions``: the executions list, first page, no filter;
* ``executions_filtered``: status ``failed`` of one tenant, then one workflow's executions in
  a time range (the two alternate);
* ``executions_page2``: the second page of the unfiltered list (cursor);
* ``detail``: an execution with its steps.

    python bench/console.py [--rows 1000000] [--requests 50]

Last line: JSON with ``p50_ms`` and ``p99_ms`` per page (target: p99 <= 100 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import sys
import time
import uuid
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import httpx
import redis.asyncio as aioredis

from conveyor.api.app import create_app
from conveyor.api.context import open_context
from conveyor.settings import load_settings
from conveyor.store import Store, asyncpg_dsn, migrate

ADMIN_DSN = os.environ.get("TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_HOST = os.environ.get("TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("TEST_REDIS_PORT", "6379"))
TOKEN = "bench-console-admin-token"
TENANTS, WORKFLOWS = 20, 5

SEED_SQL = """
INSERT INTO executions (id, tenant_id, workflow_id, workflow_version, status, region,
    triggered_by, input, output, error, next_step, steps_run, lease, attempts, schedule_id,
    created_at, queued_at, enqueued_at, started_at, finished_at, updated_at)
SELECT lpad(to_hex(i), 32, '0'),
       ($1::text[])[1 + i % {tenants}],
       ($2::text[])[1 + (i % {tenants}) * {workflows} + (i / {tenants}) % {workflows}],
       1,
       CASE WHEN i % 33 = 0 THEN 'failed' WHEN i % 97 = 0 THEN 'cancelled'
            ELSE 'succeeded' END,
       'us', CASE WHEN i % 100 = 0 THEN 'schedule' ELSE 'api' END,
       jsonb_build_object('order', i), jsonb_build_object('ok', true),
       CASE WHEN i % 33 = 0 THEN '{{"message": "HTTP 502 from upstream"}}'::jsonb END,
       2, 2, 1, 1,
       CASE WHEN i % 100 = 0 THEN $3 END,
       t, t, t, t + (5 + i % 75) * interval '1 millisecond',
       t + (60 + i % 75) * interval '1 millisecond', t
FROM generate_series(1, $4::int) AS i,
     LATERAL (SELECT now() - ($4::int - i) * interval '2.5 seconds' AS t) AS ts
"""


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def seed(url: str, rows: int) -> dict[str, Any]:
    settings = load_settings({"DATABASE_URL": url})
    await migrate(settings)
    async with Store(settings) as store:
        tenants = [await store.tenants.create(f"tenant-{i:02d}") for i in range(TENANTS)]
        workflows: list[str] = []
        for t in tenants:
            for j in range(WORKFLOWS):
                doc = {"name": f"wf-{j}", "steps": [{"id": "a", "type": "noop"}]}
                workflows.append((await store.workflows.create(t.id, doc)).id)
        schedule = await store.schedules.create(
            tenants[0].id, workflows[0], cron="*/5 * * * *", timezone="UTC"
        )
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        started = time.perf_counter()
        sql = SEED_SQL.format(tenants=TENANTS, workflows=WORKFLOWS)
        await conn.execute(sql, [t.id for t in tenants], workflows, schedule.id, rows)
        inserted_s = time.perf_counter() - started
        detail_id = f"{rows:032x}"
        await conn.execute(
            """INSERT INTO step_runs (execution_id, seq, tenant_id, step_id, step_type, status,
                   attempts, input, output, output_truncated, error, started_at, finished_at)
               SELECT e.id, s, e.tenant_id, 'step-' || s, 'transform', 'succeeded', 1,
                      '{"expression": "{a: input.order}"}'::jsonb,
                      jsonb_build_object('a', s, 'rows', 42), false, NULL,
                      e.started_at + s * interval '10 ms', e.started_at + (s * 10 + 4) * interval '1 ms'
               FROM executions e, generate_series(0, 5) AS s WHERE e.id = $1""",
            detail_id,
        )
        await conn.execute("ANALYZE")
        analysed_s = time.perf_counter() - started
    finally:
        await conn.close()
    return {
        "tenant": tenants[3].id,
        "workflow": workflows[17],
        "detail": detail_id,
        "insert_s": round(inserted_s, 1),
        "seed_s": round(analysed_s, 1),
    }


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.999999) - 1))]


async def measure(url: str, seeded: dict[str, Any], requests: int) -> dict[str, Any]:
    prefix = f"cvb{uuid.uuid4().hex[:10]}"
    settings = load_settings(
        {"DATABASE_URL": url, "ADMIN_TOKEN": TOKEN, "QUEUE_REDIS_HOST": REDIS_HOST,
         "QUEUE_REDIS_PORT": str(REDIS_PORT), "QUEUE_PREFIX": prefix}
    )  # fmt: skip
    try:
        async with open_context(settings, heartbeat=False) as ctx:
            app = create_app(settings, context=ctx)
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://b") as client:
                    return await _pages(client, seeded, requests)
    finally:
        r = aioredis.Redis(host=REDIS_HOST, port=REDIS_PORT)
        keys = [k async for k in r.scan_iter(match=f"{prefix}:*", count=1000)]
        if keys:
            await r.delete(*keys)
        await r.aclose()


async def _pages(
    client: httpx.AsyncClient, seeded: dict[str, Any], requests: int
) -> dict[str, Any]:
    page = await client.get("/console/sign-in")
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert csrf is not None
    r = await client.post("/console/sign-in", data={"csrf": csrf.group(1), "token": TOKEN})
    assert r.status_code == 303, r.text
    first = await client.get("/console/executions")
    cursor = re.search(r'cursor=([^"&]+)"', first.text)
    assert cursor is not None
    t, w = seeded["tenant"], seeded["workflow"]
    pages: dict[str, list[str]] = {
        "overview": ["/console"],
        "executions": ["/console/executions"],
        "executions_filtered": [
            f"/console/executions?tenant={t}&status=failed",
            f"/console/executions?workflow={w}&since=2000-01-01T00:00&until=2999-01-01T00:00",
        ],
        "executions_page2": [f"/console/executions?cursor={cursor.group(1)}"],
        "detail": [f"/console/executions/{seeded['detail']}"],
    }
    result: dict[str, Any] = {"p50_ms": {}, "p99_ms": {}, "rows_shown": {}}
    for name, paths in pages.items():
        for path in paths:  # warm-up
            for _ in range(3):
                assert (await client.get(path)).status_code == 200, path
        timings: list[float] = []
        for i in range(requests):
            path = paths[i % len(paths)]
            started = time.perf_counter()
            r = await client.get(path)
            timings.append((time.perf_counter() - started) * 1000)
            assert r.status_code == 200, (path, r.status_code)
        rows = len(re.findall(r'<a href="/console/executions/[0-9a-f]{32}"><code>', r.text))
        result["p50_ms"][name] = round(statistics.median(timings), 2)
        result["p99_ms"][name] = round(_pct(timings, 0.99), 2)
        result["rows_shown"][name] = rows
        print(f"{name:22s} p50 {result['p50_ms'][name]:7.2f} ms  p99 {result['p99_ms'][name]:7.2f} ms"
              f"  ({rows} rows listed)", file=sys.stderr)  # fmt: skip
    return result


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()
    name = f"conveyor_bench_console_{uuid.uuid4().hex[:8]}"
    await _admin(f'CREATE DATABASE "{name}"')
    url = f"{ADMIN_DSN.rsplit('/', 1)[0]}/{name}"
    try:
        seeded = await seed(url, args.rows)
        print(f"seeded {args.rows} executions: insert {seeded['insert_s']} s, with ANALYZE "
              f"{seeded['seed_s']} s", file=sys.stderr)  # fmt: skip
        figures = await measure(url, seeded, args.requests)
    finally:
        await _admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    print(json.dumps({"rows": args.rows, "requests": args.requests, "insert_s": seeded["insert_s"],
                      **figures}))  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
