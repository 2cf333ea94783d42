"""Shared by the execution-worker benchmarks (``execution_throughput``, ``latency``, ``fairness``).

* a throwaway Postgres database (created, migrated, dropped) and a unique Redis key prefix;
* seeding: executions inserted in bulk, enqueued through :class:`ExecutionDispatcher`;
* the Conveyor worker as a subprocess (``python -m conveyor.workers.execution``) with its peak
  RSS sampled; timings read back from the database (``started_at`` / ``finished_at``);
* the baseline: a raw ``bullmq`` no-op worker, also a subprocess, run by this file::

      python bench/_exec_common.py raw-worker PREFIX QUEUE CONCURRENCY EXPECT

  It processes EXPECT jobs, pushes ``now - data.t`` (ms) for jobs whose data has ``t`` to
  ``PREFIX:raw:lat``, writes ``{"first", "last", "n"}`` to ``PREFIX:raw:result`` and exits.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import psutil
import redis as redis_sync
import redis.asyncio as aioredis
from sqlalchemy import func, select

from conveyor.dispatch import ExecutionDispatcher
from conveyor.queue import QueueFactory, WorkflowExecute
from conveyor.queue.payloads import DEFAULT_JOB_OPTIONS
from conveyor.settings import Settings, load_settings
from conveyor.store import Store, migrate, utcnow
from conveyor.store.schema import executions
from conveyor.store.triggers import insert_values, new_execution

ADMIN_DSN = os.environ.get("TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_HOST = os.environ.get("QUEUE_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("QUEUE_REDIS_PORT", "6379"))
QUEUE = "workflow.execute.us"
NOOP = [{"id": "n", "type": "noop"}]
HERE = os.path.dirname(os.path.abspath(__file__))


def percentile(values: Sequence[float], p: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = min(len(ordered) - 1, max(0, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def summary(values: Sequence[float]) -> str:
    return (
        f"p50 {percentile(values, 50):.2f} ms, p99 {percentile(values, 99):.2f} ms, "
        f"max {max(values):.2f} ms, mean {statistics.fmean(values):.2f} ms (n={len(values)})"
    )


class Steal:
    """Share of the machine's CPU time the hypervisor took from this VM (``steal`` in
    ``/proc/stat``) over a block: the noise every figure here is exposed to. ``pct`` is
    ``None`` where ``/proc/stat`` has no steal column."""

    def __init__(self) -> None:
        self.pct: float | None = None
        self._start: tuple[int, int] | None = None

    @staticmethod
    def _read() -> tuple[int, int] | None:
        try:
            with open("/proc/stat", encoding="ascii") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        return (fields[7], sum(fields)) if len(fields) > 7 else None

    def __enter__(self) -> Steal:
        self._start = self._read()
        return self

    def __exit__(self, *_: object) -> None:
        end = self._read()
        if self._start is not None and end is not None and end[1] > self._start[1]:
            self.pct = round(100 * (end[0] - self._start[0]) / (end[1] - self._start[1]), 2)


@dataclass
class Env:
    """One benchmark run's database and Redis prefix."""

    url: str
    prefix: str

    def settings(self, **extra: str) -> Settings:
        return load_settings(self.env(**extra))

    def env(self, **extra: str) -> dict[str, str]:
        env = {
            "QUEUE_REDIS_HOST": REDIS_HOST,
            "QUEUE_REDIS_PORT": str(REDIS_PORT),
            "QUEUE_PREFIX": self.prefix,
            "DATABASE_URL": self.url,
            "LOG_LEVEL": "WARNING",
            "HEARTBEAT_INTERVAL_MS": "5000",
        }
        env.update(extra)
        return env


@asynccontextmanager
async def bench_env() -> AsyncIterator[Env]:
    """A migrated throwaway database and a unique prefix; both removed afterwards."""
    name = f"conveyor_wbench_{uuid.uuid4().hex[:10]}"
    admin = await asyncpg.connect(ADMIN_DSN)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    env = Env(f"{ADMIN_DSN.rsplit('/', 1)[0]}/{name}", f"wbench{uuid.uuid4().hex[:8]}")
    try:
        await migrate(env.settings())
        yield env
    finally:
        await delete_prefix(env.prefix)
        admin = await asyncpg.connect(ADMIN_DSN)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def delete_prefix(prefix: str) -> None:
    client = aioredis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    try:
        keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
        for i in range(0, len(keys), 500):
            await client.delete(*keys[i : i + 500])
    finally:
        await client.aclose()


