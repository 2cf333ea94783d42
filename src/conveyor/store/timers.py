"""Durable timers (created by ``delay`` steps and retry waits, fired by the timer dispatcher).

The engine writes a ``pending`` timer row in the same transaction that parks its execution
(``waiting``, ``wake_at`` = the timer's ``due_at``). The dispatcher:

1. :meth:`TimerService.claim` — takes pending timers due before a horizon, with a claim that
   expires (``claimed_by``/``claimed_until``; Postgres ``FOR UPDATE SKIP LOCKED`` so several
   dispatchers never take the same row; SQLite serialises writers anyway);
2. enqueues each at its due instant with job id ``timer:<id>`` (:attr:`Timer.job_id`);
3. :meth:`TimerService.mark_fired`.

A dispatcher that dies between any two steps leaves the claim to expire; another one takes it
over. A duplicate enqueue is harmless: the engine only wakes an execution whose ``wake_at``
has passed, once (lease compare-and-set).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select, update

from conveyor.store._base import ServiceBase
from conveyor.store.records import Timer
from conveyor.store.schema import timers

__all__ = ["TimerService"]


class TimerService(ServiceBase):
    """The timer dispatcher's queries (system-wide) and a tenant-scoped read."""

    async def claim(
        self,
        now: datetime,
        *,
        owner: str,
        horizon_s: float = 0.0,
        claim_ttl_s: float = 30.0,
        limit: int = 500,
    ) -> list[Timer]:
        """Claim up to ``limit`` pending timers due by ``now + horizon_s`` that nobody holds
        (or whose claim expired), earliest first. The claim lasts ``claim_ttl_s``."""
        pick = (
            select(timers.c.id)
            .where(
                timers.c.status == "pending",
                timers.c.due_at <= now + timedelta(seconds=horizon_s),
                or_(timers.c.claimed_until.is_(None), timers.c.claimed_until < now),
            )
            .order_by(timers.c.due_at)
            .limit(limit)
        )
        if self._dialect == "postgresql":
            pick = pick.with_for_update(skip_locked=True)
        statement = (
            update(timers)
            .where(timers.c.id.in_(pick.scalar_subquery()))
            .values(claimed_by=owner, claimed_until=now + timedelta(seconds=claim_ttl_s))
            .returning(*timers.c)
        )
        async with self._tx() as conn:
            rows = (await conn.execute(statement)).all()
        found = [Timer.from_mapping(r._mapping) for r in rows]
        found.sort(key=lambda t: (t.due_at, t.id))
        return found

    async def mark_fired(self, timer_ids: Sequence[str], *, owner: str, at: datetime) -> int:
        """Mark claimed timers fired; returns how many were still ours and pending."""
        if not timer_ids:
            return 0
        async with self._auto() as conn:
            result = await conn.execute(
                update(timers)
                .where(
                    timers.c.id.in_(list(timer_ids)),
                    timers.c.status == "pending",
                    timers.c.claimed_by == owner,
                )
                .values(status="fired", fired_at=at)
            )
        return int(result.rowcount or 0)

    async def release(self, timer_ids: Sequence[str], *, owner: str) -> int:
        """Give claimed, unfired timers back (e.g. on shutdown)."""
        if not timer_ids:
            return 0
        async with self._auto() as conn:
            result = await conn.execute(
                update(timers)
                .where(
                    timers.c.id.in_(list(timer_ids)),
                    timers.c.status == "pending",
                    timers.c.claimed_by == owner,
                )
                .values(claimed_by=None, claimed_until=None)
            )
        return int(result.rowcount or 0)

    async def next_due_at(self) -> datetime | None:
        """The due time of the earliest pending timer."""
        async with self._auto() as conn:
            row = (
                await conn.execute(
                    select(timers.c.due_at)
                    .where(timers.c.status == "pending")
                    .order_by(timers.c.due_at)
                    .limit(1)
                )
            ).first()
        return None if row is None else row.due_at

    async def backlog(self, now: datetime) -> int:
        """How many pending timers are due at ``now`` (lag indicator)."""
        async with self._auto() as conn:
            row = (
                await conn.execute(
                    select(func.count())
                    .select_from(timers)
                    .where(timers.c.status == "pending", timers.c.due_at <= now)
                )
            ).first()
        return int(row[0]) if row is not None else 0

    async def for_execution(self, tenant_id: str, execution_id: str) -> list[Timer]:
        async with self._auto() as conn:
            rows = (
                await conn.execute(
                    select(timers)
                    .where(timers.c.tenant_id == tenant_id, timers.c.execution_id == execution_id)
                    .order_by(timers.c.seq)
                )
            ).all()
        return [Timer.from_mapping(r._mapping) for r in rows]
