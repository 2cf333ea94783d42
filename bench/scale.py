"""Scale curves: per-unit cost at three sizes a decade apart, in one run, and the ratio of the
largest size's cost to the smallest's (target <= 1.5).

Dimensions (``--dims``, default all four):

* **executions** stored — 10k → 100k → 1M rows (``--exec-sizes``) in ONE database grown
  between measurements (``INSERT … SELECT … generate_series``: time-ordered UUIDv7-like ids,
  95 % succeeded / 3 % failed / 2 % cancelled, two step runs each, spread over 30 days, 90 % of
  them the measured tenant's, the rest another tenant's; ``VACUUM ANALYZE`` after each growth).
  Through a real ``conveyor api`` process, ``--requests`` sequential requests per figure:
  trigger (``POST /api/workflows/{id}/executions``), ``GET /api/executions`` first page and
  100th page (cursor followed 99 times, limit 50), filtered lists (``status=failed``,
  ``status=failed&status=cancelled``, ``workflowId=``), execution detail (random ids). p99 each;
  ``EXPLAIN ANALYZE`` of the list queries at every size (``--explain``).
* **timers** pending — 10k → 100k → 1M pending timers due in a day or more (background, seeded
  by SQL), then ``bench/timer_precision.py``'s measurement: a fresh ``conveyor timers`` process
  fires ``--timers`` timers due over ``--timer-window`` s; its CPU per fired timer and the
  lateness p99 (arrival at a consumer - due instant). ``--timer-trace``: the dispatcher at DEBUG
  (its claim/mark durations and late fires, split into wake-up and Redis call), the timers that
  reached the consumer > 50 ms late, and the database's counters and the machine's pressure
  stall time (``/proc/pressure``) over the window.
* **schedules** — 100 → 1,000 → 10,000 every-minute schedules through ``bench/cron_scale.py``'s
  ``run_size`` (scheduler + worker processes, fresh database per size): scheduler CPU per fired
  tick, and the lag of the last tick of a minute (the latest minute tick made runnable).
* **tenants** with a backlog — 10 → 100 → 1,000 tenants (``--tenant-sizes``; add 10000 if time
  allows) sharing a backlog of noop executions evenly (``--backlog``, at least
  ``--per-tenant-min`` per tenant, so that every tenant has one); enqueued through
  ``ExecutionDispatcher.enqueue_many`` (batches of 1,000, tenants interleaved): this process's
  CPU + Redis's CPU per enqueue. Then one worker drains it while light tenants submit, one
  execution at a time through ``ExecutionDispatcher.enqueue``; their enqueue→start p50/p99:

  - **steady**: ``--light`` tenants with nothing pending, one execution each,
    ``--light-spacing`` s apart, from when the first round (one job of every tenant) has run —
    the headline figure, "a light tenant arriving into a backlog";
  - **together**: ``--light`` such tenants, 0.1 s apart from 1 s after the worker started: with
    1,000 tenants or more they arrive during the first round, whose rest runs before them (FIFO
    among equal priorities); the bound is one round (tenants ÷ throughput, printed);
  - **busy**: one tenant submitting ``--light`` executions ``--light-spacing`` s apart from 1 s
    after the worker started (the figure of the first run): once that rate exceeds its fair
    share (throughput ÷ tenants), its k-th pending job waits about k rounds.

  And the worker's CPU per execution.

Each dimension creates and drops its own databases and Redis key prefixes.

    .venv/bin/python bench/scale.py [--quick] [--dims executions,timers,schedules,tenants]

``--quick``: small sizes (executions 10k/30k/100k, timers 1k/10k/100k, schedules 10/100/1,000
for one minute, tenants 5/50/500), fewer requests: a smoke run of a few minutes (the schedules
dimension waits for minute boundaries).

Last line: JSON with ``executions_list_p99_ms_1m``, ``timer_cost_ratio``,
``schedule_cost_ratio``, ``tenant_cost_ratio``, ``trigger_p99_ms_1m`` (figures at the largest
executions size measured, whatever it is), plus per-dimension details.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil
import redis.asyncio as aioredis

from _exec_common import (
    ADMIN_DSN,
    REDIS_HOST,
    REDIS_PORT,
    RssSampler,
    bench_env,
    percentile,
    seeded,
)
from _procs import Procs
from api_trigger import ADMIN_TOKEN, free_port, setup_tenant, wait_http
from fairness import worker_env, workers_up

ROOT = Path(__file__).resolve().parents[1]
PAGE = 50


def ratio(a: float | None, b: float | None) -> float | None:
    return None if not a or b is None else round(b / a, 2)


# --- executions stored ---------------------------------------------------------------------
ID_SQL = (
    "lpad(to_hex((extract(epoch FROM {ts}) * 1000)::bigint), 12, '0') || '7'"
    " || substr(md5(random()::text), 1, 3) || '8' || substr(md5(random()::text), 1, 15)"
)
"""A 32-hex UUIDv7-like id from the timestamp ``{ts}`` (as ``new_id()``: 48-bit ms, version 7,
variant bits 10 — '8' — and random bits)."""

SEED_SQL = f"""
WITH e AS (
  INSERT INTO executions (id, tenant_id, workflow_id, workflow_version, status, region,
      triggered_by, input, output, next_step, steps_run, created_at, queued_at, enqueued_at,
      started_at, finished_at, updated_at)
  SELECT {ID_SQL.format(ts="t.ts")}, t.tenant_id, t.workflow_id, 1, t.status, 'us', 'api',
      jsonb_build_object('orderId', t.g), jsonb_build_object('total', t.g % 1000), 2, 2,
      t.ts, t.ts, t.ts, t.ts + interval '10 ms', t.ts + interval '50 ms', t.ts + interval '50 ms'
  FROM (
    SELECT g,
      CASE WHEN g % 10 = 0 THEN $3 ELSE $1 END AS tenant_id,
      CASE WHEN g % 10 = 0 THEN $4 WHEN g % 2 = 0 THEN $5 ELSE $2 END AS workflow_id,
      CASE WHEN g % 100 < 3 THEN 'failed' WHEN g % 100 < 5 THEN 'cancelled'
           ELSE 'succeeded' END AS status,
      now() - interval '30 days' * random() - interval '1 minute' AS ts
    FROM generate_series($6::bigint, $7::bigint) AS g
  ) AS t
  RETURNING id, tenant_id, created_at
)
INSERT INTO step_runs (execution_id, seq, tenant_id, step_id, step_type, status, attempts,
    input, output, started_at, finished_at)