class Seed:
    """Tenants, one noop workflow each, executions inserted in bulk and dispatched."""

    def __init__(self, store: Store, queues: QueueFactory, settings: Settings) -> None:
        self.store = store
        self.queues = queues
        self.dispatcher = ExecutionDispatcher(queues, settings)
        self.workflows: dict[str, str] = {}

    async def tenant(self, name: str, steps: list[dict[str, Any]] | None = None) -> str:
        """A tenant with one workflow of ``steps`` (default: one ``noop``)."""
        tenant = await self.store.tenants.create(name)
        definition = {"name": "bench", "steps": steps or NOOP}
        wf = await self.store.workflows.create(tenant.id, definition)
        self.workflows[tenant.id] = wf.id
        return tenant.id

    async def insert(self, tenant: str, n: int) -> list[str]:
        now = utcnow()
        rows = [
            new_execution(
                tenant_id=tenant,
                workflow_id=self.workflows[tenant],
                version=1,
                region="us",
                input=None,
                triggered_by="api",
                now=now,
            )
            for _ in range(n)
        ]
        async with self.store.engine.begin() as conn:
            for i in range(0, n, 2000):
                await conn.execute(
                    executions.insert(), [insert_values(r) for r in rows[i : i + 2000]]
                )
        return [r.id for r in rows]

    def payload(self, tenant: str, execution_id: str) -> WorkflowExecute:
        return WorkflowExecute(
            execution_id=execution_id,
            tenant_id=tenant,
            workflow_id=self.workflows[tenant],
            region="us",
        )

    async def dispatch(self, tenant: str, ids: Sequence[str]) -> None:
        for i in range(0, len(ids), 1000):
            await self.dispatcher.enqueue_many([self.payload(tenant, e) for e in ids[i : i + 1000]])

    async def succeeded(self) -> int:
        async with self.store.engine.connect() as conn:
            return int(
                (
                    await conn.execute(
                        select(func.count()).where(executions.c.status == "succeeded")
                    )
                ).scalar_one()
            )

    async def wait_succeeded(self, n: int, timeout_s: float, proc: subprocess.Popen[bytes]) -> None:
        deadline = time.monotonic() + timeout_s
        last, last_change = -1, time.monotonic()
        while (done := await self.succeeded()) < n:
            now = time.monotonic()
            if done != last:
                last, last_change = done, now
            if proc.poll() is not None:
                raise RuntimeError(f"worker exited with {proc.returncode}")
            if now > deadline or now - last_change > 30:
                raise TimeoutError(f"{done} of {n} executions done; no progress for 30 s")
            await asyncio.sleep(0.2)

    async def span_s(self, ids: Sequence[str] | None = None) -> tuple[float, float]:
        """(first start, last finish) as epoch seconds, over ``ids`` or every execution."""
        query = select(func.min(executions.c.started_at), func.max(executions.c.finished_at))
        if ids is not None:
            query = query.where(executions.c.id.in_(list(ids)))
        async with self.store.engine.connect() as conn:
            first, last = (await conn.execute(query)).one()
        return first.timestamp(), last.timestamp()

    async def started_at(self, ids: Sequence[str]) -> dict[str, float]:
        async with self.store.engine.connect() as conn:
            rows = (
                await conn.execute(
                    select(executions.c.id, executions.c.started_at).where(
                        executions.c.id.in_(list(ids))
                    )
                )
            ).all()
        return {r.id: r.started_at.timestamp() for r in rows if r.started_at is not None}


@asynccontextmanager
async def seeded(env: Env) -> AsyncIterator[Seed]:
    settings = env.settings()
    async with Store(settings) as store, QueueFactory(settings) as queues:
        yield Seed(store, queues, settings)


