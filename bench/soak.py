"""Soak: a steady mixed load for ``--minutes`` (default 30) — is anything growing, is anything lost?

Processes (``bench/_procs.py``): one ``conveyor api``, one execution worker, one scheduler (which
also runs retention), one timer dispatcher; plus a local HTTP target (the one of
``bench/workflow_throughput.py``). Load, all at fixed rates:

* ``POST /api/workflows/{id}/executions`` of the ``order-sync`` workflow (``http`` → ``transform``
  → ``condition`` → ``http`` → ``noop`` against the local target) at ``--rate`` per second;
* ``POST`` of a ``delay`` workflow (noop → ``delay`` of ``--delay-s`` s → noop: one durable timer
  each) at ``--delay-rate`` per second;
* schedules: ``--every-second`` every-second and ``--every-minute`` every-minute schedules;
* retention: ``EXECUTION_RETENTION=--retention-s`` (default 120 s), a pass every 10 s, so finished
  executions are pruned all along.

Every ``--sample-s`` seconds (default 10): the RSS of every process (api, worker, scheduler,
timers, target), ``pg_database_size`` of the run's database, Redis ``used_memory`` (of the whole
server: other runs on the machine add noise) and the run's Redis keys. At the end: least-squares
slopes per hour over the samples after the warm-up (``--warmup-min``, default 5; a quarter of the
run when shorter). Where the server runs with ``autovacuum = off`` (this development machine's
PostgreSQL does), a plain ``VACUUM`` of the run's database every ``--vacuum-s`` s (default 60)
stands in for it: without it the rows retention deletes are never reclaimed.

Nothing lost: every accepted trigger is followed (its status read every 5 s) until it is seen
``succeeded``; one that is seen failed, or that disappears (pruned) before it was seen finished,
or that is still not finished 60 s after the load stops, is counted as lost. Scheduled executions
are checked the same way (none stuck in queued/running/waiting at the end).

    .venv/bin/python bench/soak.py [--minutes 30] [--rate 5] [--delay-rate 2]

Last line: JSON with the slopes (``rss_mb_per_h`` per process, ``db_mb_per_h``,
``redis_mb_per_h``), ``accepted``, ``succeeded``, ``lost``, ``stuck``, ``pruned``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import psutil
import redis.asyncio as aioredis

from _exec_common import REDIS_HOST, REDIS_PORT, bench_env
from _procs import Procs
from workflow_throughput import target_server, workflow

ROOT = Path(__file__).resolve().parents[1]
ADMIN_TOKEN = "soak-admin-token"
PROCESSES = {
    "api": "conveyor.api",
    "worker": "conveyor.workers.execution",
    "scheduler": "conveyor.workers.scheduler",
    "timers": "conveyor.workers.timer_dispatcher",
}
TERMINAL = ("succeeded", "failed", "cancelled")


def slope_per_h(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of ``(t seconds, value)`` points, per hour."""
    if len(points) < 3:
        return None
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    den = sum((t - mt) ** 2 for t, _ in points)
    if den == 0:
        return None
    return 3600 * sum((t - mt) * (v - mv) for t, v in points) / den


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def wait_http(url: str, procs: Procs, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    async with httpx.AsyncClient(timeout=2) as c:
        while time.monotonic() < deadline:
            try:
                if (await c.get(url)).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            if procs.any_exited():
                break
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} did not answer; logs in {procs.logdir}")


class Load:
    """The triggers at fixed rates and the follow-up of every accepted one."""

    def __init__(self, client: httpx.AsyncClient, auth: dict[str, str]) -> None:
        self.client = client
        self.auth = auth
        self.accepted: dict[str, str] = {}  # id -> kind
        self.pending: set[str] = set()
        self.succeeded = 0
        self.lost: dict[str, str] = {}  # id -> why
        self.rejected = 0
        self.errors = 0
        self.latencies: list[float] = []

    async def trigger(self, workflow_id: str, body: dict[str, Any], kind: str) -> None:
        start = time.perf_counter()
        try:
            r = await self.client.post(
                f"/api/workflows/{workflow_id}/executions", json=body, headers=self.auth
            )
        except httpx.HTTPError:
            self.errors += 1
            return
        self.latencies.append((time.perf_counter() - start) * 1000)
        if r.status_code == 202:
            eid = r.json()["data"]["id"]
            self.accepted[eid] = kind
            self.pending.add(eid)
        else:
            self.rejected += 1

    async def at_rate(self, workflow_id: str, rate: float, kind: str, until: float) -> None:
        if rate <= 0:
            return
        period, n, t0 = 1.0 / rate, 0, time.monotonic()
        tasks: set[asyncio.Task[None]] = set()
        while (due := t0 + n * period) < until:
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            task = asyncio.create_task(
                self.trigger(workflow_id, {"input": {"orderId": 100 + n % 50}}, kind)
            )
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            n += 1
        if tasks:
            await asyncio.gather(*tasks)

    async def follow(self, conn: asyncpg.Connection) -> None:
        """Reads the status of every pending accepted execution once."""
        ids = list(self.pending)
        found: dict[str, str] = {}
        for i in range(0, len(ids), 5000):
            rows = await conn.fetch(
                "SELECT id, status FROM executions WHERE id = ANY($1::text[])", ids[i : i + 5000]
            )
            found.update((r["id"], r["status"]) for r in rows)
        for eid in ids:
            status = found.get(eid)
            if status == "succeeded":
                self.succeeded += 1
                self.pending.discard(eid)
            elif status is None:
                self.lost[eid] = "pruned before seen finished"
                self.pending.discard(eid)
            elif status in TERMINAL:
                self.lost[eid] = status
                self.pending.discard(eid)


