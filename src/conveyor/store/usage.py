"""Storage used by Conveyor's tables: rows, bytes and the oldest row of each
(``GET /api/admin/storage``, ``conveyor status``).

PostgreSQL: bytes are ``pg_total_relation_size`` (table, indexes and TOAST; of every partition
for ``executions`` and ``step_runs``, listed too: :mod:`conveyor.store.partitions`); rows are the
planner's estimate (``pg_class.reltuples``, kept by autovacuum) for tables past
:data:`EXACT_BELOW` rows, an exact ``count(*)`` below (or before the first analyze). SQLite:
bytes from the ``dbstat`` table (pages of the table and its indexes) when SQLite has it, else
unknown (the file's size is given); rows are counted. The oldest row is read through an index
(each table's time-ordered key), never a scan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Column, Table, func, select, text
from sqlalchemy.exc import OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection

from conveyor.store._base import ServiceBase
from conveyor.store.partitions import Partition, read_partitions
from conveyor.store.schema import (
    api_keys,
    executions,
    schedule_ticks,
    schedules,
    step_runs,
    tenants,
    timers,
    workflow_versions,
    workflows,
)

__all__ = ["EXACT_BELOW", "DatabaseUsage", "StorageService", "TableUsage"]

EXACT_BELOW = 100_000
"""Tables estimated below this many rows are counted exactly (PostgreSQL)."""

# table -> (index-ordered column, the time shown as "oldest")
_OLDEST: dict[Table, tuple[Column[Any], Column[Any]]] = {
    tenants: (tenants.c.created_at, tenants.c.created_at),
    api_keys: (api_keys.c.created_at, api_keys.c.created_at),
    workflows: (workflows.c.id, workflows.c.created_at),
    workflow_versions: (workflow_versions.c.workflow_id, workflow_versions.c.created_at),
    # ids are time-ordered (``new_id``): the primary key gives the oldest row
    executions: (executions.c.id, executions.c.created_at),
    step_runs: (step_runs.c.execution_id, step_runs.c.started_at),
    timers: (timers.c.id, timers.c.created_at),
    schedules: (schedules.c.id, schedules.c.created_at),
    schedule_ticks: (schedule_ticks.c.fire_time, schedule_ticks.c.fire_time),
}


@dataclass(frozen=True, slots=True)
class TableUsage:
    name: str
    rows: int
    rows_exact: bool
    """``False``: the planner's estimate (PostgreSQL, large tables)."""
    bytes: int | None
    """Table, indexes and TOAST; ``None`` when the database cannot tell (SQLite without
    ``dbstat``)."""
    oldest: datetime | None


@dataclass(frozen=True, slots=True)
class DatabaseUsage:
    dialect: str
    tables: list[TableUsage]
    total_bytes: int | None
    """Whole database (PostgreSQL: ``pg_database_size``; SQLite: page count x page size)."""
    partitions: list[Partition] = field(default_factory=list)
    """PostgreSQL: the daily partitions of ``executions`` and ``step_runs``."""


class StorageService(ServiceBase):
    async def usage(self) -> DatabaseUsage:
        async with self._auto() as conn:
            if self._dialect == "postgresql":
                sizes, estimates, total = await _pg_sizes(conn)
            else:
                sizes, estimates, total = await _sqlite_sizes(conn)
            out = []
            for table, (order, shown) in _OLDEST.items():
                estimate = estimates.get(table.name)
                exact = estimate is None or estimate < EXACT_BELOW
                rows = estimate if not exact and estimate is not None else await _count(conn, table)
                oldest = (
                    await conn.execute(select(shown).order_by(order).limit(1))
                ).scalar_one_or_none()
                out.append(TableUsage(table.name, rows, exact, sizes.get(table.name), oldest))
            partitions = await read_partitions(conn) if self._dialect == "postgresql" else []
        return DatabaseUsage(self._dialect, out, total, partitions)


async def _count(conn: AsyncConnection, table: Table) -> int:
    return int((await conn.execute(select(func.count()).select_from(table))).scalar_one())


async def _pg_sizes(conn: AsyncConnection) -> tuple[dict[str, int], dict[str, int], int | None]:
    names = [t.name for t in _OLDEST]
    # a partitioned table (PostgreSQL: executions, step runs) weighs what its partitions do
    rows = (
        await conn.execute(
            text(
                "SELECT c.relname, sum(pg_total_relation_size(l.oid)) AS bytes, "
                "CASE WHEN bool_and(l.reltuples < 0) THEN -1 "
                "ELSE sum(greatest(l.reltuples, 0)) END::bigint AS estimate FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "CROSS JOIN LATERAL (SELECT relid FROM pg_partition_tree(c.oid) WHERE isleaf "
                "UNION ALL SELECT c.oid WHERE c.relkind = 'r') t "
                "JOIN pg_class l ON l.oid = t.relid "
                "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') "
                "AND c.relname = ANY(:names) GROUP BY c.relname"
            ),
            {"names": names},
        )
    ).all()
    total = (await conn.execute(text("SELECT pg_database_size(current_database())"))).scalar_one()
    sizes = {r.relname: int(r.bytes) for r in rows}
    # reltuples is -1 before the first analyze: count those
    estimates = {r.relname: int(r.estimate) for r in rows if r.estimate >= 0}
    return sizes, estimates, int(total)


async def _sqlite_sizes(
    conn: AsyncConnection,
) -> tuple[dict[str, int], dict[str, int], int | None]:
    pages = (await conn.execute(text("PRAGMA page_count"))).scalar_one()
    page_size = (await conn.execute(text("PRAGMA page_size"))).scalar_one()
    sizes: dict[str, int] = {}
    try:
        rows = (
            await conn.execute(
                text(
                    "SELECT m.tbl_name AS name, SUM(d.pgsize) AS bytes FROM dbstat d "
                    "JOIN sqlite_master m ON m.name = d.name GROUP BY m.tbl_name"
                )
            )
        ).all()
        sizes = {r.name: int(r.bytes) for r in rows}
    except OperationalError:  # SQLite built without SQLITE_ENABLE_DBSTAT_VTAB
        sizes = {}
    return sizes, {}, int(pages) * int(page_size)
