"""Executions/s with 1, 2 and 4 worker processes on one Redis and one PostgreSQL, and why.

For each workflow — a one-step ``noop`` and a realistic ``http`` + ``transform`` against a fast
local target (a uvloop HTTP server, keep-alive, run by this file) — and for N = 1, 2, 4:

1. M executions are inserted in a throwaway Postgres database and enqueued while the queue is
   paused (BullMQ's own flag);
2. ``conveyor worker --processes N`` starts (the fleet: a supervisor and N children; N = 1 is the
   plain worker) and the run waits for N live worker heartbeats;
3. the queue is resumed and the run waits until every execution succeeded. Throughput is the
   executions over the first start → last finish span (from the database).

CPU over the measured window, per execution: the worker processes (psutil, children of the
supervisor), Redis (``INFO cpu``: ``used_cpu_sys + used_cpu_user``), the PostgreSQL backends
serving the bench database (``/proc/<pid>/stat`` of the ``pg_stat_activity`` pids), the HTTP
target; and the whole machine's busy share (``/proc/stat``, other tenants of the host
included). Redis is a private ``redis-server`` started by the run (the shared one serves other
people's tests: its CPU would not be ours); PostgreSQL is the shared server, a fresh database.

The ceiling named at the end is the resource closest to saturation at N = 4: Redis (one core:
its command loop is single-threaded), PostgreSQL, or this machine's cores.

    .venv/bin/python bench/scaling.py [--noop 5000] [--http 2000] [--concurrency 50]

About 40 s on a quiet 2-core host (2026-12-07; 3 minutes under a load average of 9 before the
worker got faster).

Last line: JSON with ``per_s_1``, ``per_s_2``, ``per_s_4`` (noop), ``http_per_s_*``,
``efficiency_*``, ``ceiling``, and ``per_core_workers|redis|postgres``: the executions/s one
core of each sustains (1 / its CPU per execution, the median of the three runs) — the capacity
model of docs/scaling.md.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import psutil
import redis.asyncio as aioredis
import uvloop
from sqlalchemy import func, select

import _exec_common as common
from _exec_common import QUEUE, Env, Seed, Steal, bench_env, seeded
from conveyor.runtime import list_processes
from conveyor.store.schema import executions

HERE = os.path.dirname(os.path.abspath(__file__))
TICKS = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1
COUNTS = (1, 2, 4)


# --- the fast local HTTP target ----------------------------------------------------------------
ORDER = json.dumps(
    {"id": 42, "total": 150, "currency": "EUR", "customer": {"email": "a@example.test"}}
).encode()
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: "
    + str(len(ORDER)).encode()
    + b"\r\n\r\n"
    + ORDER
)


class _Target(asyncio.Protocol):
    """Answers every request (keep-alive) with the same order document."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport  # uvloop's transports are not asyncio.Transport
        self.buf = b""

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while (end := self.buf.find(b"\r\n\r\n")) >= 0:
            head, self.buf = self.buf[:end], self.buf[end + 4 :]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            self.buf = self.buf[length:]
            self.transport.write(RESPONSE)


