"""Benchmark: newest-first execution lists over daily partitions (PostgreSQL, migration 0012).

Creates a throwaway database (``_exec_common.bench_env``), migrates it, creates ``--days`` daily partitions ending today
and inserts ``--rows`` executions spread evenly over them (10 tenants, 5 workflows each, 3%
failed, time-ordered ids: each row lands in its day's partition), then copies them into a
plain table with the same indexes (``executions_plain``: the pre-0012 layout) and runs each
list query of the API on both with ``EXPLAIN (ANALYZE, BUFFERS)``, ``--repeat`` times (the
best run is kept). The queries are those of ``GET /api/executions`` (``ServiceBase._page``:
``ORDER BY created_at DESC, id DESC LIMIT 51``, the cursor as ``(created_at, id) <``):

* ``tenant_first``: a tenant's first page; ``tenant_page100``: its 100th page (cursor);
* ``tenant_failed``: a tenant's failed executions, first page;
* ``tenant_workflow_page50``: one workflow's 50th page (of 80);
* ``all_first`` / ``all_page100``: the operators' search across tenants;
* ``by_id``: one execution by id (one partition read).

    python bench/partition_lists.py [--rows 200000] [--days 20] [--repeat 5]

A third figure per list query, ``walk``: what the store runs since the newest-first walk
(``conveyor.store.pg.statements``: the newest days' partitions plus the DEFAULT partition
first, more days only when that did not fill the page): each try's ``EXPLAIN ANALYZE``
execution time summed over the tries the page needed (``tries``).

Prints per query the plan's top nodes and the execution time on each layout; last line JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from _exec_common import bench_env
from conveyor.store import asyncpg_dsn
from conveyor.store.partitions import day_bound, partition_name
from conveyor.store.pg.statements import WALK, _page_sql, walk_from

PAGE = 51  # limit + 1, as _page asks

_SEED = """
INSERT INTO executions (id, tenant_id, workflow_id, workflow_version, status, region,
    triggered_by, input, output, created_at, queued_at, started_at, finished_at, updated_at)
SELECT lpad(to_hex(ms), 12, '0') || '7' || substr(md5(g::text), 1, 19),
       't' || (g % 10), 'w' || (g % 50), 1,
       CASE WHEN g % 33 = 0 THEN 'failed' ELSE 'succeeded' END, 'us', 'api',
       '{"order": 12345}'::jsonb, '{"ok": true}'::jsonb, at, at, at, at, at
  FROM (SELECT g, $1::bigint + (g::bigint * $2::bigint) AS ms,
               to_timestamp(($1::bigint + g::bigint * $2::bigint) / 1000.0) AS at
          FROM generate_series(0, $3::int - 1) g) s