SELECT e.id, s, e.tenant_id, 'step' || s, 'noop', 'succeeded', 1, '{{}}'::jsonb,
    '{{"ok": true}}'::jsonb, e.created_at, e.created_at + interval '5 ms'
FROM e CROSS JOIN generate_series(0, 1) AS s
"""

LIST_SQL = {
    "first page": "SELECT * FROM executions WHERE tenant_id = $1"
    " ORDER BY created_at DESC, id DESC LIMIT 51",
    "status=failed&status=cancelled": "SELECT * FROM executions WHERE tenant_id = $1"
    " AND status IN ('failed', 'cancelled') ORDER BY created_at DESC, id DESC LIMIT 51",
}


async def grow_executions(conn: asyncpg.Connection, ids: dict[str, str], start: int,
                          stop: int) -> None:  # fmt: skip
    """Rows ``start``..``stop - 1`` (with their step runs), 100k a statement."""
    for lo in range(start, stop, 100_000):
        hi = min(stop, lo + 100_000) - 1
        await conn.execute(SEED_SQL, ids["tenant"], ids["workflow"], ids["other_tenant"],
                           ids["other_workflow"], ids["workflow2"], lo, hi)  # fmt: skip
    await conn.execute("VACUUM ANALYZE executions")
    await conn.execute("VACUUM ANALYZE step_runs")
    await conn.execute("CHECKPOINT")  # the seeding's writes flushed now, not while measuring


def timed(client: httpx.Client, n: int, method: str, url: str, **kw: Any) -> list[float]:
    """``n`` sequential requests; latencies in ms (any status >= 300 is an error)."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = client.request(method, url, **kw)
        out.append((time.perf_counter() - t0) * 1000)
        if r.status_code >= 300:
            raise RuntimeError(f"{method} {url}: {r.status_code} {r.text[:300]}")
    return out


def detail_latencies(client: httpx.Client, ids: list[str]) -> list[float]:
    out = []
    for eid in ids:
        t0 = time.perf_counter()
        r = client.get(f"/api/executions/{eid}")
        out.append((time.perf_counter() - t0) * 1000)
        if r.status_code != 200:
            raise RuntimeError(f"GET /api/executions/{eid}: {r.status_code} {r.text[:300]}")
    return out


def cursor_at(client: httpx.Client, page: int, params: dict[str, Any]) -> str:
    cursor = None
    for _ in range(page - 1):
        doc = client.get("/api/executions", params={**params, **({"cursor": cursor} if cursor
                         else {})}).json()  # fmt: skip
        cursor = find_cursor(doc)
        if cursor is None:
            raise RuntimeError(f"no next cursor in {str(doc)[:300]}")
    assert cursor is not None
    return cursor


def find_cursor(doc: Any) -> str | None:
    if isinstance(doc, dict):
        for k, v in doc.items():
            if k in ("nextCursor", "next_cursor") and isinstance(v, str):
                return v
            found = find_cursor(v)
            if found:
                return found
    return None


