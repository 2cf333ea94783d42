"""Enqueue-to-start latency on an idle worker at a steady rate (default 100 executions/s).

Conveyor: executions of a one-step ``noop`` workflow are inserted first, then dispatched one
by one on a fixed schedule through :class:`ExecutionDispatcher`; latency = the execution's
``started_at`` (set by the engine when it claims it) minus the wall time just before
``enqueue()`` was called (so it includes the dispatcher's own round trips).

Baseline in the same run: raw ``bullmq`` — the same schedule of ``Queue.add`` calls to a raw
``bullmq.Worker`` process, latency = processor start minus the time before ``add()``.

    .venv/bin/python bench/latency.py [--rate 100] [--seconds 10] [--concurrency 10]

Last line: JSON with ``p50_ms``, ``p99_ms`` (Conveyor) and ``raw_p50_ms``, ``raw_p99_ms``, and
``steal_pct``: the CPU time the hypervisor took from this VM during Conveyor's run (tails follow
it; see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import time
import uuid
from collections.abc import Awaitable, Callable

import uvloop

from _exec_common import (
    Steal,
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


async def paced(n: int, rate: float, send: Callable[[int], Awaitable[None]]) -> None:
    """Call ``send(i)`` for i in range(n) on a fixed schedule of ``rate`` per second.

    The collector is paused meanwhile so that a collection in *this* process (between taking
    the send time and sending) is not counted as the worker's latency.
    """
    gc.collect()
    gc.disable()
    try:
        t0 = time.perf_counter()
        for i in range(n):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            await send(i)
    finally:
        gc.enable()


async def run_raw(n: int, rate: float, concurrency: int) -> list[float]:
    prefix = f"wbenchraw{uuid.uuid4().hex[:8]}"
    queue = raw_queue(prefix)
    try:
        async with raw_worker(prefix, concurrency, n) as proc:
            await raw_ready(prefix)
            await asyncio.sleep(0.5)

            async def send(i: int) -> None:
                job = raw_job(i, t_ms=time.time() * 1000)
                await queue.add(job["name"], job["data"], job["opts"])

            await paced(n, rate, send)
            result = await raw_result(prefix, proc, timeout_s=60)
        return list(result["latencies"])
    finally:
        await queue.close()
        await delete_prefix(prefix)


async def run_conveyor(n: int, rate: float, concurrency: int) -> list[float]:
    async with bench_env() as env, seeded(env) as seed:
        tenant = await seed.tenant("latency")
        ids = await seed.insert(tenant, n)
        sent: dict[str, float] = {}
        async with conveyor_worker(env, EXECUTION_WORKER_CONCURRENCY=str(concurrency)) as proc:
            await wait_worker_ready(env, proc)
            await asyncio.sleep(0.5)

            async def send(i: int) -> None:
                sent[ids[i]] = time.time()
                await seed.dispatcher.enqueue(seed.payload(tenant, ids[i]))

            await paced(n, rate, send)
            await seed.wait_succeeded(n, timeout_s=60, proc=proc)
        started = await seed.started_at(ids)
        return [(started[i] - sent[i]) * 1000 for i in ids]


async def main(args: argparse.Namespace) -> dict[str, float]:
    n = int(args.rate * args.seconds)
    with Steal() as raw_steal:
        raw = await run_raw(n, args.rate, args.concurrency)
    print(f"raw bullmq : {summary(raw)}; CPU steal {raw_steal.pct}%", flush=True)
    with Steal() as steal:
        ours = await run_conveyor(n, args.rate, args.concurrency)
    print(f"conveyor   : {summary(ours)}; CPU steal {steal.pct}%", flush=True)
    p50, p99 = percentile(ours, 50), percentile(ours, 99)
    raw50, raw99 = percentile(raw, 50), percentile(raw, 99)
    print(
        f"{n} executions at {args.rate:.0f}/s: conveyor p99 {p99:.2f} ms vs raw bullmq p99 "
        f"{raw99:.2f} ms (ratio {p99 / raw99:.1f}x; target p99 <= 10 ms)"
    )
    return {
        "p50_ms": round(p50, 3),
        "p99_ms": round(p99, 3),
        "raw_p50_ms": round(raw50, 3),
        "raw_p99_ms": round(raw99, 3),
        "steal_pct": steal.pct,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=100.0)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=10)
    print(json.dumps(uvloop.run(main(parser.parse_args()))))
