"""A realistic five-step workflow through one ``conveyor worker`` vs a raw ``bullmq`` worker (with
``httpx``, and with ``aiohttp``) making the same two HTTP calls with no durability at all (issue #16).

The workflow: ``http`` GET an order → ``transform`` (JMESPath) → ``condition`` → ``http`` POST a
templated body → ``noop``, against a local target server (asyncio, HTTP/1.1 keep-alive, run in
its own process so its CPU is shown and is not the limit). N executions (default 5,000) are
inserted in a throwaway database and enqueued through the dispatcher; one worker process at
``EXECUTION_WORKER_CONCURRENCY`` 50 drains them. The clock runs from the first execution's
start to the last one's finish (read from the database).

Baseline in the same run: a raw ``bullmq.Worker`` process (same Redis, same concurrency, same
job options, uvloop) whose processor GETs the order with a shared ``httpx.AsyncClient``,
reshapes it in Python, and POSTs the same body — what a user would write without Conveyor; the
issue's target (``ratio``) is against it. A second baseline does the same with a shared
``aiohttp.ClientSession`` — the fastest asyncio HTTP client here and the one Conveyor's steps
use — so ``ratio_aiohttp`` is Conveyor's own cost with the HTTP client's taken out.

CPU per execution: the worker's user+system time over the run; PostgreSQL's is the sum of every
``postgres`` process's CPU time over the same span (other databases on the machine count too:
run it on a quiet machine).

    .venv/bin/python bench/workflow_throughput.py [--executions 5000] [--concurrency 50]
        [--rounds 1]

Last line: JSON with ``executions_per_s``, ``raw_per_s``, ``ratio``, ``cpu_ms_per_execution``,
``pg_cpu_ms_per_execution`` (``raw_*`` and ``ratio`` against raw + httpx), and
``raw_aiohttp_per_s``, ``ratio_aiohttp``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import psutil
import redis.asyncio as aioredis
import uvloop

from _exec_common import (
    QUEUE,
    REDIS_HOST,
    REDIS_PORT,
    RssSampler,
    ServiceCpu,
    bench_env,
    conveyor_worker,
    delete_prefix,
    raw_job,
    raw_queue,
    raw_result,
    seeded,
)
from conveyor.store import utcnow
from conveyor.store.schema import executions
from conveyor.store.triggers import insert_values, new_execution

HERE = os.path.dirname(os.path.abspath(__file__))


def workflow(port: int) -> dict[str, Any]:
    base = f"http://127.0.0.1:{port}"
    return {
        "name": "order-sync",
        "steps": [
            {
                "id": "fetch",
                "type": "http",
                "url": base + "/orders/{{ input.orderId }}",
                "select": "body",
            },
            {
                "id": "summary",
                "type": "transform",
                "expression": "{orderId: steps.fetch.id, total: steps.fetch.total, "
                "email: steps.fetch.customer.email}",
            },
            {
                "id": "large",
                "type": "condition",
                "expression": "steps.summary.total >= `100`",
                "then": "continue",
                "else": "end",
            },
            {
                "id": "notify",
                "type": "http",
                "method": "POST",
                "url": base + "/hooks/fulfilment",
                "headers": {"Idempotency-Key": "order-{{ steps.summary.orderId }}"},
                "body": {
                    "text": "Large order {{ steps.summary.orderId }}",
                    "order": "{{ steps.summary }}",
                },
                "select": "body",
            },
            {"id": "done", "type": "noop"},
        ],
    }


# --- the target server (its own process) -----------------------------------------------------
async def _serve_target(port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                length = 0
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    if name.lower() == "content-length":
                        length = int(value)
                if length:
                    await reader.readexactly(length)
                if method == "GET" and path.startswith("/orders/"):
                    order = path.rsplit("/", 1)[1]
                    body = json.dumps(
                        {
                            "id": int(order) if order.isdigit() else order,
                            "total": 150,
                            "customer": {"email": "ada@example.com"},
                        }
                    ).encode()
                else:
                    body = b'{"accepted":true}'
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
                    b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


@contextmanager
def target_server() -> Iterator[tuple[int, psutil.Process]]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    proc = subprocess.Popen([sys.executable, __file__, "target", str(port)])
    deadline = time.monotonic() + 10
    while True:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                break
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("target server did not start")
        time.sleep(0.05)
    try:
        yield port, psutil.Process(proc.pid)
    finally:
        proc.kill()
        proc.wait(timeout=10)


def _cpu(p: psutil.Process) -> float:
    t = p.cpu_times()
    return float(t.user + t.system)


# --- the raw baseline ------------------------------------------------------------------------
RAW_CLIENTS = ("httpx", "aiohttp")


class _RawClient:
    """The baseline's HTTP client: GET and POST JSON over one shared keep-alive pool."""

    def __init__(self, kind: str, port: int, concurrency: int) -> None:
        base = f"http://127.0.0.1:{port}"
        if kind == "aiohttp":
            import aiohttp

            connector = aiohttp.TCPConnector(limit=concurrency)
            self._aiohttp = aiohttp.ClientSession(base, connector=connector)
        else:
            import httpx

            limits = httpx.Limits(
                max_connections=concurrency, max_keepalive_connections=concurrency
            )
            self._httpx = httpx.AsyncClient(base_url=base, limits=limits, timeout=10)
        self.kind = kind

    async def get(self, path: str) -> Any:
        if self.kind == "aiohttp":
            async with self._aiohttp.get(path) as response:
                return await response.json()
        return (await self._httpx.get(path)).json()

    async def post(self, path: str, headers: dict[str, str], doc: Any) -> Any:
        if self.kind == "aiohttp":
            async with self._aiohttp.post(path, headers=headers, json=doc) as response:
                return await response.json()
        return (await self._httpx.post(path, headers=headers, json=doc)).json()

    async def close(self) -> None:
        if self.kind == "aiohttp":
            await self._aiohttp.close()
        else:
            await self._httpx.aclose()


