"""Newest-first execution pages over PostgreSQL's daily partitions read the newest days first
(:meth:`conveyor.store.pg.PgStatements.execution_page`): every page, with every filter and
page size, followed cursor by cursor, must be exactly the page of the plain ordering
(``created_at DESC, id DESC`` over all rows) — across day boundaries, with cursors landing on
a day's first and last rows, over empty days, a day with no partition (its rows in the
DEFAULT partition), ids that are not time-ordered (DEFAULT too), executions created up to
days before their id's instant, ties on ``created_at``, and a tenant whose executions are all
older than the walk's first tries. The days are around today: the walk starts from now."""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import text

from conveyor.store import Store, new_id
from conveyor.store.schema import executions
from conveyor.store.sql.statements import SqlStatements

DAY = timedelta(days=1)
MS = timedelta(milliseconds=1)
STATUSES = ("succeeded", "succeeded", "succeeded", "failed", "cancelled", "queued")


def _row(tenant: str, workflow: str, status: str, created: datetime, eid: str) -> dict[str, Any]:
    return dict(
        id=eid, tenant_id=tenant, workflow_id=workflow, workflow_version=1, status=status,
        region="us", triggered_by="api", input={"n": 1}, created_at=created, queued_at=created,
        updated_at=created,
    )  # fmt: skip


async def _seed(store: Store) -> tuple[str, str, str, list[dict[str, Any]]]:
    """Two tenants' executions over the last 25 days; returns (busy tenant, its second
    workflow, the sparse tenant, every row)."""
    rnd = random.Random(13)
    now = datetime.now(UTC)
    today = datetime(now.year, now.month, now.day, tzinfo=UTC)
    busy = await store.tenants.create("busy")
    sparse = await store.tenants.create("sparse")
    wf1 = (await store.workflows.create(busy.id, {"name": "a", "steps": [{"id": "a", "type": "noop"}]})).id  # fmt: skip
    wf2 = (await store.workflows.create(busy.id, {"name": "b", "steps": [{"id": "a", "type": "noop"}]})).id  # fmt: skip
    wf3 = (await store.workflows.create(sparse.id, {"name": "c", "steps": [{"id": "a", "type": "noop"}]})).id  # fmt: skip
    # Daily partitions for today - 11 .. today + 1 except today - 4 (its rows: DEFAULT),
    # and today - 25; today - 6 and today - 7 stay empty.
    await store.partitions.ensure(today - 11 * DAY, 6)
    await store.partitions.ensure(today - 3 * DAY, 4)
    await store.partitions.ensure(today - 25 * DAY, 0)  # far back, past the walk's tries
    rows: list[dict[str, Any]] = []
    for back in (*range(12), 20, 25):  # day 20 has no partition (DEFAULT)
        if back in (6, 7):
            continue
        day = today - back * DAY
        instants = [day, day + DAY - MS]  # a day's first and last millisecond
        instants += [day + timedelta(seconds=rnd.randrange(86_400)) for _ in range(5)]
        for at in instants:
            if at > now + DAY:
                continue
            wf = wf2 if rnd.random() < 0.3 else wf1
            status = rnd.choice(STATUSES)
            rows.append(_row(busy.id, wf, status, at, new_id(at)))
        tie = day + timedelta(hours=12)  # two executions created in the same microsecond
        rows.append(_row(busy.id, wf1, "failed", tie, new_id(tie)))
        rows.append(_row(busy.id, wf2, "failed", tie, new_id(tie)))
        # created days before its id's instant (a clock behind): still listed in order
        early = day + timedelta(hours=3)
        rows.append(_row(busy.id, wf1, "succeeded", early - 3 * DAY, new_id(early)))
    # ids that are not time-ordered (DEFAULT), some sorting below every day's ids
    for i, eid in enumerate(("e-1", "0000-legacy", "zz-last")):
        rows.append(_row(busy.id, wf1, "failed", today - i * DAY + timedelta(hours=7), eid))
    # the sparse tenant: three executions, 10 and 11 days old
    for back in (10, 10, 11):
        at = today - back * DAY + timedelta(minutes=rnd.randrange(1440))
        rows.append(_row(sparse.id, wf3, "succeeded", at, new_id(at)))
    async with store.engine.begin() as conn:
        await conn.execute(executions.insert(), rows)
        homes = await conn.execute(
            text("SELECT count(DISTINCT tableoid) FROM executions WHERE tenant_id = :t"),
            {"t": busy.id},
        )
        assert homes.scalar_one() >= 8  # the rows do spread over the partitions
    return busy.id, wf2, sparse.id, rows


def _expected(
    rows: Sequence[dict[str, Any]],
    tenant: str,
    statuses: tuple[str, ...] | None,
    workflow: str | None,
) -> list[str]:
    kept = [
        r
        for r in rows
        if r["tenant_id"] == tenant
        and (statuses is None or r["status"] in statuses)
        and (workflow is None or r["workflow_id"] == workflow)
    ]
    kept.sort(key=lambda r: (r["created_at"], r["id"]), reverse=True)
    return [r["id"] for r in kept]


async def test_pages_across_partitions_are_the_plain_ordering(pg: Store) -> None:
    busy, wf2, sparse, rows = await _seed(pg)
    plain = SqlStatements(pg.engine)  # the unpartitioned query: ORDER BY ... LIMIT n
    filters: list[tuple[str, tuple[str, ...] | None, str | None]] = [
        (busy, None, None),
        (busy, ("failed",), None),
        (busy, ("failed", "cancelled"), None),
        (busy, None, wf2),
        (busy, ("succeeded",), wf2),
        (busy, ("running",), None),
        (sparse, None, None),
    ]
    pages = 0
    for tenant, statuses, workflow in filters:
        expected = _expected(rows, tenant, statuses, workflow)
        for limit in (1, 2, 3, 7, 50):
            listed: list[str] = []
            cursor: str | None = None
            after: tuple[datetime, str] | None = None
            while True:
                page = await pg.executions.list(
                    tenant, status=statuses, workflow_id=workflow, limit=limit, cursor=cursor
                )
                same, more = await plain.execution_page(
                    tenant, statuses=statuses, workflow_id=workflow, limit=limit, after=after
                )
                pages += 1
                assert page.items == same  # the same records, field by field
                assert (page.next_cursor is not None) == more
                listed.extend(e.id for e in page.items)
                if page.next_cursor is None:
                    break
                cursor = page.next_cursor
                after = (page.items[-1].created_at, page.items[-1].id)
            assert listed == expected, (tenant, statuses, workflow, limit)
    assert pages > 200