async def _target_main(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Target, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


# --- measuring ---------------------------------------------------------------------------------
def machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of all cores from ``/proc/stat``."""
    with open("/proc/stat", encoding="ascii") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def proc_cpu_s(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def tree_cpu_s(pid: int) -> float:
    """CPU seconds of a process and its living children."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0.0
    for p in procs:
        with suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


@dataclass
class Sample:
    at: float
    workers: float
    redis: float
    pg: dict[int, float]
    target: float
    machine: tuple[int, int]


@dataclass
class Meters:
    """Everything whose CPU a run reports."""

    redis: aioredis.Redis
    admin: asyncpg.Connection
    db: str
    target_pid: int
    fleet_pid: int = 0

    async def redis_cpu_s(self) -> float:
        info = await self.redis.info("cpu")
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

    async def pg_cpu(self) -> dict[int, float]:
        pids = await self.admin.fetch(
            "SELECT pid FROM pg_stat_activity WHERE datname = $1", self.db
        )
        return {int(r["pid"]): proc_cpu_s(int(r["pid"])) for r in pids}

    async def sample(self) -> Sample:
        return Sample(
            time.monotonic(),
            tree_cpu_s(self.fleet_pid),
            await self.redis_cpu_s(),
            await self.pg_cpu(),
            proc_cpu_s(self.target_pid),
            machine_ticks(),
        )


@dataclass
class Result:
    workflow: str
    processes: int
    n: int
    per_s: float
    wall_s: float
    cores: dict[str, float] = field(default_factory=dict)
    """Cores used on average over the window, per component."""
    us_per_execution: dict[str, float] = field(default_factory=dict)
    steal_pct: float | None = None


def compare(workflow: str, processes: int, n: int, per_s: float, a: Sample, b: Sample) -> Result:
    wall = b.at - a.at
    pg = sum(cpu - a.pg.get(pid, 0.0) for pid, cpu in b.pg.items())
    used = {
        "workers": b.workers - a.workers,
        "redis": b.redis - a.redis,
        "postgres": pg,
        "target": b.target - a.target,
    }
    busy = (b.machine[0] - a.machine[0]) / max(1, b.machine[1] - a.machine[1])
    cores = {k: round(v / wall, 2) for k, v in used.items()}
    cores["machine"] = round(busy * CORES, 2)
    cores["others"] = round(max(0.0, busy * CORES - sum(used.values()) / wall), 2)
    per_exec = {k: round(v / n * 1e6) for k, v in used.items()}
    per_exec["all"] = sum(per_exec.values())
    return Result(workflow, processes, n, per_s, wall, cores, per_exec)


# --- one run -----------------------------------------------------------------------------------
@asynccontextmanager
async def private_redis() -> AsyncIterator[int]:
    """A throwaway ``redis-server`` (no persistence) on a free port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    with tempfile.TemporaryDirectory(prefix="conveyor-scaling-") as tmp:
        proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
             "no", "--dir", tmp],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            client = aioredis.Redis(port=port)
            for _ in range(100):
                with suppress(Exception):
                    if await client.ping():
                        break
                await asyncio.sleep(0.05)
            await client.aclose()
            yield port
        finally:
            proc.terminate()
            proc.wait(timeout=10)


def workflow_steps(kind: str, target_port: int) -> list[dict[str, Any]]:
    if kind == "noop":
        return [{"id": "n", "type": "noop"}]
    return [
        {
            "id": "fetch",
            "type": "http",
            "url": f"http://127.0.0.1:{target_port}/orders/{{{{ input.n }}}}",
            "select": "body",
        },
        {
            "id": "summary",
            "type": "transform",
            "expression": "{orderId: steps.fetch.id, total: steps.fetch.total, "
            "email: steps.fetch.customer.email}",
        },
    ]


async def seed_run(seed: Seed, kind: str, n: int, target_port: int) -> str:
    tenant = (await seed.store.tenants.create(f"{kind}-{time.monotonic_ns()}")).id
    wf = await seed.store.workflows.create(
        tenant, {"name": kind, "steps": workflow_steps(kind, target_port)}
    )
    seed.workflows[tenant] = wf.id
    ids = await seed.insert(tenant, n)
    if kind != "noop":  # an input for the URL template
        async with seed.store.engine.begin() as conn:
            await conn.execute(
                executions.update().where(executions.c.tenant_id == tenant).values(input={"n": 1})
            )
    await seed.dispatch(tenant, ids)
    return tenant


async def tenant_done(seed: Seed, tenant: str) -> tuple[int, int]:
    """(succeeded, not finished) of ``tenant``'s executions."""
    async with seed.store.engine.connect() as conn:
        rows = (
            await conn.execute(
                select(executions.c.status, func.count())
                .where(executions.c.tenant_id == tenant)
                .group_by(executions.c.status)
            )
        ).all()
    counts = {str(r[0]): int(r[1]) for r in rows}
    failed = counts.get("failed", 0)
    if failed:
        raise RuntimeError(f"{failed} executions failed")
    return counts.get("succeeded", 0), sum(counts.values()) - counts.get("succeeded", 0)


async def tenant_span(seed: Seed, tenant: str) -> float:
    query = select(func.min(executions.c.started_at), func.max(executions.c.finished_at)).where(
        executions.c.tenant_id == tenant
    )
    async with seed.store.engine.connect() as conn:
        first, last = (await conn.execute(query)).one()
    return float(last.timestamp() - first.timestamp())


async def wait_heartbeats(seed: Seed, n: int, proc: Any) -> None:
    """Until ``n`` live worker heartbeats (each process publishes one once it consumes)."""
    deadline = time.monotonic() + 90
    while len(await list_processes(seed.queues, role="worker")) < n:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{n} workers did not start (exit {proc.poll()})")
        await asyncio.sleep(0.1)


async def one_run(
    env: Env, seed: Seed, meters: Meters, kind: str, processes: int, n: int, args: Any
) -> Result:
    queue = seed.queues.create_queue(QUEUE)
    await queue.pause()
    tenant = await seed_run(seed, kind, n, args.target_port)
    extra = env.env(
        EXECUTION_WORKER_CONCURRENCY=str(args.concurrency),
        # the tenant cap holds across the fleet (default: one process's concurrency): the one
        # tenant here may fill every process, as in an unlimited fleet
        EXECUTION_TENANT_CONCURRENCY=str(args.concurrency * processes),
        DATABASE_POOL_SIZE=str(args.pool),
        HTTP_ALLOWLIST=f"127.0.0.1:{args.target_port}",
        SHUTDOWN_GRACE_MS="5000",
    )
    proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once; waits are bounded
        [sys.executable, "-m", "conveyor.cli", "worker", "--processes", str(processes)],
        env={**os.environ, **extra},
    )
    try:
        await wait_heartbeats(seed, processes, proc)
        await asyncio.sleep(0.5)  # let the pools settle; not measured
        meters.fleet_pid = proc.pid
        with Steal() as steal:
            before = await meters.sample()
            await queue.resume()
            deadline = time.monotonic() + 120
            while (await tenant_done(seed, tenant))[0] < n:
                if proc.poll() is not None:
                    raise RuntimeError(f"the fleet exited with {proc.returncode}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{kind} x{processes}: not done within 120 s")
                await asyncio.sleep(0.1)
            after = await meters.sample()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
    per_s = n / await tenant_span(seed, tenant)
    result = compare(kind, processes, n, per_s, before, after)
    result.steal_pct = steal.pct
    return result


