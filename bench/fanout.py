"""A ``foreach`` of N items (default 1,000) at concurrency C (default 10) through one
``conveyor worker``, against the same N items run as independent executions.

Each item runs two steps: an ``http`` GET of a local target server (asyncio, keep-alive, its own
process: the one from ``workflow_throughput.py``) with a templated URL, then a ``transform``.
Conveyor runs them as the ``foreach`` step's child executions — created C at a time by the
parent as children end, each child's end stored as an event that wakes the parent (see
``conveyor.engine``, 4d) — then joins their outputs in item order.

Baseline in the same run: the same two steps as a workflow of their own, N executions
inserted and enqueued at once, drained by the same worker at concurrency C: what the items cost
without the fan-out (no parent, no events, no join). ``ratio`` = foreach items/s ÷ baseline
executions/s; ``cpu_ms_per_item`` is the worker's CPU per item (the parent's runs included).

    .venv/bin/python bench/fanout.py [--items 1000] [--concurrency 10] [--rounds 1]

Last line: JSON with ``items_per_s``, ``baseline_per_s``, ``ratio``, ``cpu_ms_per_item``,
``baseline_cpu_ms``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

import uvloop
from sqlalchemy import select

from _exec_common import RssSampler, bench_env, conveyor_worker, seeded, wait_worker_ready
from conveyor.store.schema import executions
from workflow_throughput import target_server


def item_steps(port: int) -> list[dict[str, Any]]:
    return [
        {
            "id": "fetch",
            "type": "http",
            "url": f"http://127.0.0.1:{port}/orders/{{{{ input.item }}}}",
            "select": "body",
        },
        {
            "id": "total",
            "type": "transform",
            "expression": "{id: steps.fetch.id, total: steps.fetch.total}",
        },
    ]


async def _status(seed: Any, execution_id: str) -> str:
    async with seed.store.engine.connect() as conn:
        query = select(executions.c.status).where(executions.c.id == execution_id)
        return str((await conn.execute(query)).scalar_one())


async def run_foreach(n: int, concurrency: int, port: int) -> dict[str, float]:
    async with bench_env() as env, seeded(env) as seed:
        steps = [
            {
                "id": "each",
                "type": "foreach",
                "items": "input.items",
                "concurrency": concurrency,
                "input": {"item": "{{ item }}"},
                "steps": item_steps(port),
            }
        ]
        tenant = await seed.tenant("fanout", steps)
        [parent] = await seed.insert(tenant, 1)
        async with seed.store.engine.begin() as conn:
            await conn.execute(
                executions.update()
                .where(executions.c.id == parent)
                .values(input={"items": list(range(n))})
            )
        extra = {
            "EXECUTION_WORKER_CONCURRENCY": str(concurrency + 1),
            "HTTP_ALLOWLIST": f"127.0.0.1:{port}",
            "WORKFLOW_MAX_FANOUT": str(max(n, 1000)),
        }
        async with conveyor_worker(env, **extra) as proc:
            await wait_worker_ready(env, proc)
            with RssSampler(proc.pid) as usage:
                started = time.monotonic()
                await seed.dispatch(tenant, [parent])
                while (status := await _status(seed, parent)) not in ("succeeded", "failed"):
                    if proc.poll() is not None or time.monotonic() - started > max(300, n / 5):
                        raise RuntimeError(f"the foreach did not end (worker {proc.poll()})")
                    await asyncio.sleep(0.05)
                elapsed = time.monotonic() - started
        if status != "succeeded":
            raise RuntimeError(f"the foreach {status}")
        async with seed.store.engine.connect() as conn:
            output = (
                await conn.execute(select(executions.c.output).where(executions.c.id == parent))
            ).scalar_one()
        if [o["id"] for o in output] != list(range(n)):
            raise RuntimeError("the foreach's outputs are not the items in order")
        return {"per_s": n / elapsed, "cpu_ms": usage.cpu_s / n * 1e3}


async def run_independent(n: int, concurrency: int, port: int) -> dict[str, float]:
    async with bench_env() as env, seeded(env) as seed:
        tenant = await seed.tenant("items", item_steps(port))
        ids = await seed.insert(tenant, n)
        async with seed.store.engine.begin() as conn:
            for i in range(0, n, 1000):
                chunk = ids[i : i + 1000]
                await conn.execute(
                    executions.update().where(executions.c.id.in_(chunk)).values(input={"item": 7})
                )
        extra = {
            "EXECUTION_WORKER_CONCURRENCY": str(concurrency),
            "HTTP_ALLOWLIST": f"127.0.0.1:{port}",
        }
        async with conveyor_worker(env, **extra) as proc:
            await wait_worker_ready(env, proc)
            with RssSampler(proc.pid) as usage:
                started = time.monotonic()
                await seed.dispatch(tenant, ids)
                await seed.wait_succeeded(n, timeout_s=max(300.0, n / 5), proc=proc)
                elapsed = time.monotonic() - started
        return {"per_s": n / elapsed, "cpu_ms": usage.cpu_s / n * 1e3}


async def main(args: argparse.Namespace) -> dict[str, float]:
    ours: list[dict[str, float]] = []
    base: list[dict[str, float]] = []
    with target_server() as (port, _target):
        for r in range(args.rounds):
            base.append(await run_independent(args.items, args.concurrency, port))
            print(
                f"[round {r + 1}] independent executions: {base[-1]['per_s']:6.0f}/s, "
                f"worker CPU {base[-1]['cpu_ms']:.2f} ms each",
                flush=True,
            )
            ours.append(await run_foreach(args.items, args.concurrency, port))
            print(
                f"[round {r + 1}] foreach items         : {ours[-1]['per_s']:6.0f}/s, "
                f"worker CPU {ours[-1]['cpu_ms']:.2f} ms each (the parent's runs included)",
                flush=True,
            )
    best, best_base = max(ours, key=lambda x: x["per_s"]), max(base, key=lambda x: x["per_s"])
    ratio = best["per_s"] / best_base["per_s"]
    print(
        f"foreach of {args.items} items (http GET + transform) at concurrency "
        f"{args.concurrency}, best of {args.rounds}: {best['per_s']:.0f} items/s vs "
        f"{best_base['per_s']:.0f} independent executions/s, ratio {ratio:.2f}; worker CPU "
        f"{best['cpu_ms']:.2f} vs {best_base['cpu_ms']:.2f} ms"
    )
    return {
        "items_per_s": round(best["per_s"], 1),
        "baseline_per_s": round(best_base["per_s"], 1),
        "ratio": round(ratio, 3),
        "cpu_ms_per_item": round(best["cpu_ms"], 2),
        "baseline_cpu_ms": round(best_base["cpu_ms"], 2),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--items", type=int, default=1_000)
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=1)
    print(json.dumps(uvloop.run(main(parser.parse_args()))))