async def api_key(base: str) -> dict[str, str]:
    """A tenant (admin API) and an API key for it: the ``Authorization`` header."""
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with httpx.AsyncClient(base_url=base, timeout=10) as c:
        tenant = (await c.post("/api/admin/tenants", json={"name": "soak"}, headers=admin)).json()
        key = await c.post(f"/api/admin/tenants/{tenant['data']['id']}/api-keys", headers=admin)
        return {"Authorization": f"Bearer {key.json()['data']['key']}"}


async def prefix_memory(r: aioredis.Redis, prefix: str) -> tuple[int, float]:
    """(number of the run's keys, their ``MEMORY USAGE`` in MB) — this run's share of Redis."""
    keys = [k async for k in r.scan_iter(match=f"{prefix}:*", count=2000)]
    total = 0
    for i in range(0, len(keys), 1000):
        pipe = r.pipeline(transaction=False)
        for k in keys[i : i + 1000]:
            pipe.memory_usage(k)
        total += sum(v or 0 for v in await pipe.execute())
    return len(keys), total / 2**20


async def create(
    c: httpx.AsyncClient, path: str, body: dict[str, Any], auth: dict[str, str]
) -> str:
    r = await c.post(path, json=body, headers=auth)
    if r.status_code >= 300:
        raise RuntimeError(f"POST {path}: {r.status_code} {r.text}")
    return str(r.json()["data"]["id"])


def rss_mb(pid: int) -> float:
    try:
        return float(psutil.Process(pid).memory_info().rss) / 2**20
    except psutil.Error:
        return float("nan")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    wall0 = time.monotonic()
    async with bench_env() as env:
        db = env.url.rsplit("/", 1)[1]
        logdir = Path(tempfile.mkdtemp(prefix=f"{env.prefix}-"))
        with target_server() as (port, target):
            api_port = free_port()
            base_env = {k: v for k, v in os.environ.items()
                        if not k.startswith(("QUEUE_", "API_", "SCHEDULER_", "EXECUTION_",
                                             "DATABASE_", "RETENTION_", "TIMER"))}  # fmt: skip
            base_env.update(env.env(
                ADMIN_TOKEN=ADMIN_TOKEN, API_PORT=str(api_port),
                HTTP_ALLOWLIST=f"127.0.0.1:{port}", EXECUTION_RETENTION=str(args.retention_s),
                RETENTION_INTERVAL_MS="10000", PYTHONPATH=str(ROOT / "src"),
            ))  # fmt: skip
            procs = Procs(base_env, logdir)
            pids = {name: procs.start(module) for name, module in PROCESSES.items()}
            pids["target"] = target.pid
            try:
                out = await soak(args, env.prefix, db, f"http://127.0.0.1:{api_port}", port,
                                 procs, pids)  # fmt: skip
            finally:
                procs.stop_all()
        shutil.rmtree(logdir, ignore_errors=True)
    out["wall_s"] = round(time.monotonic() - wall0, 1)
    return out