class RssSampler:
    """Samples a process's RSS every 50 ms in a thread (``peak_mb``) and the CPU time it used
    while sampled (``cpu_s``, user + system; :meth:`cpu_since` for the part after a moment,
    e.g. without the process's start-up)."""

    def __init__(self, pid: int) -> None:
        self._proc = psutil.Process(pid)
        self.peak = 0
        self.cpu_s = 0.0
        self._cpu0 = 0.0
        self._samples: list[tuple[float, float]] = []
        """(epoch seconds, ``cpu_s``) at each sample."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _cpu(self) -> float:
        times = self._proc.cpu_times()
        return float(times.user + times.system)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self._proc.memory_info().rss)
                self.cpu_s = self._cpu() - self._cpu0
                self._samples.append((time.time(), self.cpu_s))
            except psutil.Error:
                return
            self._stop.wait(0.05)

    def __enter__(self) -> RssSampler:
        self._cpu0 = self._cpu()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        with suppress(psutil.Error):
            self.cpu_s = self._cpu() - self._cpu0

    @property
    def peak_mb(self) -> float:
        return self.peak / (1024 * 1024)

    def cpu_since(self, epoch_s: float) -> float:
        """CPU seconds used from the last sample at or before ``epoch_s`` to the end."""
        before = [cpu for t, cpu in self._samples if t <= epoch_s]
        return self.cpu_s - (before[-1] if before else 0.0)

    def cpu_within(self, start_s: float, end_s: float) -> float:
        """CPU seconds used from the last sample at or before ``start_s`` to the first one at
        or after ``end_s`` (the end when none is)."""
        after = [cpu for t, cpu in self._samples if t >= end_s]
        return (after[0] if after else self.cpu_s) - self.cpu_s + self.cpu_since(start_s)


class ServiceCpu:
    """CPU time used by PostgreSQL (every ``postgres`` process: the postmaster, its helpers and
    each backend) and by Redis (``INFO cpu``), sampled every ``interval_s`` in a thread, so a
    phase's share can be read for its steady part alone (:meth:`within`, e.g. from the first
    job's start to the last one's end). Per backend: one that exits counts up to its last
    sample, one that starts counts from zero."""

    def __init__(self, interval_s: float = 0.25) -> None:
        self._interval_s = interval_s
        self._redis = redis_sync.Redis(host=REDIS_HOST, port=REDIS_PORT)
        self._procs: dict[int, psutil.Process] = {}
        self._samples: list[tuple[float, dict[int, float], float]] = []
        """(epoch seconds, CPU seconds of each postgres pid, Redis CPU seconds)."""
        self._lock = threading.Lock()
        """Samples are taken by the thread and by :meth:`sample` callers, one at a time."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _postgres(self) -> dict[int, float]:
        for p in psutil.process_iter(["name"]):
            if p.pid not in self._procs and (p.info.get("name") or "").startswith("postgres"):
                self._procs[p.pid] = p
        cpu: dict[int, float] = {}
        for pid, p in list(self._procs.items()):
            try:
                times = p.cpu_times()
            except psutil.Error:
                del self._procs[pid]
                continue
            cpu[pid] = float(times.user + times.system)
        return cpu

    def sample(self) -> None:
        """Take a sample now (the thread takes one every ``interval_s``)."""
        with self._lock:
            info = self._redis.info("cpu")
            redis_s = float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
            self._samples.append((time.time(), self._postgres(), redis_s))

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self.sample()

    def __enter__(self) -> ServiceCpu:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()
        self._redis.close()

    def within(self, start_s: float, end_s: float) -> dict[str, float]:
        """CPU seconds of ``postgres`` and ``redis`` from the last sample at or before
        ``start_s`` to the first one at or after ``end_s`` (epoch seconds); a backend that
        exited in between counts up to its last sample."""
        first = max([i for i, s in enumerate(self._samples) if s[0] <= start_s], default=0)
        last = min(
            [i for i, s in enumerate(self._samples) if s[0] >= end_s],
            default=len(self._samples) - 1,
        )
        _t0, pg0, redis0 = self._samples[first]
        seen: dict[int, float] = {}
        for _t, pg, _redis in self._samples[first : last + 1]:
            seen.update(pg)
        postgres = sum(cpu - pg0.get(pid, 0.0) for pid, cpu in seen.items())
        return {"postgres": postgres, "redis": self._samples[last][2] - redis0}


