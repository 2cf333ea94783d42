"""How late do durable timers fire? Conveyor's timer dispatcher vs raw ``bullmq`` delayed jobs.

In one run, against the same Redis and Postgres:

* **conveyor**: N timers (default 2,000) due at random instants spread over a window
  (default 20 s) are written to a fresh Postgres database (each with its waiting execution);
  one ``conveyor timers`` process (``python -m conveyor.workers.timer_dispatcher``, default
  settings) fires them onto ``workflow.execute.us``; a Conveyor worker in this process records
  when each job arrives.
* **raw bullmq** (second phase, so the two never compete for CPU): N ``bullmq`` delayed jobs
  with the same spread of due instants (``delay`` = due - now at add time) on another queue,
  consumed by a plain ``bullmq.Worker`` in this process.

Lateness = arrival at the consumer - due instant (end to end, both measured the same way);
"early" counts arrivals before the due instant.
Creates and drops its own database and deletes its Redis keys.

    .venv/bin/python bench/timer_precision.py [--timers 2000] [--window 20]

Last line: JSON with ``p50_late_ms``, ``p99_late_ms``, ``max_late_ms``, ``early``,
``raw_p99_late_ms`` (target: p99 <= 25 ms, early == 0).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import random
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import bullmq
import psutil
import redis.asyncio as aioredis

from conveyor.dispatch import keys
from conveyor.queue import JobContext, QueueFactory, WorkflowExecute
from conveyor.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[1]
ADMIN_DSN = os.environ.get("TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
RAW_QUEUE = "bench.raw-delayed"
LEAD_S = 6.0  # time for the dispatcher to start before the first timer is due
CONSUMERS = 1
"""Consumer concurrency for both phases (the jobs do nothing; a higher concurrency only slows
the ``bullmq`` worker's pick-up on this machine)."""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[k]


async def seed(settings: Settings, dues: list[datetime]) -> dict[str, float]:
    """Waiting executions with one pending timer each; ``{timer id: due epoch}``."""
    from conveyor.store import Store, migrate, new_id
    from conveyor.store.schema import executions, timers

    await migrate(settings)
    async with Store(settings, pool_size=1) as store:
        tenant = await store.tenants.create("bench")
        wf = await store.workflows.create(
            tenant.id, {"name": "t", "steps": [{"id": "n", "type": "noop"}]}
        )
        now = datetime.now(UTC)
        out: dict[str, float] = {}
        ex_rows, tm_rows = [], []
        for due in dues:
            eid, tid = new_id(), new_id()
            ex_rows.append(dict(
                id=eid, tenant_id=tenant.id, workflow_id=wf.id, workflow_version=1,
                status="waiting", region="us", triggered_by="api", wake_at=due, next_step=1,
                created_at=now, queued_at=now, updated_at=now))  # fmt: skip
            tm_rows.append(dict(
                id=tid, tenant_id=tenant.id, execution_id=eid, workflow_id=wf.id, region="us",
                seq=0, due_at=due, status="pending", created_at=now))  # fmt: skip
            out[tid] = due.timestamp()
        async with store.engine.begin() as conn:
            for i in range(0, len(dues), 500):
                await conn.execute(executions.insert(), ex_rows[i : i + 500])
                await conn.execute(timers.insert(), tm_rows[i : i + 500])
    return out


class Recorder:
    def __init__(self) -> None:
        self.arrivals: dict[str, tuple[float, int]] = {}
        self.duplicates = 0

    async def conveyor(self, payload: WorkflowExecute, ctx: JobContext) -> None:
        if ctx.id in self.arrivals:
            self.duplicates += 1
        self.arrivals[ctx.id] = (time.time(), ctx.timestamp_ms)

    async def raw(self, job: Any, _token: str) -> None:
        self.arrivals[f"raw:{job.id}"] = (time.time(), int(job.timestamp))


def start_dispatcher(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "conveyor.workers.timer_dispatcher"],
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip


async def wait_started(
    redis: aioredis.Redis, prefix: str, proc: subprocess.Popen[bytes], log_path: Path
) -> None:
    """Until the dispatcher's heartbeat appears (it is claiming by then)."""
    deadline = time.monotonic() + 30
    while not [k async for k in redis.scan_iter(match=f"{prefix}:conveyor:process:*")]:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"dispatcher did not start, see {log_path}")
        await asyncio.sleep(0.1)


def summary(name: str, late_ms: list[float]) -> str:
    return (
        f"{name:>12}: n={len(late_ms):5d}  p50={percentile(late_ms, 50):8.2f} ms  "
        f"p99={percentile(late_ms, 99):8.2f} ms  max={max(late_ms):8.2f} ms"
    )


def offsets(count: int, window: float) -> list[float]:
    rng = random.Random(42)
    return [round(rng.uniform(0, window), 3) for _ in range(count)]