async def explain(conn: asyncpg.Connection, tenant: str) -> dict[str, str]:
    walked: dict[str, tuple[str, list[Any]]] = {}
    try:  # what the API runs first (the newest days' partitions; see PgStatements)
        from conveyor.store.pg.statements import WALK, _page_sql, walk_from
    except ImportError:  # a checkout from before the walk (a baseline run)
        pass
    else:
        lo, _ = walk_from(datetime.now(UTC), WALK[0] or 0)
        walked = {
            "first page, walk's first try": (_page_sql(0, False, False, True), [tenant, 51, lo]),
            "status=failed&status=cancelled, walk's first try": (
                _page_sql(2, False, False, True), [tenant, ["failed", "cancelled"], 51, lo]),
        }  # fmt: skip
    out = {}
    for name, (sql, params) in {**{k: (v, [tenant]) for k, v in LIST_SQL.items()},
                                **walked}.items():  # fmt: skip
        rows = await conn.fetch(f"EXPLAIN (ANALYZE, BUFFERS) {sql}", *params)
        plan = [r[0] for r in rows]
        out[name] = " | ".join(p.strip() for p in plan if "->" in p or p is plan[0])[:400] + \
            " | " + plan[-1].strip()  # fmt: skip
    return out


def measure_api(
    base: str, auth: dict[str, str], ids: dict[str, str], detail_ids: list[str], n: int, pid: int
) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Latencies (ms) of each figure's requests, and the API process's CPU ms per request (the
    figure that stays stable while other processes compete for the CPU)."""
    api = psutil.Process(pid)

    def cpu() -> float:
        t = api.cpu_times()
        return float(t.user + t.system)

    lat: dict[str, list[float]] = {}
    cpu_ms: dict[str, float] = {}
    with httpx.Client(base_url=base, headers=auth, timeout=30) as c:
        body = {"input": {"orderId": 1}}
        trig = f"/api/workflows/{ids['workflow']}/executions"
        lists = {
            "list first page": {"limit": PAGE},
            "list status=failed": {"limit": PAGE, "status": "failed"},
            "list status=failed&cancelled": {"limit": PAGE, "status": ["failed", "cancelled"]},
            "list workflowId": {"limit": PAGE, "workflowId": ids["workflow2"]},
        }
        for params in lists.values():  # warm-up (connections, plans, caches)
            timed(c, 20, "GET", "/api/executions", params=params)
        timed(c, 20, "POST", trig, json=body)
        cursor = cursor_at(c, 100, {"limit": PAGE})
        lists["list 100th page"] = {"limit": PAGE, "cursor": cursor}
        runs: dict[str, Any] = {"trigger": lambda: timed(c, n, "POST", trig, json=body)}
        for name, params in lists.items():
            runs[name] = lambda p=params: timed(c, n, "GET", "/api/executions", params=p)
        runs["detail"] = lambda: detail_latencies(c, detail_ids)
        for name, fn in runs.items():
            c0 = cpu()
            lat[name] = fn()
            cpu_ms[name] = round(1000 * (cpu() - c0) / len(lat[name]), 3)
    return lat, cpu_ms


def api_setup(base: str) -> tuple[dict[str, str], dict[str, str]]:
    """Through the API: the measured tenant (two workflows) and another one."""
    wait_http(f"{base}/api/health/ready")
    auth, wf = setup_tenant(base)
    _other_auth, other_wf = setup_tenant(base)
    with httpx.Client(base_url=base, headers=auth, timeout=10) as c:
        second = {"name": "second", "steps": [{"id": "a", "type": "noop"}]}
        wf2 = c.post("/api/workflows", json=second).json()["data"]["id"]
    return auth, {"workflow": wf, "workflow2": wf2, "other_workflow": other_wf}


async def _partitions_for_the_month(url: str) -> None:
    """On partitioned tables (migration 0013), the daily partitions of the 31 days the seeded
    executions spread over, as the scheduler would have created them ahead (else every row
    would land in the default partition)."""
    from datetime import timedelta

    from conveyor.settings import load_settings
    from conveyor.store import Store

    async with Store(load_settings({"DATABASE_URL": url}), pool_size=1) as store:
        made = await store.partitions.ensure(datetime.now(UTC) - timedelta(days=31), 32)
    print(f"partitions created for the seeded month: {len(made)}", flush=True)


async def executions_dim(args: argparse.Namespace) -> dict[str, Any]:
    sizes = args.exec_sizes
    results: dict[int, dict[str, Any]] = {}
    async with bench_env() as env:
        logdir = Path(tempfile.mkdtemp(prefix=f"{env.prefix}-"))
        port = free_port()
        base_env = {k: v for k, v in os.environ.items()
                    if not k.startswith(("QUEUE_", "API_", "DATABASE_", "EXECUTION_"))}  # fmt: skip
        base_env.update(env.env(ADMIN_TOKEN=ADMIN_TOKEN, API_PORT=str(port),
                                PYTHONPATH=str(ROOT / "src")))  # fmt: skip
        procs = Procs(base_env, logdir)
        api_pid = procs.start("conveyor.api")
        base = f"http://127.0.0.1:{port}"
        conn = await asyncpg.connect(env.url)
        try:
            auth, ids = await asyncio.to_thread(api_setup, base)
            wf, other_wf = ids["workflow"], ids["other_workflow"]
            ids["tenant"] = await conn.fetchval("SELECT tenant_id FROM workflows WHERE id = $1", wf)
            ids["other_tenant"] = await conn.fetchval(
                "SELECT tenant_id FROM workflows WHERE id = $1", other_wf)  # fmt: skip
            await _partitions_for_the_month(env.url)
            have = 0
            for size in sizes:
                t0 = time.monotonic()
                await grow_executions(conn, ids, have, size)
                have = size
                seed_s = time.monotonic() - t0
                rows = await conn.fetch(
                    "SELECT id FROM executions TABLESAMPLE SYSTEM (1) WHERE tenant_id = $1"
                    " LIMIT 5000", ids["tenant"])  # fmt: skip
                sample = [r["id"] for r in rows] or [
                    r["id"] for r in await conn.fetch(
                        "SELECT id FROM executions WHERE tenant_id = $1 LIMIT 5000", ids["tenant"])
                ]  # fmt: skip
                detail_ids = random.Random(size).choices(sample, k=args.requests)
                lat, cpu_ms = await asyncio.to_thread(
                    measure_api, base, auth, ids, detail_ids, args.requests, api_pid
                )
                if procs.any_exited():
                    raise RuntimeError(f"the API exited; logs in {logdir}")
                total = await conn.fetchval("SELECT count(*) FROM executions")
                r: dict[str, Any] = {
                    "rows": total,
                    "seed_s": round(seed_s, 1),
                    "p99_ms": {k: round(percentile(v, 99), 2) for k, v in lat.items()},
                    "p50_ms": {k: round(percentile(v, 50), 2) for k, v in lat.items()},
                    "api_cpu_ms": cpu_ms,
                    "db_mb": round(
                        await conn.fetchval("SELECT pg_database_size(current_database())") / 2**20
                    ),
                }
                if args.explain:
                    r["explain"] = await explain(conn, ids["tenant"])
                results[size] = r
                print(f"executions {total:>9,} (seeded in {r['seed_s']} s, database "
                      f"{r['db_mb']} MB)", flush=True)  # fmt: skip
                for name in r["p99_ms"]:
                    print(f"  {name:<30} p50 {r['p50_ms'][name]:8.2f} ms  p99 "
                          f"{r['p99_ms'][name]:8.2f} ms  API CPU {r['api_cpu_ms'][name]:6.2f} "
                          f"ms/request", flush=True)  # fmt: skip
                for name, plan in r.get("explain", {}).items():
                    print(f"  EXPLAIN {name}: {plan}", flush=True)
        finally:
            await conn.close()
            procs.stop_all()
            shutil.rmtree(logdir, ignore_errors=True)
    small, big = results[sizes[0]], results[sizes[-1]]
    print(f"executions, largest/smallest ({sizes[-1]:,} / {sizes[0]:,} rows):")
    for k in big["p99_ms"]:
        print(f"  {k:<30} p99 ratio {ratio(small['p99_ms'][k], big['p99_ms'][k])}, p50 ratio "
              f"{ratio(small['p50_ms'][k], big['p50_ms'][k])}, API CPU ratio "
              f"{ratio(small['api_cpu_ms'][k], big['api_cpu_ms'][k])}", flush=True)  # fmt: skip
    lists = [k for k in big["p99_ms"] if k.startswith("list")]
    return {
        "sizes": {str(k): v for k, v in results.items()},
        "list_p99_ms_largest": max(big["p99_ms"][k] for k in lists),
        "trigger_p99_ms_largest": big["p99_ms"]["trigger"],
        "detail_p99_ms_largest": big["p99_ms"]["detail"],
        "p99_ratio": {k: ratio(small["p99_ms"][k], big["p99_ms"][k]) for k in big["p99_ms"]},
        "api_cpu_ratio": {
            k: ratio(small["api_cpu_ms"][k], big["api_cpu_ms"][k]) for k in big["api_cpu_ms"]
        },
    }


# --- pending timers ------------------------------------------------------------------------
TIMER_SEED_SQL = f"""
WITH e AS (
  INSERT INTO executions (id, tenant_id, workflow_id, workflow_version, status, region,
      triggered_by, next_step, wake_at, created_at, queued_at, updated_at)
  SELECT {ID_SQL.format(ts="now()")}, $1, $2, 1, 'waiting', 'us', 'api', 1,
      now() + interval '1 day' + g * interval '1 second', now(), now(), now()
  FROM generate_series($3::bigint, $4::bigint) AS g
  RETURNING id, tenant_id, workflow_id, wake_at
)
INSERT INTO timers (id, tenant_id, execution_id, workflow_id, region, seq, due_at, status,
    created_at)