async def soak(args: argparse.Namespace, prefix: str, db: str, base: str, port: int,
               procs: Procs, pids: dict[str, int]) -> dict[str, Any]:  # fmt: skip
    await wait_http(f"{base}/api/health/ready", procs)
    auth = await api_key(base)
    limits = httpx.Limits(max_connections=32, max_keepalive_connections=32)
    admin = await asyncpg.connect(env_dsn(db))
    r = aioredis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as c:
        order = await create(c, "/api/workflows", workflow(port), auth)
        delay = await create(c, "/api/workflows", {"name": "delay", "steps": [
            {"id": "a", "type": "noop"},
            {"id": "wait", "type": "delay", "seconds": args.delay_s},
            {"id": "b", "type": "noop"}]}, auth)  # fmt: skip
        cron = await create(c, "/api/workflows", {"name": "cron",
                            "steps": [{"id": "n", "type": "noop"}]}, auth)  # fmt: skip
        for i in range(args.every_second):
            await create(c, "/api/schedules", {"workflowId": cron, "cron": "* * * * * *",
                                               "name": f"sec{i}"}, auth)  # fmt: skip
        for i in range(args.every_minute):
            await create(c, "/api/schedules", {"workflowId": cron, "cron": "* * * * *",
                                               "name": f"min{i}"}, auth)  # fmt: skip
        load = Load(c, auth)
        t0 = time.monotonic()
        until = t0 + args.minutes * 60
        samples: list[dict[str, Any]] = []
        # This machine's PostgreSQL may run with autovacuum off: then deleted rows are never
        # reclaimed and the database grows whatever retention does; a plain VACUUM every
        # --vacuum-s seconds stands in for autovacuum (reported as "vacuum").
        autovacuum = await admin.fetchval("SHOW autovacuum") == "on"
        vacuum_s = 0.0 if autovacuum else args.vacuum_s
        vacuum = "autovacuum" if autovacuum else (f"VACUUM every {vacuum_s:g} s (autovacuum off)"
                                                  if vacuum_s else "none (autovacuum off)")  # fmt: skip
        print(f"vacuum: {vacuum}", flush=True)

        async def sampler() -> None:
            next_sample, next_vacuum = t0, t0 + vacuum_s
            while True:
                now = time.monotonic()
                if now >= next_sample:
                    info = await r.info("memory")
                    nkeys, prefix_mb = await prefix_memory(r, prefix)
                    row = await admin.fetchrow(
                        "SELECT pg_database_size($1) AS size,"
                        " (SELECT count(*) FROM executions) AS n,"
                        " (SELECT count(*) FROM executions WHERE status IN"
                        "  ('queued','running','waiting')) AS active,"
                        " (SELECT count(*) FROM timers) AS timers", db)  # fmt: skip
                    sample = {"t": round(now - t0, 1),
                              "rss_mb": {k: round(rss_mb(p), 1) for k, p in pids.items()},
                              "db_mb": round(row["size"] / 2**20, 2),
                              "redis_mb": round(info["used_memory"] / 2**20, 2),
                              "redis_run_mb": round(prefix_mb, 2),
                              "redis_keys": nkeys, "executions": row["n"],
                              "active": row["active"], "timers": row["timers"],
                              "accepted": len(load.accepted), "pending": len(load.pending)}  # fmt: skip
                    samples.append(sample)
                    print(json.dumps(sample), flush=True)
                    next_sample += args.sample_s
                if vacuum_s and now >= next_vacuum:
                    await admin.execute("VACUUM")
                    next_vacuum += vacuum_s
                if procs.any_exited():
                    raise RuntimeError(f"a process exited; logs in {procs.logdir}")
                await load.follow(admin)
                if now >= until and not load.pending:
                    return
                if now >= until + 60 + args.delay_s:
                    return
                await asyncio.sleep(5)

        sampling = asyncio.create_task(sampler())
        await asyncio.gather(load.at_rate(order, args.rate, "order", until),
                             load.at_rate(delay, args.delay_rate, "delay", until))  # fmt: skip
        await sampling
        stuck = await admin.fetchval(
            "SELECT count(*) FROM executions WHERE status IN ('queued','running','waiting')"
            " AND created_at < now() - make_interval(secs => $1)", float(args.delay_s + 30))  # fmt: skip
        scheduled = await admin.fetchval(
            "SELECT count(*) FROM executions WHERE schedule_id IS NOT NULL"
        )
        sched_bad = await admin.fetchval(
            "SELECT count(*) FROM executions WHERE schedule_id IS NOT NULL"
            " AND status IN ('failed','cancelled')")  # fmt: skip
        pruned = await admin.fetchval(
            "SELECT count(*) FROM executions WHERE id = ANY($1::text[])", list(load.accepted)
        )
    await admin.close()
    await r.aclose()
    return {"vacuum": vacuum} | analyse(args, samples, load, stuck, scheduled, sched_bad,
                   len(load.accepted) - pruned)  # fmt: skip


def env_dsn(db: str) -> str:
    from _exec_common import ADMIN_DSN

    return f"{ADMIN_DSN.rsplit('/', 1)[0]}/{db}"