async def _raw_http_worker_main(
    prefix: str, port: int, concurrency: int, expect: int, kind: str
) -> None:
    import bullmq

    from conveyor.queue.payloads import DEFAULT_JOB_OPTIONS

    client = aioredis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    http = _RawClient(kind, port, concurrency)
    done = 0
    first = 0.0
    finished = asyncio.Event()

    async def process(job: Any, token: str) -> Any:
        nonlocal done, first
        if not first:
            first = time.time()
        order_id = job.data["i"]
        fetched = await http.get(f"/orders/{order_id}")
        summary = {
            "orderId": fetched["id"],
            "total": fetched["total"],
            "email": fetched["customer"]["email"],
        }
        result = None
        if summary["total"] >= 100:
            result = await http.post(
                "/hooks/fulfilment",
                {"Idempotency-Key": f"order-{summary['orderId']}"},
                {"text": f"Large order {summary['orderId']}", "order": summary},
            )
        done += 1
        if done >= expect:
            finished.set()
        return result

    worker = bullmq.Worker(
        QUEUE,
        process,
        {
            "connection": {"host": REDIS_HOST, "port": REDIS_PORT},
            "prefix": prefix,
            "concurrency": concurrency,
            "autorun": False,
            "removeOnComplete": DEFAULT_JOB_OPTIONS["removeOnComplete"],
        },
    )
    task = asyncio.ensure_future(worker.run())
    await finished.wait()
    last = time.time()
    await client.set(f"{prefix}:raw:result", json.dumps({"first": first, "last": last, "n": done}))
    await worker.close()
    await task
    await http.close()
    await client.aclose()


@asynccontextmanager
async def raw_http_worker(
    prefix: str, port: int, concurrency: int, n: int, kind: str
) -> AsyncIterator[subprocess.Popen[bytes]]:
    argv = [sys.executable, __file__, "raw-worker", prefix, str(port), str(concurrency), str(n)]
    proc = subprocess.Popen([*argv, kind])  # noqa: ASYNC220 - returns at once; waits are bounded
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


async def run_raw(
    n: int, concurrency: int, port: int, target: psutil.Process, kind: str
) -> dict[str, float]:
    prefix = f"wfbenchraw{uuid.uuid4().hex[:8]}"
    queue = raw_queue(prefix)
    try:
        for i in range(0, n, 1000):
            jobs = []
            for j in range(i, min(i + 1000, n)):
                job = raw_job(j)
                job["data"]["i"] = j
                jobs.append(job)
            await queue.addBulk(jobs)
        target0 = _cpu(target)
        async with raw_http_worker(prefix, port, concurrency, n, kind) as proc:
            with RssSampler(proc.pid) as usage:
                result = await raw_result(prefix, proc, timeout_s=max(120.0, n / 20))
        per_s = float(result["n"]) / (result["last"] - result["first"])
        return {
            "per_s": per_s,
            "cpu_ms": usage.cpu_s / n * 1e3,
            "target_cpu_ms": (_cpu(target) - target0) / n * 1e3,
        }
    finally:
        await queue.close()
        await delete_prefix(prefix)