async def conveyor_phase(
    settings: Settings, env: dict[str, str], redis: aioredis.Redis, count: int, window: float
) -> tuple[dict[str, float], Recorder, float]:
    """One ``conveyor timers`` process fires ``count`` timers; a worker here receives them.
    Returns ({timer id: due epoch}, the arrivals, the dispatcher's CPU seconds from when it
    ran until the window's end — start-up excluded)."""
    from conveyor.store import migrate

    await migrate(settings)
    log_path = Path(f"/tmp/{settings.queue_prefix}-timers.log")
    proc = start_dispatcher(env, log_path)
    rec = Recorder()
    cpu = 0.0
    try:
        await wait_started(redis, settings.queue_prefix, proc, log_path)
        cpu0 = proc_cpu_s(proc.pid)
        start_at = datetime.now(UTC) + timedelta(seconds=LEAD_S)
        due_at = [start_at + timedelta(seconds=o) for o in offsets(count, window)]
        timers = await seed(settings, due_at)
        print(f"conveyor: {count} timers seeded; first due in "
              f"{start_at.timestamp() - time.time():.1f} s")  # fmt: skip
        async with QueueFactory(settings) as queues:
            worker = queues.create_worker(
                "workflow.execute.us", rec.conveyor, concurrency=CONSUMERS
            )
            task = asyncio.create_task(worker.run())
            await asyncio.sleep(start_at.timestamp() + window + 2.0 - time.time())
            await worker.close(timeout_s=5)
            await asyncio.gather(task, return_exceptions=True)
        if proc.poll() is not None:
            raise RuntimeError(f"dispatcher died, see {log_path}")
        cpu = proc_cpu_s(proc.pid) - cpu0
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    hist = await redis.hgetall(keys.metrics_histogram(settings.queue_prefix, "timer_lag_seconds"))
    fields = {k.decode(): float(v) for k, v in hist.items()}
    total = fields.get("|count", 0.0) or 1.0
    within = {le: fields.get(f"|le={le}", 0.0) / total for le in ("0.01", "0.05")}
    print(f"conveyor dispatcher's own lag (its histogram): <=10 ms {within['0.01']:.1%}, "
          f"<=50 ms {within['0.01'] + within['0.05']:.1%} of {int(total)} timers")  # fmt: skip
    return timers, rec, cpu


def proc_cpu_s(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def raw_phase(settings: Settings, count: int, window: float) -> tuple[dict[str, float],
                                                                           Recorder]:  # fmt: skip
    """``count`` raw ``bullmq`` delayed jobs with the same spread; a ``bullmq.Worker`` here."""
    rec = Recorder()
    conn = {"host": settings.queue_redis_host, "port": settings.queue_redis_port}
    prefix = settings.queue_prefix
    queue = bullmq.Queue(RAW_QUEUE, {"connection": conn, "prefix": prefix})
    worker = bullmq.Worker(RAW_QUEUE, rec.raw, {"connection": conn, "prefix": prefix,
                                                "concurrency": CONSUMERS, "autorun": False})  # fmt: skip
    start_at = time.time() + 3.0
    due: dict[str, float] = {}
    jobs: list[dict[str, Any]] = []
    for i, o in enumerate(offsets(count, window)):
        due[f"raw:r{i}"] = start_at + o
        delay = int((start_at + o - time.time()) * 1000)
        jobs.append({"name": "t", "data": {"i": i}, "opts": {"jobId": f"r{i}", "delay": delay}})
    for i in range(0, len(jobs), 500):
        await queue.addBulk(jobs[i : i + 500])
    task = asyncio.create_task(worker.run())
    await asyncio.sleep(start_at + window + 2.0 - time.time())
    await worker.close()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await queue.close()
    return due, rec


def lateness(due: dict[str, float], rec: Recorder, key: str) -> tuple[list[float], int]:
    """(arrival lateness in ms, arrivals before the due instant); missing ones are skipped."""
    late, early = [], 0
    for ident, at in due.items():
        got = rec.arrivals.get(key.format(ident))
        if got is not None:
            late.append((got[0] - at) * 1000)
            early += got[0] < at
    return late, early


async def run(count: int, window: float) -> dict[str, Any]:
    db = f"conveyor_bench_{uuid.uuid4().hex[:10]}"
    prefix = f"benchtp{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    await admin.execute(f'CREATE DATABASE "{db}"')
    env = {k: v for k, v in os.environ.items() if not k.startswith(("QUEUE_", "TIMER_"))}
    env.update(DATABASE_URL=ADMIN_DSN.rsplit("/", 1)[0] + "/" + db, QUEUE_PREFIX=prefix,
               LOG_LEVEL="WARNING", PYTHONPATH=str(ROOT / "src"))  # fmt: skip
    settings = load_settings(env)
    redis = aioredis.Redis(host=settings.queue_redis_host, port=settings.queue_redis_port)
    gc.freeze()
    gc.disable()  # keep collector pauses out of this process's (the consumers') measurements
    try:
        timers, rec, _cpu = await conveyor_phase(settings, env, redis, count, window)
        raw_due, raw_rec = await raw_phase(settings, count, window)
    finally:
        gc.enable()
        keys = [k async for k in redis.scan_iter(match=f"{prefix}:*", count=1000)]
        for i in range(0, len(keys), 500):
            await redis.delete(*keys[i : i + 500])
        await redis.aclose()
        await admin.execute(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)')
        await admin.close()
    late, early = lateness(timers, rec, "timer:{}")
    raw_late, _raw_early = lateness(raw_due, raw_rec, "{}")
    print(f"{count} timers due over {window:.0f} s; lateness = consumer arrival - due instant")
    print(summary("conveyor", late))
    print(summary("raw bullmq", raw_late))
    p99, raw_p99 = percentile(late, 99), percentile(raw_late, 99)
    missing = len(timers) - len(late)
    print(f"missing={missing} duplicates={rec.duplicates} early={early} "
          f"raw_missing={len(raw_due) - len(raw_late)}")  # fmt: skip
    print(f"p99 lateness ratio raw bullmq / conveyor = {raw_p99 / p99:.1f}x")
    return {
        "p50_late_ms": round(percentile(late, 50), 2),
        "p99_late_ms": round(p99, 2),
        "max_late_ms": round(max(late), 2),
        "early": early,
        "raw_p99_late_ms": round(raw_p99, 2),
        "raw_p50_late_ms": round(percentile(raw_late, 50), 2),
        "missing": missing,
        "duplicates": rec.duplicates,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timers", type=int, default=2000)
    parser.add_argument("--window", type=float, default=20.0)
    args = parser.parse_args()
    result = asyncio.run(run(args.timers, args.window))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
