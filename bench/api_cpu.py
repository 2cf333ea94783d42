"""The API's CPU per request for the list, detail and trigger routes, in process (no network,
no second process): what the application itself spends, with an optional cProfile.

Creates a throwaway database (``_exec_common.bench_env``), seeds ``--rows`` executions with
two step runs each through ``bench/scale.py``'s seeding SQL (one tenant's, 90 %), then drives
the real application (lifespan included) over ``httpx.ASGITransport``: ``--requests``
sequential requests per figure (first page, ``status=failed``, 100th page by cursor, detail,
trigger), each after a warm-up. Reported per figure: this process's CPU per request (the httpx
client's share included — the same on both sides of a comparison) and, with
``--profile FIGURE``, the top of a cProfile of that figure's requests.

    .venv/bin/python bench/api_cpu.py [--rows 20000] [--requests 300] [--profile list]

Last line: JSON ``{"rows": ..., "requests": ..., "cpu_ms": {figure: ms per request}}``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import httpx

from _exec_common import bench_env
from conveyor.api.app import create_app
from conveyor.api.context import open_context
from conveyor.store import asyncpg_dsn
from scale import SEED_SQL

ADMIN = {"Authorization": "Bearer bench-admin-token-0123456789"}
PAGE = 50


async def _setup(client: httpx.AsyncClient) -> tuple[dict[str, str], dict[str, str]]:
    async def tenant() -> tuple[str, dict[str, str], str]:
        r = await client.post("/api/admin/tenants", json={"name": "bench"}, headers=ADMIN)
        tid = r.json()["data"]["id"]
        r = await client.post(f"/api/admin/tenants/{tid}/api-keys", headers=ADMIN)
        auth = {"Authorization": f"Bearer {r.json()['data']['key']}"}
        doc = {"name": "bench", "steps": [{"id": "a", "type": "noop"}]}
        r = await client.post("/api/workflows", json=doc, headers=auth)
        return tid, auth, r.json()["data"]["id"]

    tid, auth, wf = await tenant()
    other, _, other_wf = await tenant()
    r = await client.post(
        "/api/workflows", json={"name": "second", "steps": [{"id": "a", "type": "noop"}]},
        headers=auth,
    )  # fmt: skip
    ids = {"tenant": tid, "workflow": wf, "other_tenant": other, "other_workflow": other_wf,
           "workflow2": r.json()["data"]["id"]}  # fmt: skip
    return auth, ids


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--profile", help="a figure to profile (list, failed, page100, ...)")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()

    async with bench_env() as env:
        settings = env.settings(ADMIN_TOKEN=ADMIN["Authorization"].split()[1])
        async with open_context(settings, heartbeat=False) as ctx:
            app = create_app(settings, context=ctx)
            async with app.router.lifespan_context(app):
                transport = httpx.ASGITransport(app=app)
                async with httpx.AsyncClient(transport=transport, base_url="http://api") as c:
                    out = await _measure(c, env.url, args)
    print(json.dumps(out))


async def _seed(url: str, ids: dict[str, str], rows: int) -> list[str]:
    """``rows`` executions as ``bench/scale.py`` seeds them; some of the tenant's ids."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        for lo in range(0, rows, 100_000):
            hi = min(rows, lo + 100_000) - 1
            await conn.execute(SEED_SQL, ids["tenant"], ids["workflow"], ids["other_tenant"],
                               ids["other_workflow"], ids["workflow2"], lo, hi)  # fmt: skip
        await conn.execute("VACUUM ANALYZE executions")
        await conn.execute("VACUUM ANALYZE step_runs")
        sample = [r["id"] for r in await conn.fetch(
            "SELECT id FROM executions WHERE tenant_id = $1 LIMIT 5000", ids["tenant"])]  # fmt: skip
    finally:
        await conn.close()
    return sample


async def _measure(c: httpx.AsyncClient, url: str, args: argparse.Namespace) -> dict[str, Any]:
    auth, ids = await _setup(c)
    sample = await _seed(url, ids, args.rows)
    detail_ids = random.Random(1).choices(sample, k=args.requests)

    async def get(path: str, params: dict[str, Any] | None = None) -> httpx.Response:
        r = await c.get(path, params=params, headers=auth)
        if r.status_code != 200:
            raise RuntimeError(f"{path}: {r.status_code} {r.text[:300]}")
        return r

    cursor = None
    for _ in range(99):
        doc = (await get("/api/executions", {"limit": PAGE, **({"cursor": cursor} if cursor
               else {})})).json()  # fmt: skip
        cursor = doc["data"]["nextCursor"]
    body = {"input": {"orderId": 1}}
    trig = f"/api/workflows/{ids['workflow']}/executions"

    async def trigger() -> None:
        r = await c.post(trig, json=body, headers=auth)
        if r.status_code != 202:
            raise RuntimeError(f"trigger: {r.status_code} {r.text[:300]}")

    detail_iter = iter(detail_ids * 3)
    figures: dict[str, Callable[[], Awaitable[Any]]] = {
        "list": lambda: get("/api/executions", {"limit": PAGE}),
        "failed": lambda: get("/api/executions", {"limit": PAGE, "status": "failed"}),
        "page100": lambda: get("/api/executions", {"limit": PAGE, "cursor": cursor}),
        "detail": lambda: get(f"/api/executions/{next(detail_iter)}"),
        "trigger": trigger,
    }
    cpu_ms: dict[str, float] = {}
    for name, fn in figures.items():
        for _ in range(20):  # warm-up
            await fn()
        profiler = cProfile.Profile() if args.profile == name else None
        c0 = time.process_time()
        if profiler:
            profiler.enable()
        for _ in range(args.requests):
            await fn()
        if profiler:
            profiler.disable()
        cpu_ms[name] = round(1000 * (time.process_time() - c0) / args.requests, 3)
        print(f"{name:10} {cpu_ms[name]:7.3f} ms CPU per request", flush=True)
        if profiler:
            s = io.StringIO()
            pstats.Stats(profiler, stream=s).sort_stats("cumulative").print_stats(args.top)
            print(s.getvalue())
            s = io.StringIO()
            pstats.Stats(profiler, stream=s).sort_stats("tottime").print_stats(args.top)
            print(s.getvalue())
    return {"rows": args.rows, "requests": args.requests, "cpu_ms": cpu_ms}


if __name__ == "__main__":
    asyncio.run(main())
