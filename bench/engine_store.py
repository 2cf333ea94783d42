"""Benchmark: executions of a one-step ``noop`` workflow through the engine, in process,
against Postgres (a throwaway database this script creates and drops).

Measures executions/s with N concurrent runs and the database round trips per execution,
counted client-side (every statement, BEGIN and COMMIT the engine sends) and cross-checked
server-side (``pg_stat_database`` transactions). The baseline, measured in the same run, is
the same engine on SQLAlchemy Core (``Store(fast_path=False)``) instead of the asyncpg hot path.

    python bench/engine_store.py [--executions 5000] [--concurrency 50]

Last line: JSON with ``executions_per_s`` and ``round_trips_per_execution``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import event

from conveyor.engine import Engine, OutcomeKind
from conveyor.settings import load_settings
from conveyor.store import Store, asyncpg_dsn, new_id, utcnow

ADMIN_DSN = os.environ.get("TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


class Counter:
    def __init__(self) -> None:
        self.n = 0


class _CountingConnection:
    """Proxy for an asyncpg connection that counts round-trip calls."""

    def __init__(self, con: Any, counter: Counter) -> None:
        self._con, self._counter = con, counter

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._con, name)
        if name in ("fetch", "fetchrow", "fetchval", "execute", "executemany"):

            async def counted(*args: Any, **kwargs: Any) -> Any:
                self._counter.n += 1
                return await attr(*args, **kwargs)

            return counted
        return attr


class _CountingPool:
    def __init__(self, pool: Any, counter: Counter) -> None:
        self._pool, self._counter = pool, counter

    async def acquire(self) -> _CountingConnection:
        return _CountingConnection(await self._pool.acquire(), self._counter)

    async def release(self, connection: _CountingConnection) -> None:
        await self._pool.release(connection._con)


def instrument(store: Store) -> Counter:
    counter = Counter()

    def count(*_args: Any) -> None:
        counter.n += 1

    sync = store.engine.sync_engine
    for name in ("before_cursor_execute", "begin", "commit", "rollback"):
        event.listen(sync, name, count)
    runs: Any = store.runs
    if hasattr(runs, "_pool"):
        runs._pool = _CountingPool(runs._pool, counter)
    return counter


async def admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def seed(url: str, tenant: str, workflow: str, count: int) -> list[str]:
    ids = [new_id() for _ in range(count)]
    now = utcnow()
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await conn.copy_records_to_table(
            "executions",
            columns=[
                "id",
                "tenant_id",
                "workflow_id",
                "workflow_version",
                "status",
                "region",
                "triggered_by",
                "input",
                "created_at",
                "queued_at",
                "updated_at",
            ],
            records=[
                (i, tenant, workflow, 1, "queued", "us", "api", '{"n": 1}', now, now, now)
                for i in ids
            ],
        )
    finally:
        await conn.close()
    return ids


async def server_xacts(url: str) -> int:
    """Transactions the server counted in this database (closed backends' stats are flushed
    when they exit; the statistics snapshot is refreshed for this read)."""
    await asyncio.sleep(0.5)
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        row = await conn.fetchrow(
            "SELECT xact_commit + xact_rollback AS n FROM pg_stat_database "
            "WHERE datname = current_database()"
        )
        return int(row["n"])
    finally:
        await conn.close()


async def measure(
    url: str, *, executions: int, concurrency: int, fast_path: bool
) -> dict[str, float]:
    settings = load_settings({}, database_url=url, database_pool_size=min(concurrency, 20))
    async with Store(settings, fast_path=fast_path) as store:
        tenant = await store.tenants.create("bench")
        workflow = await store.workflows.create(
            tenant.id, {"name": "noop", "steps": [{"id": "a", "type": "noop"}]}
        )
    ids = await seed(url, tenant.id, workflow.id, executions)
    xacts_before = await server_xacts(url)  # all setup connections are closed by now
    async with Store(settings, fast_path=fast_path) as store:
        engine = Engine(store, settings)
        await store.workflows.get_definition(tenant.id, workflow.id, 1)  # warm the cache
        queue: asyncio.Queue[str] = asyncio.Queue()
        for execution_id in ids:
            queue.put_nowait(execution_id)
        succeeded = 0

        async def runner() -> None:
            nonlocal succeeded
            while not queue.empty():
                outcome = await engine.run(queue.get_nowait())
                succeeded += outcome.kind is OutcomeKind.SUCCEEDED

        counter = instrument(store)
        cpu0, wall0 = time.process_time(), time.perf_counter()
        await asyncio.gather(*(runner() for _ in range(concurrency)))
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        trips = counter.n
    # The server's count: the run's transactions, plus the cache warm-up and one read.
    xacts = await server_xacts(url) - xacts_before - 2
    if succeeded != executions:
        raise SystemExit(f"only {succeeded}/{executions} executions succeeded")
    return {
        "executions_per_s": executions / wall,
        "round_trips_per_execution": trips / executions,
        "transactions_per_execution": xacts / executions,
        "cpu_us_per_execution": cpu / executions * 1e6,
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--executions", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="event loop (uvloop ships with uvicorn[standard])",
    )
    return parser.parse_args()


async def main(args: argparse.Namespace) -> None:
    name = f"conveyor_bench_{uuid.uuid4().hex[:10]}"
    await admin(f'CREATE DATABASE "{name}"')
    url = f"{ADMIN_DSN.rsplit('/', 1)[0]}/{name}"
    try:
        from conveyor.store import migrate

        await migrate(load_settings({}, database_url=url))
        results: dict[bool, dict[str, float]] = {}
        for label, hot in (("baseline (SQLAlchemy Core)", False), ("engine (asyncpg)", True)):
            results[hot] = r = await measure(
                url, executions=args.executions, concurrency=args.concurrency, fast_path=hot
            )
            print(
                f"{label:28s} {r['executions_per_s']:8.0f} executions/s  "
                f"{r['round_trips_per_execution']:.2f} round trips/execution  "
                f"{r['transactions_per_execution']:.2f} server transactions/execution  "
                f"{r['cpu_us_per_execution']:.0f} µs CPU/execution",
                file=sys.stderr,
            )
    finally:
        await admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    fast, base = results[True], results[False]
    ratio = fast["executions_per_s"] / base["executions_per_s"]
    print(
        f"ratio engine/baseline: {ratio:.2f}x "
        f"({args.executions} executions, concurrency {args.concurrency}, {args.loop} loop)",
        file=sys.stderr,
    )
    print(
        json.dumps(
            {
                "executions_per_s": round(fast["executions_per_s"], 1),
                "round_trips_per_execution": round(fast["round_trips_per_execution"], 2),
                "transactions_per_execution": round(fast["transactions_per_execution"], 2),
                "cpu_us_per_execution": round(fast["cpu_us_per_execution"], 1),
                "baseline_executions_per_s": round(base["executions_per_s"], 1),
                "baseline_round_trips_per_execution": round(base["round_trips_per_execution"], 2),
                "ratio": round(ratio, 2),
                "executions": args.executions,
                "concurrency": args.concurrency,
                "loop": args.loop,
            }
        )
    )


if __name__ == "__main__":
    ARGS = parse_args()
    if ARGS.loop == "uvloop":
        import uvloop

        uvloop.run(main(ARGS))
    else:
        asyncio.run(main(ARGS))