SELECT {ID_SQL.format(ts="now()")}, e.tenant_id, e.id, e.workflow_id, 'us', 0, e.wake_at,
    'pending', now()
FROM e
"""


async def timers_dim(args: argparse.Namespace) -> dict[str, Any]:
    from conveyor.settings import load_settings
    from timer_precision import conveyor_phase, lateness

    sizes = args.timer_sizes
    results: dict[int, dict[str, Any]] = {}
    async with bench_env() as env, seeded(env) as seed:
        tenant = await seed.tenant("background")
        env_vars = {k: v for k, v in os.environ.items() if not k.startswith(("QUEUE_", "TIMER_"))}
        env_vars.update(env.env(PYTHONPATH=str(ROOT / "src"), LOG_FORMAT="json",
                                LOG_LEVEL="DEBUG" if args.timer_trace else "WARNING"))  # fmt: skip
        settings = load_settings(env_vars)
        redis = aioredis.Redis(host=REDIS_HOST, port=REDIS_PORT)
        conn = await asyncpg.connect(env.url)
        try:
            have = 0
            for size in sizes:
                t0 = time.monotonic()
                for lo in range(have, size, 100_000):
                    await conn.execute(TIMER_SEED_SQL, tenant, seed.workflows[tenant], lo,
                                       min(size, lo + 100_000) - 1)  # fmt: skip
                have = size
                await conn.execute("VACUUM ANALYZE executions")
                await conn.execute("VACUUM ANALYZE timers")
                await conn.execute("CHECKPOINT")
                seed_s = time.monotonic() - t0
                pg0 = await pg_counters(conn)
                timers, rec, cpu = await conveyor_phase(settings, env_vars, redis, args.timers,
                                                        args.timer_window)  # fmt: skip
                pg1 = await pg_counters(conn)
                late, early = lateness(timers, rec, "timer:{}")
                pending = await conn.fetchval(
                    "SELECT count(*) FROM timers WHERE status = 'pending'"
                )
                results[size] = {
                    "pending": pending,
                    "seed_s": round(seed_s, 1),
                    "fired": len(late),
                    "missing": len(timers) - len(late),
                    "early": early,
                    "cpu_ms_per_timer": round(1000 * cpu / max(1, len(late)), 3),
                    "p50_late_ms": round(percentile(late, 50), 2),
                    "p99_late_ms": round(percentile(late, 99), 2),
                    "pg_during": {k: pg1[k] - pg0[k] for k in pg0},
                }
                if args.timer_trace:
                    results[size]["trace"] = timer_trace(settings.queue_prefix, timers, rec)
                    print(f"  trace: {json.dumps(results[size]['trace'])}")
                    print(f"  postgres during the window: {json.dumps(results[size]['pg_during'])}")
                r = results[size]
                print(f"timers pending {pending:>9,} (seeded in {r['seed_s']} s): fired "
                      f"{r['fired']} (missing {r['missing']}, early {r['early']}), dispatcher CPU "
                      f"{r['cpu_ms_per_timer']} ms/timer, lateness p50 {r['p50_late_ms']} ms, "
                      f"p99 {r['p99_late_ms']} ms", flush=True)  # fmt: skip
        finally:
            await conn.close()
            await redis.aclose()
    small, big = results[sizes[0]], results[sizes[-1]]
    out = {
        "sizes": {str(k): v for k, v in results.items()},
        "cost_ratio": ratio(small["cpu_ms_per_timer"], big["cpu_ms_per_timer"]),
        "p99_late_ratio": ratio(small["p99_late_ms"], big["p99_late_ms"]),
    }
    print(f"timers: CPU per timer ratio {out['cost_ratio']}, lateness p99 ratio "
          f"{out['p99_late_ratio']}", flush=True)  # fmt: skip
    return out


async def pg_counters(conn: asyncpg.Connection) -> dict[str, int]:
    """This database's block and tuple counters, the checkpoints, the timers' dead rows, and the
    machine's CPU and I/O pressure stall time (``/proc/pressure``)."""
    row = await conn.fetchrow(
        "SELECT blks_read, blks_hit, tup_updated, xact_commit,"
        " (SELECT checkpoints_timed + checkpoints_req FROM pg_stat_bgwriter) AS checkpoints,"
        " (SELECT buffers_backend FROM pg_stat_bgwriter) AS buffers_backend,"
        " (SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = 'timers') AS timers_dead"
        " FROM pg_stat_database WHERE datname = current_database()"
    )
    out = {k: int(v or 0) for k, v in dict(row).items()}
    out.update(pressure())
    return out