"""


def _cursor_sql(where: str) -> str:
    return (
        f"SELECT * FROM {{t}} WHERE {where} AND created_at <= $c1 AND (created_at < $c1 "
        f"OR id < $c2) ORDER BY created_at DESC, id DESC LIMIT {PAGE}"
    )


async def _cursor(conn: Any, where: str, args: list[Any], depth: int) -> tuple[Any, str]:
    """The (created_at, id) of the last row of page ``depth`` (the cursor to page depth+1)."""
    row = await conn.fetchrow(
        f"SELECT created_at, id FROM executions WHERE {where} "
        f"ORDER BY created_at DESC, id DESC OFFSET {(PAGE - 1) * (depth - 1) - 1} LIMIT 1",
        *args,
    )
    return row["created_at"], row["id"]


async def _explain(conn: Any, sql: str, args: list[Any], repeat: int) -> tuple[float, list[str]]:
    best, nodes = float("inf"), []
    for _ in range(repeat):
        rows = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + sql, *args)
        lines = [r[0] for r in rows]
        ms = float(re.search(r"Execution Time: ([\d.]+)", lines[-1]).group(1))  # type: ignore[union-attr]
        if ms < best:
            best = ms
            nodes = [
                ln.strip().split("  (")[0]
                for ln in lines
                if re.match(r"^\s*(->\s*)?(Limit|Merge Append|Append|Sort|Index|Bitmap|Seq)", ln)
            ][:4]
    return best, nodes


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--days", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    async with bench_env() as env:  # a migrated throwaway database, dropped afterwards
        conn = await asyncpg.connect(asyncpg_dsn(env.url))
        try:
            await _run(conn, args)
        finally:
            await conn.close()


async def _run(conn: Any, args: argparse.Namespace) -> None:
    today = datetime.now(UTC).date()
    first = today - timedelta(days=args.days - 1)
    for i in range(args.days):
        day = first + timedelta(days=i)
        for table in ("executions", "step_runs"):
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {partition_name(table, day)} PARTITION OF {table} "
                f"FOR VALUES FROM ('{day_bound(day)}') TO ('{day_bound(day + timedelta(days=1))}')"
            )
    now = datetime.now(UTC)
    await conn.execute(
        "INSERT INTO tenants (id, name, created_at) SELECT 't' || g, 't' || g, $1 "
        "FROM generate_series(0, 9) g",
        now,
    )
    await conn.execute(
        "INSERT INTO workflows (id, tenant_id, name, region, current_version, created_at, "
        "updated_at) SELECT 'w' || g, 't' || (g % 10), 'w', 'us', 1, $1, $1 "
        "FROM generate_series(0, 49) g",
        now,
    )
    start = datetime(first.year, first.month, first.day, tzinfo=UTC)
    start_ms = int(start.timestamp() * 1000)
    span_ms = int((now - start).total_seconds() * 1000)
    await conn.execute(_SEED, start_ms, span_ms // args.rows, args.rows)
    await conn.execute("CREATE TABLE executions_plain (LIKE executions INCLUDING ALL)")
    await conn.execute("INSERT INTO executions_plain SELECT * FROM executions")
    await conn.execute("ANALYZE executions")
    await conn.execute("ANALYZE executions_plain")
    parts = await conn.fetch(
        "SELECT c.relname, c.reltuples FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
        "WHERE i.inhparent = 'executions'::regclass AND c.reltuples > 0"
    )
    print(f"{args.rows} executions in {len(parts)} partitions (+ default)")

    head = f"ORDER BY created_at DESC, id DESC LIMIT {PAGE}"
    queries: dict[str, tuple[str, list[Any]]] = {}
    queries["tenant_first"] = (f"SELECT * FROM {{t}} WHERE tenant_id = $1 {head}", ["t3"])
    queries["tenant_failed"] = (
        f"SELECT * FROM {{t}} WHERE tenant_id = $1 AND status = $2 {head}",
        ["t3", "failed"],
    )
    queries["all_first"] = (f"SELECT * FROM {{t}} WHERE true {head}", [])
    for label, where, params, depth in (
        ("tenant_page100", "tenant_id = $1", ["t3"], 100),
        ("tenant_workflow_page50", "tenant_id = $1 AND workflow_id = $2", ["t3", "w13"], 50),
        ("all_page100", "true", [], 100),
    ):
        at, ident = await _cursor(conn, where, params, depth)
        n = len(params)
        sql = _cursor_sql(where).replace("$c1", f"${n + 1}").replace("$c2", f"${n + 2}")
        queries[label] = (sql, [*params, at, ident])
    # The walk: (statuses, workflow, cursor) of each list query, as the store passes them.
    walks: dict[str, tuple[list[Any], tuple[int, bool, bool], Any]] = {
        "tenant_first": (["t3"], (0, False, False), None),
        "tenant_failed": (["t3", "failed"], (1, False, False), None),
    }
    for label, shape in (("tenant_page100", (0, False, True)),
                         ("tenant_workflow_page50", (0, True, True))):  # fmt: skip
        walks[label] = (queries[label][1], shape, queries[label][1][-2])
    some = await conn.fetchval("SELECT id FROM executions OFFSET 12345 LIMIT 1")
    queries["by_id"] = ("SELECT * FROM {t} WHERE tenant_id = $1 AND id = $2", ["t5", some])

    out: dict[str, dict[str, float]] = {}
    for label, (sql, params) in queries.items():
        figures = {}
        for layout, table in (("partitioned", "executions"), ("plain", "executions_plain")):
            ms, nodes = await _explain(conn, sql.format(t=table), params, args.repeat)
            figures[layout] = round(ms, 3)
            print(f"{label:26} {layout:12} {ms:8.3f} ms  {' > '.join(nodes)}")
        if label in walks:
            params, shape, at = walks[label]
            ms, tries, nodes = await _walk(conn, params, shape, at, args.repeat)
            figures["walk"], figures["walk_tries"] = round(ms, 3), tries
            print(f"{label:26} {'walk':12} {ms:8.3f} ms  {tries} tr{'y' if tries == 1 else 'ies'}"
                  f"  {' > '.join(nodes)}")  # fmt: skip
        out[label] = figures
    print(json.dumps({"rows": args.rows, "days": args.days, "ms": out}))


async def _walk(
    conn: Any, params: list[Any], shape: tuple[int, bool, bool], at: Any, repeat: int
) -> tuple[float, int, list[str]]:
    """The store's walk for one page: the summed best execution time of its tries."""
    start = at if at is not None else datetime.now(UTC)
    total, tries, nodes = 0.0, 0, []
    for days in WALK:
        tries += 1
        args = [*params, PAGE]
        if days is None:
            sql = _page_sql(*shape, False)
        else:
            lo, exact = walk_from(start, days)
            sql = _page_sql(*shape, True)
            args.append(lo)
        ms, nodes = await _explain(conn, sql, args, repeat)
        total += ms
        rows = await conn.fetch(sql, *args)
        if days is None or (len(rows) >= PAGE and rows[PAGE - 2]["created_at"] >= exact):
            break
    return total, tries, nodes


if __name__ == "__main__":
    asyncio.run(main())
