"""End-to-end execution throughput of one ``conveyor worker`` process vs raw ``bullmq``.

N executions (default 20,000) of a one-step ``noop`` workflow are inserted in a throwaway
Postgres database and enqueued through the dispatcher (fairness priorities included); then one
worker process (``EXECUTION_WORKER_CONCURRENCY``, default 50) drains them. The clock runs from
the first execution's start to the last one's finish (read from the database), so process
start-up is excluded. Peak RSS of the worker is sampled every 50 ms.

Baseline in the same run: N no-op jobs through a raw ``bullmq.Worker`` process (same Redis,
same concurrency, same job options, uvloop too), timed from the first job to the last.

    .venv/bin/python bench/execution_throughput.py [--executions 20000] [--concurrency 50]

Also a five-step pure workflow (``transform`` x4 + ``noop``: one write after the claim, the pure
steps riding with the last) against the same raw baseline (``ratio_5step``).

Last line: JSON with ``executions_per_s``, ``raw_jobs_per_s``, ``ratio``, ``ratio_5step``,
``cpu_us_per_execution`` (the worker's CPU over the run, start-up included, per execution),
``steady_cpu_us_per_execution`` and ``steady_cpu_us_5step`` (from the first execution's start
only: start-up, ~1.6 s of CPU, is a third of the total at 5,000 executions), ``peak_rss_mb``.
"""

from __future__ import annotations

import argparse
import json
import uuid

import uvloop

from _exec_common import (
    RssSampler,
    bench_env,
    conveyor_worker,
    delete_prefix,
    raw_job,
    raw_queue,
    raw_result,
    raw_worker,
    seeded,
)


async def run_raw(n: int, concurrency: int) -> float:
    prefix = f"wbenchraw{uuid.uuid4().hex[:8]}"
    queue = raw_queue(prefix)
    try:
        for i in range(0, n, 1000):
            await queue.addBulk([raw_job(j) for j in range(i, min(i + 1000, n))])
        async with raw_worker(prefix, concurrency, n) as proc:
            with RssSampler(proc.pid) as usage:
                result = await raw_result(prefix, proc, timeout_s=max(120.0, n / 100))
        print(f"  raw worker CPU: {usage.cpu_s / n * 1e6:.0f} us/job", flush=True)
        return float(result["n"]) / (result["last"] - result["first"])
    finally:
        await queue.close()
        await delete_prefix(prefix)


FIVE_PURE = [
    {"id": "a", "type": "transform", "expression": "{n: `1`, input: input}"},
    {"id": "b", "type": "transform", "expression": "{n: steps.a.n, tag: 'x'}"},
    {"id": "c", "type": "condition", "expression": "steps.b.n == `1`"},
    {"id": "d", "type": "transform", "expression": "[steps.a.n, steps.b.tag]"},
    {"id": "e", "type": "noop"},
]


async def run_conveyor(
    n: int, concurrency: int, steps: list[dict[str, object]] | None = None
) -> tuple[float, float, float, float]:
    """(executions/s, peak RSS MB, worker CPU us per execution, the same from the first
    execution's start)."""
    async with bench_env() as env, seeded(env) as seed:
        tenant = await seed.tenant("bench", steps)
        ids = await seed.insert(tenant, n)
        await seed.dispatch(tenant, ids)
        extra = {
            "EXECUTION_WORKER_CONCURRENCY": str(concurrency),
            "DATABASE_POOL_SIZE": str(min(concurrency, 20)),
        }
        async with conveyor_worker(env, **extra) as proc:
            with RssSampler(proc.pid) as rss:
                await seed.wait_succeeded(n, timeout_s=max(180.0, n / 50), proc=proc)
        cpu_us = rss.cpu_s / n * 1e6
        first, last = await seed.span_s()
        steady_us = rss.cpu_since(first) / n * 1e6
        print(
            f"  conveyor worker CPU: {cpu_us:.0f} us/execution (start-up included), "
            f"{steady_us:.0f} us from the first start",
            flush=True,
        )
        return n / (last - first), rss.peak_mb, cpu_us, steady_us


async def main(args: argparse.Namespace) -> dict[str, float]:
    raw: list[float] = []
    ours: list[tuple[float, float, float, float]] = []
    five: list[tuple[float, float, float, float]] = []
    for r in range(args.rounds):
        raw.append(await run_raw(args.executions, args.concurrency))
        print(f"[round {r + 1}] raw bullmq no-op jobs : {raw[-1]:8.0f} jobs/s", flush=True)
        ours.append(await run_conveyor(args.executions, args.concurrency))
        print(
            f"[round {r + 1}] conveyor executions   : {ours[-1][0]:8.0f} executions/s, "
            f"peak RSS {ours[-1][1]:.0f} MB",
            flush=True,
        )
        five.append(await run_conveyor(args.executions, args.concurrency, FIVE_PURE))
        print(
            f"[round {r + 1}] conveyor 5 pure steps : {five[-1][0]:8.0f} executions/s, "
            f"peak RSS {five[-1][1]:.0f} MB",
            flush=True,
        )
    best_raw = max(raw)
    best, peak, cpu_us, steady_us = max(ours)
    best5, _, _, steady5_us = max(five)
    ratio = best / best_raw
    print(
        f"{args.executions} noop executions, concurrency {args.concurrency}, best of "
        f"{args.rounds}: conveyor {best:.0f}/s vs raw bullmq {best_raw:.0f}/s, ratio "
        f"{ratio:.2f} (target >= 2.0); five pure steps {best5:.0f}/s, ratio "
        f"{best5 / best_raw:.2f} (target >= 1.5); peak RSS {peak:.0f} MB"
    )
    return {
        "executions_per_s": round(best, 1),
        "raw_jobs_per_s": round(best_raw, 1),
        "ratio": round(ratio, 3),
        "ratio_5step": round(best5 / best_raw, 3),
        "cpu_us_per_execution": round(cpu_us),
        "steady_cpu_us_per_execution": round(steady_us),
        "steady_cpu_us_5step": round(steady5_us),
        "peak_rss_mb": round(max(p for _, p, _, _ in ours + five), 1),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--executions", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=1)
    print(json.dumps(uvloop.run(main(parser.parse_args()))))