def pressure() -> dict[str, int]:
    """Pressure stall totals (ms): how long some task waited for a core / for I/O."""
    out: dict[str, int] = {}
    for kind in ("cpu", "io"):
        try:
            line = Path(f"/proc/pressure/{kind}").read_text().splitlines()[0]
            out[f"psi_{kind}_some_ms"] = int(line.rsplit("total=", 1)[1]) // 1000
        except (OSError, IndexError, ValueError):
            pass
    return out


def timer_trace(prefix: str, due: dict[str, float], rec: Any) -> dict[str, Any]:
    """Where the late timers were late (``--timer-trace``): each one over 50 ms at the consumer
    (seconds since the first due instant, ms late), and the dispatcher's own debug log — its
    late fires, and its slowest claims and marks."""
    start = min(due.values())
    late = sorted(
        (round(due[i] - start, 2), round((rec.arrivals[f"timer:{i}"][0] - due[i]) * 1000))
        for i in due
        if f"timer:{i}" in rec.arrivals and rec.arrivals[f"timer:{i}"][0] - due[i] > 0.05
    )
    claims: list[float] = []
    stages: list[float] = []
    marks: list[float] = []
    fired_late: list[list[Any]] = []
    for line in Path(f"/tmp/{prefix}-timers.log").read_text().splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if doc.get("msg") == "timers.claimed":
            claims.append(doc["claimMs"])
            stages.append(doc["stageMs"])
        elif doc.get("msg") == "timers.marked":
            marks.append(doc["ms"])
        elif doc.get("msg") == "timers.late":
            fired_late.append([doc["ts"][11:23], doc["lagMs"], doc["startMs"], doc["callMs"],
                               doc["staged"], doc["promoted"]])  # fmt: skip
    return {
        "consumer_late_over_50ms": late,
        "dispatcher_late": fired_late,
        "claims": len(claims),
        "claim_ms_max": max(claims, default=0.0),
        "claim_ms_p50": percentile(claims, 50) if claims else 0.0,
        "stage_ms_max": max(stages, default=0.0),
        "marks": len(marks),
        "mark_ms_max": max(marks, default=0.0),
        "mark_ms_p50": percentile(marks, 50) if marks else 0.0,
    }