# --- the report --------------------------------------------------------------------------------
def show(r: Result) -> None:
    c, u = r.cores, r.us_per_execution
    print(
        f"  {r.workflow:<14} x{r.processes}: {r.per_s:7.0f} executions/s | cores used: workers "
        f"{c['workers']:.2f}, Redis {c['redis']:.2f}, PostgreSQL {c['postgres']:.2f}, target "
        f"{c['target']:.2f}, machine {c['machine']:.2f} of {CORES} (not this run: {c['others']:.2f}) | CPU per execution: workers "
        f"{u['workers']} us, Redis {u['redis']} us, PostgreSQL {u['postgres']} us, all {u['all']}"
        f" us | steal {r.steal_pct}%",
        flush=True,
    )


def ceiling(results: list[Result]) -> str:
    """The resource closest to saturation in the largest run (the last one)."""
    top = max(results, key=lambda r: r.processes)
    c = top.cores
    shares = {
        "Redis (one core)": c["redis"] / 1.0,
        f"PostgreSQL ({CORES} cores)": c["postgres"] / CORES,
        f"this machine's {CORES} cores": c["machine"] / CORES,
    }
    name, share = max(shares.items(), key=lambda kv: kv[1])
    return (
        f"{name}: {share:.0%} busy at {top.processes} processes (workers {c['workers']:.2f} "
        f"cores, PostgreSQL {c['postgres']:.2f}, Redis {c['redis']:.2f}, target "
        f"{c['target']:.2f}, whole machine {c['machine']:.2f} of {CORES}, of which {c['others']:.2f} "
        "not this run's)"
    )


