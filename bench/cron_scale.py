"""Cron at scale: how late, and how exactly once, do thousands of schedules fire?

For each size (default 100, 1,000, 10,000 and 30,000 schedules) a fresh Postgres database and
Redis prefix get one tenant, one noop workflow and that many schedules inserted in bulk (the
store's ``schedules`` table, ``next_fire_at`` computed as :meth:`ScheduleService.create` does,
with :mod:`conveyor.cron`): ``--every-second`` of them (default 20) every second
(``* * * * * *``, six fields, seconds first), the rest every minute (``* * * * *``). One
``conveyor scheduler`` (``python -m conveyor.workers.scheduler``) and one execution worker
(``python -m conveyor.workers.execution``, concurrency 64) run over ``--minutes`` minute
boundaries (default 2) after a warm-up. Measured from the outside, so it works whatever the
scheduler does inside (fire at the instant, or materialise delayed jobs ahead):

* **runnable lateness** per tick = the moment its BullMQ job became runnable - the tick
  instant (``scheduled_for``). From the job hash: ``timestamp`` (ms, added) + the delay it was
  added with (``opts.delay``; the ``delay`` field is rewritten when a worker parks the job behind
  the tenant's concurrency cap, and zeroed when BullMQ promotes it). Jobs
  are kept only for the last 1,000 completions, so a poller reads the hashes of newly
  completed jobs while the run goes on, and the rest afterwards.
* **start lateness** = ``executions.started_at`` - ``scheduled_for`` (includes the worker's
  queue: 10,000 noop executions at once take this one worker several seconds).
* **exactly once**: for every (schedule, tick) in the window (each minute boundary for minute
  schedules, each second from the first to the last boundary for the per-second ones), missing
  = no execution with that ``scheduled_for``, duplicated = executions beyond the first.
* **scheduler CPU per tick** (``/proc/<pid>/stat`` utime+stime over the window / ticks) and
  **database transactions per tick** (``pg_stat_database`` xact_commit+xact_rollback delta of
  the bench database — *all* processes, the worker's claim/finish included; pg_stat_statements
  is not available).

``--kill``: also a run at 10,000 schedules with two schedulers; the leader (the holder of the
Postgres advisory lock) is SIGKILLed ~1 s before the first measured boundary; missing and
duplicated ticks are counted over that boundary (and the rest of the window).

    .venv/bin/python bench/cron_scale.py [--sizes 100,1000,10000,30000] [--minutes 2] [--kill]

Targets: at 10,000 schedules p99 ≤ 1 s and max ≤ 2 s runnable lateness; at 30,000 max ≤ 5 s;
0 missing, 0 duplicated. Last line: JSON with ``p99_late_s_10k``, ``max_late_s_10k``,
``max_late_s_30k``, ``missing``, ``duplicated`` (null for sizes not run) and per-size details.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import tempfile
import time
import uuid
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from _procs import Procs, pg_leader_pid
from conveyor.cron import next_fire, parse_cron
from conveyor.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
ADMIN_DSN = os.environ.get("TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
MINUTE_CRON = "* * * * *"
SECOND_CRON = "* * * * * *"  # six fields: seconds first
WARMUP_S = 8.0  # the first measured boundary is at least this long after both processes run
SETTLE_MAX_S = 120.0  # after the last boundary, wait at most this long for stragglers
CLK_TCK = os.sysconf("SC_CLK_TCK")
TARGETS = {
    10_000: "target p99 <= 1 s, max <= 2 s",
    30_000: "target max <= 5 s",
}


def percentile(values: list[float], q: float) -> float | None:
    ordered = sorted(values)
    if not ordered:
        return None
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime (fields 14, 15)


class JobReader:
    """Reads ``timestamp``/``opts``/``processedOn`` of each job before BullMQ trims
    it from ``completed`` (kept: the last 1,000)."""

    def __init__(self, client: aioredis.Redis, base: str) -> None:
        self.client = client
        self.base = base  # "{prefix}:{queue}"
        self.jobs: dict[str, float] = {}  # job id -> runnable epoch s
        self.processed: dict[str, float] = {}
        self.added: dict[str, float] = {}  # job id -> epoch s it was added

    async def read(self, ids: list[str]) -> None:
        todo = [i for i in ids if i not in self.jobs]
        for k in range(0, len(todo), 1000):
            chunk = todo[k : k + 1000]
            pipe = self.client.pipeline(transaction=False)
            for job_id in chunk:
                pipe.hmget(f"{self.base}:{job_id}", "timestamp", "opts", "processedOn")
            for job_id, (ts, opts, processed) in zip(chunk, await pipe.execute(),
                                                           strict=True):  # fmt: skip
                if ts is None:
                    continue
                # The delay it was *added* with (opts): the hash's ``delay`` field is rewritten
                # when a worker parks the job behind the tenant's concurrency cap (it had been
                # runnable already) and zeroed when BullMQ promotes it.
                added_delay = float(json.loads(opts).get("delay") or 0) if opts else 0.0
                self.jobs[job_id] = (float(ts) + added_delay) / 1000
                self.added[job_id] = float(ts) / 1000
                if processed:
                    self.processed[job_id] = float(processed) / 1000

    async def poll(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            ids = await self.client.zrange(f"{self.base}:completed", 0, -1)
            await self.read([i.decode() for i in ids])
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.15)


async def seed(settings: Settings, size: int, every_second: int) -> tuple[str, list[str], set[str]]:
    """Tenant, noop workflow, ``size`` schedules in bulk. Returns (region, ids, per-second ids)."""
    from conveyor.store import Store, migrate, new_id, utcnow
    from conveyor.store.schema import schedules, workflows

    await migrate(settings)
    async with Store(settings, pool_size=1) as store:
        tenant = await store.tenants.create("bench")
        wf = await store.workflows.create(
            tenant.id, {"name": "cron", "steps": [{"id": "n", "type": "noop"}]}
        )
        n_sec = min(every_second, size)
        now = utcnow()
        # as ScheduleService.create: next_fire_time(cron, tz, now) = next_fire(parse_cron(...))
        nxt = {c: next_fire(parse_cron(c, "UTC"), now) for c in (MINUTE_CRON, SECOND_CRON)}
        rows, per_second = [], set()
        for i in range(size):
            cron = SECOND_CRON if i < n_sec else MINUTE_CRON
            sid = new_id()
            if cron == SECOND_CRON:
                per_second.add(sid)
            rows.append(dict(id=sid, tenant_id=tenant.id, workflow_id=wf.id, name=None,
                             cron=cron, timezone="UTC", enabled=True, input=None,
                             misfire_policy=None, next_fire_at=nxt[cron], created_at=now,
                             updated_at=now))  # fmt: skip
        async with store.engine.begin() as conn:
            for k in range(0, size, 2000):
                await conn.execute(schedules.insert(), rows[k : k + 2000])
            region = (
                (await conn.execute(workflows.select().where(workflows.c.id == wf.id))).one().region
            )
    return region, [r["id"] for r in rows], per_second


async def xacts(admin: asyncpg.Connection, db: str) -> int:
    await admin.execute("SELECT pg_stat_clear_snapshot()")
    return int(await admin.fetchval(
        "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1", db))  # fmt: skip


def count_in_logs(logdir: Path, pattern: str, needle: str) -> int:
    return sum(p.read_text(errors="replace").count(needle) for p in logdir.glob(pattern))


async def sleep_until(epoch: float) -> None:
    await asyncio.sleep(max(0.0, epoch - time.time()))


async def wait_ready(client: aioredis.Redis, prefix: str, n: int, procs: Procs) -> None:
    deadline = time.monotonic() + 60
    while await client.zcard(f"{prefix}:conveyor:processes") < n:
        if time.monotonic() > deadline or procs.any_exited():
            raise RuntimeError(f"processes did not start; logs in {procs.logdir}")
        await asyncio.sleep(0.1)


async def read_executions(settings: Settings) -> list[Any]:
    from sqlalchemy import select

    from conveyor.store import Store
    from conveyor.store.schema import executions

    async with Store(settings, pool_size=1) as store, store.engine.connect() as conn:
        return list((await conn.execute(
            select(executions.c.id, executions.c.schedule_id, executions.c.scheduled_for,
                   executions.c.started_at).where(executions.c.schedule_id.is_not(None))
        )).all())  # fmt: skip


async def run_size(admin: asyncpg.Connection, size: int, minutes: int, every_second: int,
                   kill: bool) -> dict[str, Any]:  # fmt: skip
    db = f"conveyor_cronbench_{uuid.uuid4().hex[:10]}"
    prefix = f"benchcron{uuid.uuid4().hex[:8]}"
    await admin.execute(f'CREATE DATABASE "{db}"')
    # The shell's settings are dropped, except SCHEDULER_LOOKAHEAD_MS (to compare windows).
    env = {k: v for k, v in os.environ.items()
           if k == "SCHEDULER_LOOKAHEAD_MS"
           or not k.startswith(("QUEUE_PREFIX", "SCHEDULER_", "EXECUTION_", "DATABASE_"))}  # fmt: skip
    env.update(DATABASE_URL=ADMIN_DSN.rsplit("/", 1)[0] + "/" + db, QUEUE_PREFIX=prefix,
               LOG_LEVEL="WARNING", PYTHONPATH=str(ROOT / "src"))  # fmt: skip
    settings = load_settings(env)
    logdir = Path(tempfile.mkdtemp(prefix=f"{prefix}-"))
    procs = Procs(env, logdir)
    client = aioredis.Redis(host=settings.queue_redis_host, port=settings.queue_redis_port)
    stop = asyncio.Event()
    poller: asyncio.Task[None] | None = None
    try:
        t0 = time.monotonic()
        region, _ids, per_second = await seed(settings, size, every_second)
        seed_s = time.monotonic() - t0
        reader = JobReader(client, f"{prefix}:workflow.execute.{region}")
        schedulers = [procs.start("conveyor.workers.scheduler") for _ in range(2 if kill else 1)]
        procs.start("conveyor.workers.execution", EXECUTION_WORKER_CONCURRENCY="64")
        await wait_ready(client, prefix, len(schedulers) + 1, procs)
        poller = asyncio.create_task(reader.poll(stop), name="job-reader")
        first = (int(time.time() + WARMUP_S) // 60 + 1) * 60
        boundaries = [first + 60 * k for k in range(minutes)]
        await sleep_until(first - 2)
        leader = schedulers[0]
        if kill:
            leader = await pg_leader_pid(admin, db) or schedulers[0]
        cpu0 = {pid: cpu_s(pid) for pid in schedulers}
        x0 = await xacts(admin, db)
        killed_at = None
        if kill:
            await sleep_until(first - 1)
            killed_at = time.time()
            procs.kill(leader)
        # wait for the window's executions to exist and start (or stop progressing)
        expected = (size - len(per_second)) * minutes + len(per_second) * (60 * (minutes - 1) + 1)
        await sleep_until(boundaries[-1] + 1)
        last, last_change, deadline = -1, time.monotonic(), time.monotonic() + SETTLE_MAX_S
        while True:
            rows = await read_executions(settings)
            window = [r for r in rows if r.scheduled_for is not None
                      and first <= r.scheduled_for.timestamp() <= boundaries[-1]]  # fmt: skip
            started = sum(1 for r in window if r.started_at is not None)
            if started >= expected:
                break
            if started != last:
                last, last_change = started, time.monotonic()
            if time.monotonic() > deadline or time.monotonic() - last_change > 20:
                break
            await asyncio.sleep(1.0)
        cpu = {pid: cpu_s(pid) - cpu0[pid] for pid in schedulers if procs.alive(pid)}
        stop.set()
        await poller
        await reader.read([r.id for r in window])
        procs.stop_all()
        x1 = await xacts(admin, db)
        misfires = count_in_logs(logdir, "scheduler-*.log", "scheduler.misfire")
    finally:
        stop.set()
        if poller is not None and not poller.done():
            poller.cancel()
        procs.stop_all()
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
        for k in range(0, len(keys), 500):
            await client.delete(*keys[k : k + 500])
        await client.aclose()
        await admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
    if os.environ.get("BENCH_KEEP_LOGS"):
        print(f"  logs kept in {logdir}", flush=True)
    else:
        shutil.rmtree(logdir, ignore_errors=True)  # kept (for reading) only when the run failed
    return analyse(size, minutes, per_second, _ids, boundaries, window, reader, cpu, x1 - x0,
                   misfires, seed_s, killed_at)  # fmt: skip


def analyse(size: int, minutes: int, per_second: set[str], ids: list[str], boundaries: list[int],
            window: list[Any], reader: JobReader, cpu: dict[int, float], xact_delta: int,
            misfires: int, seed_s: float, killed_at: float | None) -> dict[str, Any]:  # fmt: skip
    first, last = boundaries[0], boundaries[-1]
    expected: set[tuple[str, int]] = set()
    for sid in ids:
        instants = range(first, last + 1) if sid in per_second else boundaries
        expected.update((sid, t) for t in instants)
    seen = Counter((r.schedule_id, round(r.scheduled_for.timestamp())) for r in window)
    missing = [k for k in expected if k not in seen]
    duplicated = sum(n - 1 for n in seen.values() if n > 1)
    unexpected = sum(n for k, n in seen.items() if k not in expected)
    late, start_late, late_min, unread = [], [], [], 0
    late_at: dict[int, list[float]] = {b: [] for b in boundaries}  # minute ticks per boundary
    for r in window:
        instant = r.scheduled_for.timestamp()
        if r.id in reader.jobs:
            late.append(reader.jobs[r.id] - instant)
            if r.schedule_id not in per_second:
                late_min.append(reader.jobs[r.id] - instant)
                late_at.setdefault(round(instant), []).append(reader.jobs[r.id] - instant)
        else:
            unread += 1
        if r.started_at is not None:
            start_late.append(r.started_at.timestamp() - instant)
    ticks = len(window) or 1
    worst = sorted((r for r in window if r.id in reader.jobs),
                   key=lambda r: reader.jobs[r.id] - r.scheduled_for.timestamp())[-5:]  # fmt: skip
    boundary_missing = Counter(t for _s, t in missing if t in boundaries)
    out: dict[str, Any] = {
        "size": size,
        "every_second": len(per_second),
        "boundaries": [datetime.fromtimestamp(b, UTC).strftime("%H:%M:%S") for b in boundaries],
        "ticks_expected": len(expected),
        "executions": len(window),
        "missing": len(missing),
        "missing_per_boundary": [boundary_missing.get(b, 0) for b in boundaries],
        "duplicated": duplicated,
        "unexpected": unexpected,
        "p50_late_s": _r(percentile(late, 50)),
        "p99_late_s": _r(percentile(late, 99)),
        "max_late_s": _r(max(late) if late else None),
        "min_late_s": _r(min(late) if late else None),
        "minute_ticks_p99_late_s": _r(percentile(late_min, 99)),
        "minute_ticks_max_late_s": _r(max(late_min) if late_min else None),
        "minute_ticks_max_late_s_per_boundary": [
            _r(max(v, default=None)) for v in late_at.values()
        ],
        "worst_late": [_worst(r, reader, per_second) for r in worst],
        "jobs_unread": unread,
        "p50_start_late_s": _r(percentile(start_late, 50)),
        "p99_start_late_s": _r(percentile(start_late, 99)),
        "max_start_late_s": _r(max(start_late) if start_late else None),
        "not_started": len(window) - len(start_late),
        "scheduler_cpu_ms_per_tick": _r(1000 * sum(cpu.values()) / ticks, 4),
        "db_xacts_per_tick_all_processes": _r(xact_delta / ticks, 2),
        "misfire_warnings": misfires,
        "seed_s": _r(seed_s, 1),
    }
    if killed_at is not None:
        out["killed_before_boundary_s"] = _r(first - killed_at, 2)
        out["missing_at_kill_boundary"] = boundary_missing.get(first, 0)
        out["duplicated_at_kill_boundary"] = sum(
            n - 1 for (_s, t), n in seen.items() if n > 1 and t == first)  # fmt: skip
    return out


def _worst(r: Any, reader: JobReader, per_second: set[str]) -> dict[str, Any]:
    instant = r.scheduled_for.timestamp()
    return {
        "instant": r.scheduled_for.strftime("%H:%M:%S"),
        "per_second": r.schedule_id in per_second,
        "added_after_s": _r(reader.added[r.id] - instant),
        "runnable_after_s": _r(reader.jobs[r.id] - instant),
    }


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def report(r: dict[str, Any], label: str) -> None:
    target = f" ({TARGETS[r['size']]})" if r["size"] in TARGETS else ""
    print(
        f"{label} {r['size']:>6} schedules ({r['every_second']} every second), boundaries "
        f"{','.join(r['boundaries'])}: runnable late p50 {r['p50_late_s']} s, p99 "
        f"{r['p99_late_s']} s, max {r['max_late_s']} s{target}; start late p50 "
        f"{r['p50_start_late_s']} s, p99 {r['p99_start_late_s']} s, max {r['max_start_late_s']} s;"
        f" ticks {r['ticks_expected']}, missing {r['missing']} {r['missing_per_boundary']}, "
        f"duplicated {r['duplicated']} (target 0/0); scheduler CPU "
        f"{r['scheduler_cpu_ms_per_tick']} ms/tick; {r['db_xacts_per_tick_all_processes']} DB "
        f"xacts/tick (all processes); misfire warnings {r['misfire_warnings']}; jobs unread "
        f"{r['jobs_unread']}, not started {r['not_started']}",
        flush=True,
    )


async def run(sizes: list[int], minutes: int, every_second: int, kill: bool) -> dict[str, Any]:
    admin = await asyncpg.connect(ADMIN_DSN)
    results: dict[int, dict[str, Any]] = {}
    kill_result: dict[str, Any] | None = None
    try:
        for size in sizes:
            results[size] = await run_size(admin, size, minutes, every_second, kill=False)
            report(results[size], "steady")
        if kill:
            kill_result = await run_size(admin, 10_000, minutes, every_second, kill=True)
            report(kill_result, "leader SIGKILL")
            print(f"  kill {kill_result['killed_before_boundary_s']} s before the boundary: "
                  f"missing {kill_result['missing_at_kill_boundary']}, duplicated "
                  f"{kill_result['duplicated_at_kill_boundary']} at it", flush=True)  # fmt: skip
    finally:
        await admin.close()
    every = [*results.values(), *([kill_result] if kill_result else [])]
    out: dict[str, Any] = {
        "p99_late_s_10k": results[10_000]["p99_late_s"] if 10_000 in results else None,
        "max_late_s_10k": results[10_000]["max_late_s"] if 10_000 in results else None,
        "max_late_s_30k": results[30_000]["max_late_s"] if 30_000 in results else None,
        "missing": sum(r["missing"] for r in every) if every else None,
        "duplicated": sum(r["duplicated"] for r in every) if every else None,
        "sizes": {str(k): v for k, v in results.items()},
        "kill_10k": kill_result,
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,10000,30000",
                        help="comma-separated schedule counts")  # fmt: skip
    parser.add_argument("--minutes", type=int, default=2, help="minute boundaries measured")
    parser.add_argument("--every-second", type=int, default=20,
                        help="schedules per size that fire every second")  # fmt: skip
    parser.add_argument("--kill", action="store_true",
                        help="also SIGKILL the leader before a boundary at 10,000 schedules")  # fmt: skip
    args = parser.parse_args()
    if args.minutes < 2:
        parser.error("--minutes must be at least 2")
    sizes = [int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()]
    print(json.dumps(asyncio.run(run(sizes, args.minutes, args.every_second, args.kill))))


if __name__ == "__main__":
    main()