# --- schedules -----------------------------------------------------------------------------
async def schedules_dim(args: argparse.Namespace) -> dict[str, Any]:
    from cron_scale import run_size

    sizes = args.schedule_sizes
    results: dict[int, dict[str, Any]] = {}
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        for size in sizes:
            r = await run_size(admin, size, args.schedule_minutes, 0, kill=False)
            results[size] = {
                "cpu_ms_per_tick": r["scheduler_cpu_ms_per_tick"],
                "last_tick_lag_s": r["minute_ticks_max_late_s"],
                "p99_late_s": r["p99_late_s"],
                "missing": r["missing"],
                "duplicated": r["duplicated"],
                "ticks": r["ticks_expected"],
                "last_tick_lag_s_per_minute": r["minute_ticks_max_late_s_per_boundary"],
            }
            x = results[size]
            print(f"schedules {size:>6,}: scheduler CPU {x['cpu_ms_per_tick']} ms/tick, last tick "
                  f"of a minute runnable {x['last_tick_lag_s']} s late "
                  f"({x['last_tick_lag_s_per_minute']}), missing {x['missing']}, duplicated "
                  f"{x['duplicated']} of {x['ticks']}", flush=True)  # fmt: skip
    finally:
        await admin.close()
    small, big = results[sizes[0]], results[sizes[-1]]
    out = {
        "sizes": {str(k): v for k, v in results.items()},
        "cost_ratio": ratio(small["cpu_ms_per_tick"], big["cpu_ms_per_tick"]),
    }
    print(f"schedules: CPU per tick ratio {out['cost_ratio']}", flush=True)
    return out


# --- tenants with a backlog ----------------------------------------------------------------
async def redis_cpu_s(client: aioredis.Redis) -> float:
    info = await client.info("cpu")
    return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])


async def submit_spaced(seed: Any, jobs: list[tuple[str, str]], spacing: float,
                        sent: dict[str, float]) -> None:  # fmt: skip
    """Enqueue ``(tenant, execution id)`` one by one, ``spacing`` s apart (send times kept)."""
    for tenant, eid in jobs:
        sent[eid] = time.time()
        await seed.dispatcher.enqueue(seed.payload(tenant, eid))
        await asyncio.sleep(spacing)