@asynccontextmanager
async def conveyor_worker(env: Env, **extra: str) -> AsyncIterator[subprocess.Popen[bytes]]:
    """``python -m conveyor.workers.execution``; SIGTERM + bounded wait (then kill) afterwards."""
    full = {**os.environ, **env.env(**extra)}
    proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once; waits are bounded
        [sys.executable, "-m", "conveyor.workers.execution"], env=full
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


async def wait_worker_ready(env: Env, proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    """Until the worker's heartbeat appears (it is consuming)."""
    client = aioredis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    deadline = time.monotonic() + timeout_s
    try:
        while not await client.zcard(f"{env.prefix}:conveyor:processes"):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("worker did not start")
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()


# --- the raw bullmq baseline -----------------------------------------------------------------
def raw_job(i: int, t_ms: float | None = None, tenant: str = "raw") -> dict[str, Any]:
    data: dict[str, Any] = {
        "executionId": f"raw-{i}",
        "tenantId": tenant,
        "workflowId": "wf",
        "region": "us",
    }
    if t_ms is not None:
        data["t"] = t_ms
    return {
        "name": "workflow.execute",
        "data": data,
        "opts": {**DEFAULT_JOB_OPTIONS, "jobId": f"raw-{uuid.uuid4().hex}"},
    }


def raw_queue(prefix: str) -> Any:
    import bullmq

    return bullmq.Queue(
        QUEUE, {"connection": {"host": REDIS_HOST, "port": REDIS_PORT}, "prefix": prefix}
    )


@asynccontextmanager
async def raw_worker(
    prefix: str, concurrency: int, expect: int
) -> AsyncIterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once; waits are bounded
        [
            sys.executable,
            os.path.join(HERE, "_exec_common.py"),
            "raw-worker",
            prefix,
            QUEUE,
            str(concurrency),
            str(expect),
        ]
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


async def raw_result(
    prefix: str, proc: subprocess.Popen[bytes], timeout_s: float
) -> dict[str, Any]:
    client = aioredis.Redis(host=REDIS_HOST, port=REDIS_PORT, decode_responses=True)
    deadline = time.monotonic() + timeout_s
    try:
        while (raw := await client.get(f"{prefix}:raw:result")) is None:
            if proc.poll() is not None and proc.returncode != 0:
                raise RuntimeError(f"raw worker exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError("raw worker did not finish")
            await asyncio.sleep(0.1)
        result: dict[str, Any] = json.loads(raw)
        result["latencies"] = [float(x) for x in await client.lrange(f"{prefix}:raw:lat", 0, -1)]
        return result
    finally:
        await client.aclose()


async def raw_ready(prefix: str, timeout_s: float = 30) -> None:
    client = aioredis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    deadline = time.monotonic() + timeout_s
    try:
        while not await client.exists(f"{prefix}:raw:ready"):
            if time.monotonic() > deadline:
                raise TimeoutError("raw worker did not start")
            await asyncio.sleep(0.05)
    finally:
        await client.aclose()


async def _raw_worker_main(prefix: str, queue: str, concurrency: int, expect: int) -> None:
    import bullmq

    client = aioredis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    done = 0
    first = 0.0
    finished = asyncio.Event()

    async def noop(job: Any, token: str) -> None:
        nonlocal done, first
        now = time.time()
        if not first:
            first = now
        t = job.data.get("t")
        if t is not None:
            await client.rpush(f"{prefix}:raw:lat", now * 1000 - t)
        done += 1
        if done >= expect:
            finished.set()

    worker = bullmq.Worker(
        queue,
        noop,
        {
            "connection": {"host": REDIS_HOST, "port": REDIS_PORT},
            "prefix": prefix,
            "concurrency": concurrency,
            "autorun": False,
            "removeOnComplete": DEFAULT_JOB_OPTIONS["removeOnComplete"],
        },
    )
    task = asyncio.ensure_future(worker.run())
    await client.set(f"{prefix}:raw:ready", 1)
    await finished.wait()
    last = time.time()
    await client.set(f"{prefix}:raw:result", json.dumps({"first": first, "last": last, "n": done}))
    await worker.close()
    await task
    await client.aclose()


if __name__ == "__main__" and sys.argv[1:2] == ["raw-worker"]:
    import uvloop

    _prefix, _queue, _conc, _expect = sys.argv[2:6]
    uvloop.run(_raw_worker_main(_prefix, _queue, int(_conc), int(_expect)))