async def run_conveyor(
    n: int, concurrency: int, port: int, target: psutil.Process
) -> dict[str, float]:
    async with bench_env() as env, seeded(env) as seed:
        tenant = await seed.store.tenants.create("bench")
        wf = await seed.store.workflows.create(tenant.id, workflow(port))
        seed.workflows[tenant.id] = wf.id
        now = utcnow()
        rows = [
            new_execution(
                tenant_id=tenant.id,
                workflow_id=wf.id,
                version=1,
                region="us",
                input={"orderId": i},
                triggered_by="api",
                now=now,
            )
            for i in range(n)
        ]
        async with seed.store.engine.begin() as conn:
            for i in range(0, n, 2000):
                await conn.execute(
                    executions.insert(), [insert_values(r) for r in rows[i : i + 2000]]
                )
        ids = [r.id for r in rows]
        await seed.dispatch(tenant.id, ids)
        extra = {
            "EXECUTION_WORKER_CONCURRENCY": str(concurrency),
            "DATABASE_POOL_SIZE": str(min(concurrency, 20)),
            "HTTP_ALLOWLIST": f"127.0.0.1:{port}",
        }
        target0 = _cpu(target)
        with ServiceCpu() as services:
            began = time.time()
            async with conveyor_worker(env, **extra) as proc:
                with RssSampler(proc.pid) as usage:
                    await seed.wait_succeeded(n, timeout_s=max(180.0, n / 20), proc=proc)
                services.sample()  # the worker's backends still there
                pg_cpu = services.within(began, time.time())["postgres"]
        first, last = await seed.span_s()
        return {
            "per_s": n / (last - first),
            "cpu_ms": usage.cpu_s / n * 1e3,
            "pg_cpu_ms": pg_cpu / n * 1e3,
            "target_cpu_ms": (_cpu(target) - target0) / n * 1e3,
            "peak_rss_mb": usage.peak_mb,
        }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    raw: dict[str, list[dict[str, float]]] = {kind: [] for kind in RAW_CLIENTS}
    ours: list[dict[str, float]] = []
    with target_server() as (port, target):
        for r in range(args.rounds):
            for kind in RAW_CLIENTS:
                raw[kind].append(
                    await run_raw(args.executions, args.concurrency, port, target, kind)
                )
                print(
                    f"[round {r + 1}] raw bullmq+{kind:7}: {raw[kind][-1]['per_s']:7.0f} jobs/s, "
                    f"{raw[kind][-1]['cpu_ms']:.2f} ms CPU/job, "
                    f"target {raw[kind][-1]['target_cpu_ms']:.2f} ms",
                    flush=True,
                )
            ours.append(await run_conveyor(args.executions, args.concurrency, port, target))
            print(
                f"[round {r + 1}] conveyor          : {ours[-1]['per_s']:7.0f} executions/s, "
                f"{ours[-1]['cpu_ms']:.2f} ms CPU/execution (start-up included), "
                f"PostgreSQL {ours[-1]['pg_cpu_ms']:.2f} ms, target "
                f"{ours[-1]['target_cpu_ms']:.2f} ms, peak RSS {ours[-1]['peak_rss_mb']:.0f} MB",
                flush=True,
            )
    best_raw = {kind: max(runs, key=lambda x: x["per_s"]) for kind, runs in raw.items()}
    best = max(ours, key=lambda x: x["per_s"])
    ratio = {kind: best["per_s"] / b["per_s"] for kind, b in best_raw.items()}
    print(
        f"{args.executions} five-step executions (http GET, transform, condition, http POST, "
        f"noop), concurrency {args.concurrency}, best of {args.rounds}: conveyor "
        f"{best['per_s']:.0f}/s vs raw bullmq+httpx {best_raw['httpx']['per_s']:.0f}/s, ratio "
        f"{ratio['httpx']:.2f} (target >= 1.0); vs raw bullmq+aiohttp "
        f"{best_raw['aiohttp']['per_s']:.0f}/s, ratio {ratio['aiohttp']:.2f}"
    )
    return {
        "executions_per_s": round(best["per_s"], 1),
        "raw_per_s": round(best_raw["httpx"]["per_s"], 1),
        "ratio": round(ratio["httpx"], 3),
        "cpu_ms_per_execution": round(best["cpu_ms"], 2),
        "pg_cpu_ms_per_execution": round(best["pg_cpu_ms"], 2),
        "raw_cpu_ms_per_job": round(best_raw["httpx"]["cpu_ms"], 2),
        "raw_aiohttp_per_s": round(best_raw["aiohttp"]["per_s"], 1),
        "ratio_aiohttp": round(ratio["aiohttp"], 3),
        "raw_aiohttp_cpu_ms_per_job": round(best_raw["aiohttp"]["cpu_ms"], 2),
        "peak_rss_mb": round(max(o["peak_rss_mb"] for o in ours), 1),
    }


if __name__ == "__main__":
    if sys.argv[1:2] == ["target"]:
        uvloop.run(_serve_target(int(sys.argv[2])))
    elif sys.argv[1:2] == ["raw-worker"]:
        _p, _port, _c, _n, _kind = sys.argv[2:7]
        uvloop.run(_raw_http_worker_main(_p, int(_port), int(_c), int(_n), _kind))
    else:
        parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
        parser.add_argument("--executions", type=int, default=5_000)
        parser.add_argument("--concurrency", type=int, default=50)
        parser.add_argument("--rounds", type=int, default=1)
        print(json.dumps(uvloop.run(main(parser.parse_args()))))