async def tenants_once(args: argparse.Namespace, n_tenants: int) -> dict[str, Any]:
    """``n_tenants`` tenants enqueue a backlog at once; one worker drains it while three kinds
    of light tenant submit (each kind ``--light`` executions, see the module docstring)."""
    backlog = max(args.backlog, n_tenants * args.per_tenant_min)
    k = args.light
    async with bench_env() as env, seeded(env) as seed:
        t0 = time.monotonic()
        heavy = [await seed.tenant(f"t{i}") for i in range(n_tenants)]
        per = {t: backlog // n_tenants + (1 if i < backlog % n_tenants else 0)
               for i, t in enumerate(heavy)}  # fmt: skip
        ids = {t: await seed.insert(t, n) for t, n in per.items()}
        busy = await seed.tenant("busy")
        busy_jobs = [(busy, e) for e in await seed.insert(busy, k)]
        together, steady = [], []
        for i in range(k):
            t = await seed.tenant(f"together{i}")
            together += [(t, e) for e in await seed.insert(t, 1)]
            t = await seed.tenant(f"steady{i}")
            steady += [(t, e) for e in await seed.insert(t, 1)]
        seed_s = time.monotonic() - t0
        # tenants interleaved, as many producers would enqueue them
        payloads = []
        for j in range(max(per.values())):
            payloads += [seed.payload(t, ids[t][j]) for t in heavy if j < len(ids[t])]
        client = aioredis.Redis(host=REDIS_HOST, port=REDIS_PORT)
        try:
            r0, c0, w0 = await redis_cpu_s(client), time.process_time(), time.perf_counter()
            for i in range(0, len(payloads), 1000):
                await seed.dispatcher.enqueue_many(payloads[i : i + 1000])
            r1, c1, w1 = await redis_cpu_s(client), time.process_time(), time.perf_counter()
        finally:
            await client.aclose()
        sent: dict[str, float] = {}
        total = backlog + 3 * k
        async with workers_up(env, 1, **worker_env(args.concurrency)) as proc:
            with RssSampler(proc.pid) as worker:
                w_start = time.time()
                await asyncio.sleep(1.0)
                rate = float(await seed.succeeded())
                # arriving with the backlog (within the first round when it is long enough):
                # one tenant submitting --light executions 0.5 s apart, and --light tenants with
                # one execution each, 0.1 s apart
                first = asyncio.gather(
                    submit_spaced(seed, busy_jobs, args.light_spacing, sent),
                    submit_spaced(seed, together, 0.1, sent),
                )
                # steady state: once the first round (one job of every tenant) has started
                while True:
                    if await seed.succeeded() >= n_tenants + 2 * k + args.concurrency:
                        break
                    await asyncio.sleep(0.05)
                steady_at = time.time()
                await submit_spaced(seed, steady, args.light_spacing, sent)
                left = backlog + 2 * k - await seed.succeeded()
                await first
                await seed.wait_succeeded(total, timeout_s=max(120.0, backlog / 20), proc=proc)
        started = await seed.started_at([e for _t, e in busy_jobs + together + steady])
        first_start, last_finish = await seed.span_s()
    throughput = total / (last_finish - first_start)

    def lat(jobs: list[tuple[str, str]]) -> list[float]:
        return [(started[e] - sent[e]) * 1000 for _t, e in jobs]

    def trace(jobs: list[tuple[str, str]]) -> list[list[float]]:
        return [[round(sent[e] - w_start, 1), round((started[e] - sent[e]) * 1000)]
                for _t, e in jobs]  # fmt: skip

    n = len(payloads)
    out: dict[str, Any] = {
        "tenants": n_tenants,
        "backlog": backlog,
        "seed_s": round(seed_s, 1),
        "enqueue_client_cpu_us": round(1e6 * (c1 - c0) / n, 1),
        "enqueue_redis_cpu_us": round(1e6 * (r1 - r0) / n, 1),
        "enqueue_cost_us": round(1e6 * ((c1 - c0) + (r1 - r0)) / n, 1),
        "enqueue_wall_us": round(1e6 * (w1 - w0) / n, 1),
        "worker_cpu_ms_per_execution": round(1000 * worker.cpu_s / total, 3),
        "drain_rate_first_s": round(rate, 1),
        "throughput_per_s": round(throughput, 1),
        "round_ms": round(1000 * (n_tenants + 2) / throughput),
        "drained_after_s": round(last_finish - w_start, 1),
        "steady_from_s": round(steady_at - w_start, 1),
        "steady_backlog_left": left,
    }
    for name, jobs in (("steady", steady), ("together", together), ("busy", busy_jobs)):
        values = lat(jobs)
        out[f"{name}_p50_ms"] = round(percentile(values, 50), 1)
        out[f"{name}_p99_ms"] = round(percentile(values, 99), 1)
        out[f"{name}_max_ms"] = round(max(values), 1)
        out[f"{name}_ms"] = trace(jobs)
    return out


async def tenants_dim(args: argparse.Namespace) -> dict[str, Any]:
    sizes = args.tenant_sizes
    results: dict[int, dict[str, Any]] = {}
    for size in sizes:
        r = results[size] = await tenants_once(args, size)
        print(f"tenants {size:>6,} sharing a backlog of {r['backlog']:,}: enqueue cost "
              f"{r['enqueue_cost_us']} µs/job (this process {r['enqueue_client_cpu_us']} + Redis "
              f"{r['enqueue_redis_cpu_us']}; wall {r['enqueue_wall_us']}), worker CPU "
              f"{r['worker_cpu_ms_per_execution']} ms/execution, {r['throughput_per_s']}/s "
              f"(one round {r['round_ms']} ms); light tenants enqueue→start p50 / p99 / max: "
              f"steady state (from {r['steady_from_s']} s, {r['steady_backlog_left']:,} left) "
              f"{r['steady_p50_ms']} / {r['steady_p99_ms']} / {r['steady_max_ms']} ms, arriving "
              f"with the backlog {r['together_p50_ms']} / {r['together_p99_ms']} / "
              f"{r['together_max_ms']} ms, one tenant {args.light} jobs "
              f"{args.light_spacing} s apart {r['busy_p50_ms']} / {r['busy_p99_ms']} / "
              f"{r['busy_max_ms']} ms", flush=True)  # fmt: skip
    small, big = results[sizes[0]], results[sizes[-1]]
    out = {
        "sizes": {str(k): v for k, v in results.items()},
        "cost_ratio": ratio(small["enqueue_cost_us"], big["enqueue_cost_us"]),
        "client_cost_ratio": ratio(small["enqueue_client_cpu_us"], big["enqueue_client_cpu_us"]),
        "worker_cost_ratio": ratio(
            small["worker_cpu_ms_per_execution"], big["worker_cpu_ms_per_execution"]
        ),
        "light_p99_ratio": ratio(small["steady_p99_ms"], big["steady_p99_ms"]),
    }
    print(f"tenants: enqueue cost ratio {out['cost_ratio']} (this process only "
          f"{out['client_cost_ratio']}), worker CPU ratio {out['worker_cost_ratio']}, steady "
          f"light p99 ratio {out['light_p99_ratio']}", flush=True)  # fmt: skip
    return out


