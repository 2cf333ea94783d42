"""Tenant fairness under a flood: tenant A's backlog of 10,000, tenant B's 20 spaced executions.

Three runs, same worker settings (``EXECUTION_WORKER_CONCURRENCY``, default 16):

1. **single tenant** — A's 10,000 noop executions alone: the drain rate (executions/s).
2. **A + B** — A's 10,000 are enqueued, the worker starts draining them, then B submits 20
   executions spaced evenly over the drain; B's enqueue-to-start latency (``started_at`` minus
   the time before ``enqueue()``) and the total drain rate. ``throughput_ratio`` = run 2 / run 1.
3. **raw bullmq (FIFO) baseline** — the same shape through a raw ``bullmq`` worker process
   without Conveyor's priorities: B's jobs wait behind A's backlog.

    .venv/bin/python bench/fairness.py [--backlog 10000] [--b-jobs 20] [--concurrency 16]
        [--rounds 1]

Why 16: with no-op steps the worker process is CPU-bound; beyond ~16 concurrent executions
throughput does not grow, but every fetched job waits longer for its turn on the saturated
event loop, and that in-process wait is what B's latency measures once its job was fetched
(at 50: B p99 ~100 ms for the same throughput). Steps that wait on I/O are what a higher
concurrency is for.

Last line: JSON with ``b_p50_ms``, ``b_p99_ms``, ``throughput_ratio`` (and ``raw_b_p50_ms``,
``raw_b_p99_ms``, ``a_drain_per_s``, ``single_tenant_per_s``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
import uuid
from typing import Any

import uvloop

from _exec_common import (
    bench_env,
    conveyor_worker,
    delete_prefix,
    percentile,
    raw_job,
    raw_queue,
    raw_ready,
    raw_result,
    raw_worker,
    seeded,
    summary,
    wait_worker_ready,
)


def worker_env(concurrency: int) -> dict[str, str]:
    return {
        "EXECUTION_WORKER_CONCURRENCY": str(concurrency),
        "DATABASE_POOL_SIZE": str(min(concurrency, 20)),
    }


async def single_tenant(backlog: int, concurrency: int) -> float:
    async with bench_env() as env, seeded(env) as seed:
        a = await seed.tenant("a")
        ids = await seed.insert(a, backlog)
        await seed.dispatch(a, ids)
        async with conveyor_worker(env, **worker_env(concurrency)) as proc:
            await seed.wait_succeeded(backlog, timeout_s=max(120.0, backlog / 50), proc=proc)
        first, last = await seed.span_s()
        return backlog / (last - first)


async def with_light_tenant(
    backlog: int, b_jobs: int, concurrency: int, expected_rate: float
) -> tuple[list[float], float, float]:
    """Returns (B latencies ms, total rate, A's drain rate)."""
    async with bench_env() as env, seeded(env) as seed:
        a, b = await seed.tenant("a"), await seed.tenant("b")
        a_ids = await seed.insert(a, backlog)
        b_ids = await seed.insert(b, b_jobs)
        await seed.dispatch(a, a_ids)
        sent: dict[str, float] = {}
        # spread B's submissions over ~60% of the expected drain time
        spacing = 0.6 * backlog / expected_rate / b_jobs
        async with conveyor_worker(env, **worker_env(concurrency)) as proc:
            await wait_worker_ready(env, proc)
            await asyncio.sleep(spacing)
            for execution_id in b_ids:
                sent[execution_id] = time.time()
                await seed.dispatcher.enqueue(seed.payload(b, execution_id))
                await asyncio.sleep(spacing)
            total = backlog + b_jobs
            await seed.wait_succeeded(total, timeout_s=max(120.0, backlog / 50), proc=proc)
        started = await seed.started_at(b_ids)
        a_first, a_last = await seed.span_s(a_ids)
        latencies = [(started[i] - sent[i]) * 1000 for i in b_ids]
        # total throughput while A's backlog drained: A's executions plus B's run meanwhile
        b_within = sum(1 for i in b_ids if a_first <= started[i] <= a_last)
        window = a_last - a_first
        return latencies, (backlog + b_within) / window, backlog / window


async def raw_fifo(
    backlog: int, b_jobs: int, concurrency: int, expected_rate: float
) -> list[float]:
    prefix = f"wbenchraw{uuid.uuid4().hex[:8]}"
    queue = raw_queue(prefix)
    try:
        for i in range(0, backlog, 1000):
            await queue.addBulk([raw_job(j, tenant="a") for j in range(i, min(i + 1000, backlog))])
        spacing = 0.6 * backlog / expected_rate / b_jobs
        async with raw_worker(prefix, concurrency, backlog + b_jobs) as proc:
            await raw_ready(prefix)
            await asyncio.sleep(spacing)
            for i in range(b_jobs):
                job: dict[str, Any] = raw_job(backlog + i, t_ms=time.time() * 1000, tenant="b")
                await queue.add(job["name"], job["data"], job["opts"])
                await asyncio.sleep(spacing)
            result = await raw_result(prefix, proc, timeout_s=max(120.0, backlog / 50))
        return list(result["latencies"])
    finally:
        await queue.close()
        await delete_prefix(prefix)


async def main(args: argparse.Namespace) -> dict[str, float]:
    singles: list[float] = []
    runs: list[tuple[list[float], float, float]] = []
    for r in range(args.rounds):  # alternate, so a noisy neighbour hurts both alike
        singles.append(await single_tenant(args.backlog, args.concurrency))
        print(f"[{r + 1}] single tenant     : {singles[-1]:8.0f} executions/s", flush=True)
        runs.append(
            await with_light_tenant(args.backlog, args.b_jobs, args.concurrency, singles[-1])
        )
        print(f"[{r + 1}] A + B             : {runs[-1][1]:8.0f} executions/s while A drained")
        print(f"[{r + 1}] B enqueue->start  : {summary(runs[-1][0])}", flush=True)
    single = max(singles)
    b_lat, total, a_rate = max(runs, key=lambda run: run[1])
    raw = await raw_fifo(args.backlog, args.b_jobs, args.concurrency, single)
    print(f"raw bullmq (FIFO) : B enqueue->start {summary(raw)}", flush=True)
    ratio = total / single
    p50, p99 = percentile(b_lat, 50), percentile(b_lat, 99)
    print(
        f"B p99 {p99:.1f} ms (target <= 100 ms; raw FIFO {percentile(raw, 99):.0f} ms), "
        f"throughput ratio {ratio:.2f} (target >= 0.9)"
    )
    return {
        "b_p50_ms": round(p50, 2),
        "b_p99_ms": round(p99, 2),
        "throughput_ratio": round(ratio, 3),
        "raw_b_p50_ms": round(percentile(raw, 50), 1),
        "raw_b_p99_ms": round(percentile(raw, 99), 1),
        "a_drain_per_s": round(a_rate, 1),
        "single_tenant_per_s": round(single, 1),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backlog", type=int, default=10_000)
    parser.add_argument("--b-jobs", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=1)
    print(json.dumps(uvloop.run(main(parser.parse_args()))))