def analyse(args: argparse.Namespace, samples: list[dict[str, Any]], load: Load, stuck: int,
            scheduled: int, sched_bad: int, pruned: int) -> dict[str, Any]:  # fmt: skip
    warmup = min(args.warmup_min * 60, args.minutes * 60 / 4)
    steady = [s for s in samples if warmup <= s["t"] <= args.minutes * 60 + 1]
    rss = {k: slope_per_h([(s["t"], s["rss_mb"][k]) for s in steady])
           for k in (samples[0]["rss_mb"] if samples else {})}  # fmt: skip

    def rnd(v: float | None) -> float | None:
        return None if v is None else round(v, 2)

    def span(key: str) -> list[float]:
        return [steady[0][key], steady[-1][key]] if steady else []

    lat = sorted(load.latencies)
    out: dict[str, Any] = {
        "minutes": args.minutes,
        "samples": len(samples),
        "steady_from_s": round(warmup),
        "rss_mb_per_h": {k: rnd(v) for k, v in rss.items()},
        "rss_mb_first_last": {k: [steady[0]["rss_mb"][k], steady[-1]["rss_mb"][k]] for k in rss}
        if steady
        else {},
        "db_mb_per_h": rnd(slope_per_h([(s["t"], s["db_mb"]) for s in steady])),
        "db_mb_first_last": span("db_mb"),
        "redis_mb_per_h": rnd(slope_per_h([(s["t"], s["redis_mb"]) for s in steady])),
        "redis_mb_first_last": span("redis_mb"),
        "redis_run_mb_per_h": rnd(slope_per_h([(s["t"], s["redis_run_mb"]) for s in steady])),
        "redis_run_mb_first_last": span("redis_run_mb"),
        "timers_rows_first_last": span("timers"),
        "redis_keys_per_h": rnd(slope_per_h([(s["t"], s["redis_keys"]) for s in steady])),
        "redis_keys_first_last": span("redis_keys"),
        "executions_rows_first_last": span("executions"),
        "accepted": len(load.accepted),
        "succeeded": load.succeeded,
        "lost": len(load.lost),
        "lost_examples": dict(list(load.lost.items())[:5]),
        "still_pending": len(load.pending),
        "rejected": load.rejected,
        "http_errors": load.errors,
        "stuck": stuck,
        "pruned": pruned,
        "scheduled_executions_left": scheduled,
        "scheduled_failed": sched_bad,
        "trigger_p99_ms": round(lat[int(len(lat) * 0.99) - 1], 2) if len(lat) >= 100 else None,
    }
    return out


def report(out: dict[str, Any]) -> None:
    print(
        f"soak {out['minutes']} min, {out['samples']} samples, slopes from "
        f"t={out['steady_from_s']} s (per hour):"
    )
    for k, v in out["rss_mb_per_h"].items():
        print(f"  RSS {k:<9} {v} MB/h  (first→last {out['rss_mb_first_last'].get(k)})")
    print(f"  vacuum: {out['vacuum']}")
    print(f"  database  {out['db_mb_per_h']} MB/h  (first→last {out['db_mb_first_last']})")
    print(f"  Redis, this run's keys {out['redis_run_mb_per_h']} MB/h (first→last "
          f"{out['redis_run_mb_first_last']}), {out['redis_keys_per_h']} keys/h "
          f"({out['redis_keys_first_last']}); server used_memory {out['redis_mb_per_h']} MB/h "
          f"({out['redis_mb_first_last']}, shared with other runs)")  # fmt: skip
    print(f"  rows: executions {out['executions_rows_first_last']}, timers "
          f"{out['timers_rows_first_last']}")  # fmt: skip
    print(f"  triggers accepted {out['accepted']}, seen succeeded {out['succeeded']}, lost "
          f"{out['lost']}, still pending {out['still_pending']}, rejected {out['rejected']}, "
          f"HTTP errors {out['http_errors']}, stuck {out['stuck']}, pruned {out['pruned']}; "
          f"trigger p99 {out['trigger_p99_ms']} ms")  # fmt: skip
    print(
        f"  scheduled executions in the table at the end {out['scheduled_executions_left']}"
        f" (failed/cancelled {out['scheduled_failed']})",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=5.0, help="order-sync triggers per second")
    parser.add_argument("--delay-rate", type=float, default=2.0, help="delay triggers per second")
    parser.add_argument("--delay-s", type=int, default=5, help="the delay step's seconds")
    parser.add_argument("--every-second", type=int, default=2)
    parser.add_argument("--every-minute", type=int, default=20)
    parser.add_argument("--retention-s", type=int, default=120, help="EXECUTION_RETENTION")
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--warmup-min", type=float, default=5.0)
    parser.add_argument("--vacuum-s", type=float, default=60.0,
                        help="VACUUM period when the server's autovacuum is off (0: never)")  # fmt: skip
    args = parser.parse_args()
    if args.minutes <= 0 or args.retention_s < 60:
        parser.error("--minutes must be > 0 and --retention-s >= 60")
    out = asyncio.run(run(args))
    report(out)
    print(json.dumps({k: v for k, v in out.items()}))


if __name__ == "__main__":
    main()