# --- main ----------------------------------------------------------------------------------
def sizes(text: str) -> list[int]:
    out = [int(s.replace("_", "")) for s in text.split(",") if s.strip()]
    if len(out) < 2 or out != sorted(out) or out[0] <= 0:
        raise argparse.ArgumentTypeError("at least two increasing positive sizes")
    return out


async def run(args: argparse.Namespace) -> dict[str, Any]:
    dims = {"executions": executions_dim, "timers": timers_dim, "schedules": schedules_dim,
            "tenants": tenants_dim}  # fmt: skip
    details: dict[str, Any] = {}
    for name in args.dims:
        t0 = time.monotonic()
        print(f"--- {name} ({datetime.now(UTC):%H:%M:%S} UTC)", flush=True)
        details[name] = await dims[name](args)
        details[name]["wall_s"] = round(time.monotonic() - t0)
    ex = details.get("executions", {})
    return {
        "executions_list_p99_ms_1m": ex.get("list_p99_ms_largest"),
        "timer_cost_ratio": details.get("timers", {}).get("cost_ratio"),
        "schedule_cost_ratio": details.get("schedules", {}).get("cost_ratio"),
        "tenant_cost_ratio": details.get("tenants", {}).get("cost_ratio"),
        "trigger_p99_ms_1m": ex.get("trigger_p99_ms_largest"),
        "executions_largest": args.exec_sizes[-1] if "executions" in details else None,
        "details": details,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run")
    parser.add_argument("--dims", default="executions,timers,schedules,tenants")
    parser.add_argument("--exec-sizes", type=sizes)
    parser.add_argument("--timer-sizes", type=sizes)
    parser.add_argument("--schedule-sizes", type=sizes)
    parser.add_argument("--tenant-sizes", type=sizes)
    parser.add_argument("--requests", type=int, help="requests per API figure (default 500)")
    parser.add_argument("--timers", type=int, help="timers fired per size (default 2000)")
    parser.add_argument("--timer-window", type=float, help="their due instants' spread, s")
    parser.add_argument("--timer-trace", action="store_true",
                        help="the dispatcher at DEBUG: where the late timers were late")  # fmt: skip
    parser.add_argument("--schedule-minutes", type=int, help="minute boundaries per size")
    parser.add_argument("--backlog", type=int, help="executions shared by the tenants")
    parser.add_argument("--per-tenant-min", type=int, default=3,
                        help="at least this many backlog executions per tenant")  # fmt: skip
    parser.add_argument("--light", type=int, default=20,
                        help="executions of each kind of light tenant")  # fmt: skip
    parser.add_argument("--light-spacing", type=float, default=0.5,
                        help="seconds between two of the light tenant's executions")  # fmt: skip
    parser.add_argument("--concurrency", type=int, default=16, help="worker concurrency")
    parser.add_argument("--explain", action=argparse.BooleanOptionalAction, default=True)
    args = parser.parse_args()
    q = args.quick
    defaults = {
        "exec_sizes": [10_000, 30_000, 100_000] if q else [10_000, 100_000, 1_000_000],
        "timer_sizes": [1_000, 10_000, 100_000] if q else [10_000, 100_000, 1_000_000],
        "schedule_sizes": [10, 100, 1_000] if q else [100, 1_000, 10_000],
        "tenant_sizes": [5, 50, 500] if q else [10, 100, 1_000],
        "requests": 100 if q else 500,
        "timers": 500 if q else 2000,
        "timer_window": 10.0 if q else 20.0,
        "schedule_minutes": 1 if q else 2,
        "backlog": 2_000 if q else 10_000,
    }
    for k, v in defaults.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    args.dims = [d.strip() for d in args.dims.split(",") if d.strip()]
    unknown = set(args.dims) - {"executions", "timers", "schedules", "tenants"}
    if unknown:
        parser.error(f"unknown --dims {sorted(unknown)}")
    if args.requests < 100:
        parser.error("--requests must be at least 100 (a p99)")
    t0 = time.monotonic()
    out = asyncio.run(run(args))
    out["wall_s"] = round(time.monotonic() - t0)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