async def main(args: argparse.Namespace) -> dict[str, Any]:
    target = subprocess.Popen(  # noqa: ASYNC220 - returns at once
        [sys.executable, os.path.join(HERE, "scaling.py"), "target", str(args.target_port)]
    )
    out: dict[str, Any] = {}
    try:
        async with private_redis() as port:
            common.REDIS_PORT = port  # _exec_common reads it at call time
            r = aioredis.Redis(port=port)
            admin = await asyncpg.connect(common.ADMIN_DSN)
            try:
                for kind, n in (("noop", args.noop), ("http+transform", args.http)):
                    results: list[Result] = []
                    async with bench_env() as env, seeded(env) as seed:
                        db = env.url.rsplit("/", 1)[1]
                        meters = Meters(r, admin, db, target.pid)
                        for processes in COUNTS:
                            results.append(
                                await one_run(env, seed, meters, kind, processes, n, args)
                            )
                            show(results[-1])
                    key = "" if kind == "noop" else "http_"
                    base = results[0].per_s
                    for res in results:
                        out[f"{key}per_s_{res.processes}"] = round(res.per_s, 1)
                        out[f"{key}efficiency_{res.processes}"] = round(
                            res.per_s / (res.processes * base), 2
                        )
                        out[f"{key}cpu_us_per_execution_{res.processes}"] = res.us_per_execution
                        out[f"{key}cores_{res.processes}"] = res.cores
                    out[f"{key}ceiling"] = ceiling(results)
                    # The capacity model: executions/s one core of each component sustains, from
                    # its CPU per execution (median over the runs: least exposed to one run's noise)
                    for part in ("workers", "redis", "postgres"):
                        us = sorted(res.us_per_execution[part] for res in results)[1]
                        out[f"{key}per_core_{part}"] = round(1e6 / max(us, 1))
                    print(
                        f"  {kind}: executions/s one core sustains — worker "
                        f"{out[f'{key}per_core_workers']}, Redis {out[f'{key}per_core_redis']}, "
                        f"PostgreSQL {out[f'{key}per_core_postgres']}",
                        flush=True,
                    )
                    gains = [
                        f"{b.processes - a.processes} more: +{(b.per_s - a.per_s) / a.per_s:.0%}"
                        for a, b in itertools.pairwise(results)
                    ]
                    print(f"  {kind}: efficiency per added process: {'; '.join(gains)}")
                    print(f"  {kind}: ceiling — {out[f'{key}ceiling']}", flush=True)
            finally:
                await admin.close()
                await r.aclose()
    finally:
        target.terminate()
        target.wait(timeout=10)
    out["cores"] = CORES
    out["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return out


if __name__ == "__main__" and sys.argv[1:2] == ["target"]:
    uvloop.run(_target_main(int(sys.argv[2])))
elif __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--noop", type=int, default=5000, help="noop executions per run")
    parser.add_argument("--http", type=int, default=2000, help="http+transform executions per run")
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--pool", type=int, default=8, help="DATABASE_POOL_SIZE per process")
    parser.add_argument("--target-port", type=int, default=0)
    cli = parser.parse_args()
    if not cli.target_port:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            cli.target_port = int(s.getsockname()[1])
    started = time.monotonic()
    report = uvloop.run(main(cli))
    report["run_s"] = round(time.monotonic() - started, 1)
    print(json.dumps(report))
