"""Retention: which finished executions a tenant keeps, and deleting the rest in small batches.

A tenant keeps its finished (``succeeded``, ``failed``, ``cancelled``) executions for
``EXECUTION_RETENTION`` seconds after they finished, and at most
``EXECUTION_RETENTION_MAX_PER_TENANT`` of them (the newest); either may be overridden per tenant
(``tenants.retention_s``, ``tenants.retention_max_executions``, set through the admin API).
Queued, running and waiting executions are never pruned, nor one whose worker still holds an
unexpired lease. An execution goes with its step runs, its timers (fired or cancelled) and the
schedule tick that created it. Ticks that created no execution (``collapsed``, ``skipped``,
``cancelled``, ``disabled``) go once their instant is older than the tenant's retention.

Both limits are a prefix of a tenant's finished executions in ``(finished_at, id)`` order, so
their union is the longer prefix: :meth:`RetentionService.cutoff` computes it once per pass, and
:meth:`RetentionService.prune_batch` deletes up to ``limit`` executions of that prefix, oldest
first, with their children, in one short transaction (Postgres: the executions are locked
``FOR UPDATE SKIP LOCKED``; each batch reads ``ix_executions_tenant_finished``). The loop that
calls it (batches, pauses, metrics, logs) is :mod:`conveyor.workers.retention`.

Every ``now`` is a parameter: the caller's clock (tests inject one).
"""

from __future__ import annotations

import builtins
from collections.abc import Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Select, and_, delete, exists, func, or_, select, tuple_, update
from sqlalchemy.sql.elements import ColumnElement

from conveyor.errors import NotFound
from conveyor.store._base import ServiceBase
from conveyor.store.schema import (
    ACTIVE_STATUSES,
    TERMINAL_STATUSES,
    event_waits,
    events,
    executions,
    schedule_ticks,
    step_runs,
    tenants,
)
from conveyor.store.schema import timers as timers_table

__all__ = ["Cutoff", "Pruned", "RetentionOverride", "RetentionPolicy", "RetentionService"]

_E = executions.c
_P = executions.alias("parent")


@dataclass(frozen=True, slots=True)
class RetentionOverride:
    """A tenant's own limits; ``None``: the setting applies."""

    tenant_id: str
    retention_s: int | None
    max_executions: int | None


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """The limits in force for one tenant (its overrides, else the settings)."""

    tenant_id: str
    tenant_name: str
    retention_s: int
    """Seconds a finished execution is kept."""
    max_executions: int | None
    """Most finished executions kept; ``None``: no cap."""
    overridden: bool
    """The tenant overrides at least one of the two."""


@dataclass(frozen=True, slots=True)
class Cutoff:
    """What ``tenant_id`` loses: its finished executions before ``before`` (age), or before the
    oldest one it keeps under its cap (``cap``: that execution's ``(finished_at, id)``).
    ``now`` guards the lease of a worker that has not let go yet."""

    tenant_id: str
    now: datetime
    before: datetime
    cap: tuple[datetime, str] | None = None


@dataclass(slots=True)
class Pruned:
    """Rows deleted (or, for a dry run, that would be) per table."""

    executions: int = 0
    step_runs: int = 0
    timers: int = 0
    schedule_ticks: int = 0

    def add(self, other: Pruned) -> Pruned:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def as_dict(self) -> dict[str, int]:
        return {f.name: int(getattr(self, f.name)) for f in fields(self)}

    @property
    def total(self) -> int:
        return sum(self.as_dict().values())


class RetentionService(ServiceBase):
    """Retention overrides (admin API) and the pruning queries (system-wide)."""

    # --- per-tenant overrides --------------------------------------------------------------
    async def get_override(self, tenant_id: str) -> RetentionOverride:
        async with self._auto() as conn:
            row = (
                await conn.execute(
                    select(tenants.c.retention_s, tenants.c.retention_max_executions).where(
                        tenants.c.id == tenant_id
                    )
                )
            ).first()
        if row is None:
            raise NotFound("tenant not found", tenant_id=tenant_id)
        return RetentionOverride(tenant_id, row.retention_s, row.retention_max_executions)

    async def set_override(
        self, tenant_id: str, *, retention_s: int | None, max_executions: int | None
    ) -> RetentionOverride:
        """Replace the tenant's overrides (``None`` clears one: the setting applies)."""
        async with self._auto() as conn:
            result = await conn.execute(
                update(tenants)
                .where(tenants.c.id == tenant_id)
                .values(retention_s=retention_s, retention_max_executions=max_executions)
            )
        if not result.rowcount:
            raise NotFound("tenant not found", tenant_id=tenant_id)
        return RetentionOverride(tenant_id, retention_s, max_executions)

    async def policies(
        self, *, retention_s: int, max_executions: int | None
    ) -> builtins.list[RetentionPolicy]:
        """Every tenant's limits, by tenant id: its overrides, else ``retention_s`` and
        ``max_executions`` (``EXECUTION_RETENTION``, ``EXECUTION_RETENTION_MAX_PER_TENANT``)."""
        query = select(
            tenants.c.id, tenants.c.name, tenants.c.retention_s, tenants.c.retention_max_executions
        ).order_by(tenants.c.id)
        async with self._auto() as conn:
            rows = (await conn.execute(query)).all()
        return [
            RetentionPolicy(
                tenant_id=r.id,
                tenant_name=r.name,
                retention_s=r.retention_s if r.retention_s is not None else retention_s,
                max_executions=(
                    r.retention_max_executions
                    if r.retention_max_executions is not None
                    else max_executions
                ),
                overridden=r.retention_s is not None or r.retention_max_executions is not None,
            )
            for r in rows
        ]

    # --- what goes ---------------------------------------------------------------------------
    async def cutoff(self, policy: RetentionPolicy, now: datetime) -> Cutoff:
        """The prefix of ``policy``'s tenant's finished executions that goes at ``now``."""
        before = now - timedelta(seconds=policy.retention_s)
        cap: tuple[datetime, str] | None = None
        if policy.max_executions is not None:
            oldest_kept = (
                select(_E.finished_at, _E.id)
                .where(_E.tenant_id == policy.tenant_id, _E.finished_at.is_not(None))
                .order_by(_E.finished_at.desc(), _E.id.desc())
                .offset(policy.max_executions - 1)
                .limit(1)
            )
            async with self._auto() as conn:
                row = (await conn.execute(oldest_kept)).first()
            if row is not None and row.finished_at >= before:
                cap = (row.finished_at, row.id)
        return Cutoff(policy.tenant_id, now, before, cap)

    def _doomed(self, cutoff: Cutoff) -> ColumnElement[bool]:
        """Executions of ``cutoff`` that go: finished, in the prefix, not leased."""
        if cutoff.cap is None:
            older = _E.finished_at < cutoff.before
        else:  # (finished_at, id) < cap, written so the index range applies
            at, ident = cutoff.cap
            older = and_(_E.finished_at <= at, or_(_E.finished_at < at, _E.id < ident))
        return and_(
            _E.tenant_id == cutoff.tenant_id,
            _E.finished_at.is_not(None),
            older,
            _E.status.in_(TERMINAL_STATUSES),
            or_(_E.lease_expires_at.is_(None), _E.lease_expires_at < cutoff.now),
            # a child (sub-workflow, branch, item) stays while its parent has not ended: the
            # parent reads its result when it joins, and would start a missing item again
            or_(_E.parent_execution_id.is_(None), ~exists().where(
                _P.c.id == _E.parent_execution_id, _P.c.status.in_(ACTIVE_STATUSES)
            )),
        )  # fmt: skip

    def _batch(self, cutoff: Cutoff, limit: int) -> Select[Any]:
        return (
            select(_E.id).where(self._doomed(cutoff)).order_by(_E.finished_at, _E.id).limit(limit)
        )

    async def prune_batch(self, cutoff: Cutoff, limit: int) -> Pruned:
        """Delete up to ``limit`` executions of ``cutoff`` (oldest first) with their step runs,
        timers and schedule ticks, in one transaction. Fewer than ``limit`` executions deleted
        means the prefix is done.

        The candidates are read first without a transaction (a tenant with nothing to prune
        costs one indexed read: no lock, no write transaction — SQLite's write lock included);
        the transaction then takes those still doomed (Postgres: ``FOR UPDATE SKIP LOCKED``,
        so two passes never wait on each other) and deletes them."""
        async with self._auto() as conn:
            candidates = list((await conn.execute(self._batch(cutoff, limit))).scalars())
        if not candidates:
            return Pruned()
        pick = select(_E.id).where(_E.id.in_(candidates), self._doomed(cutoff))
        if self._dialect == "postgresql":
            pick = pick.with_for_update(skip_locked=True)
        async with self._tx() as conn:
            ids = list((await conn.execute(pick)).scalars())
            if not ids:
                return Pruned()
            done = Pruned(
                step_runs=_count(
                    await conn.execute(delete(step_runs).where(step_runs.c.execution_id.in_(ids)))
                ),
                timers=_count(
                    await conn.execute(
                        delete(timers_table).where(timers_table.c.execution_id.in_(ids))
                    )
                ),
                schedule_ticks=_count(
                    await conn.execute(
                        delete(schedule_ticks).where(schedule_ticks.c.execution_id.in_(ids))
                    )
                ),
            )
            # their events (wait steps; migration 0010): cascaded on Postgres, explicit for SQLite
            await conn.execute(delete(events).where(events.c.execution_id.in_(ids)))
            await conn.execute(delete(event_waits).where(event_waits.c.execution_id.in_(ids)))
            done.executions = _count(await conn.execute(delete(executions).where(_E.id.in_(ids))))
        return done

    async def count(self, cutoff: Cutoff) -> Pruned:
        """What :meth:`prune_batch` would delete for ``cutoff`` if called until done (a dry
        run; ticks without an execution are :meth:`count_idle_ticks`)."""
        doomed = select(_E.id).where(self._doomed(cutoff)).scalar_subquery()
        async with self._auto() as conn:
            n_exec = (
                await conn.execute(select(func.count()).select_from(executions).where(
                    self._doomed(cutoff)))
            ).scalar_one()  # fmt: skip
            counts = [
                (
                    await conn.execute(
                        select(func.count()).select_from(t).where(t.c.execution_id.in_(doomed))
                    )
                ).scalar_one()
                for t in (step_runs, timers_table, schedule_ticks)
            ]
        return Pruned(int(n_exec), int(counts[0]), int(counts[1]), int(counts[2]))

    # --- ticks that created no execution ----------------------------------------------------
    def _idle_ticks(
        self, before: datetime, tenant_id: str | None, exclude: Sequence[str]
    ) -> ColumnElement[bool]:
        t = schedule_ticks.c
        where = and_(t.execution_id.is_(None), t.fire_time < before)
        if tenant_id is not None:
            where = and_(where, t.tenant_id == tenant_id)
        if exclude:
            where = and_(where, t.tenant_id.not_in(list(exclude)))
        return where

    async def prune_idle_ticks(
        self,
        before: datetime,
        limit: int,
        *,
        tenant_id: str | None = None,
        exclude: Sequence[str] = (),
    ) -> int:
        """Delete up to ``limit`` ticks without an execution whose instant is before ``before``
        (of ``tenant_id``, or of every tenant but ``exclude``); returns how many."""
        t = schedule_ticks.c
        pick = (
            select(t.schedule_id, t.fire_time)
            .where(self._idle_ticks(before, tenant_id, exclude))
            .order_by(t.fire_time)
            .limit(limit)
        )
        async with self._auto() as conn:
            keys = [tuple(r) for r in (await conn.execute(pick)).all()]
        if not keys:
            return 0
        async with self._tx() as conn:  # only ticks still without an execution
            result = await conn.execute(
                delete(schedule_ticks).where(
                    tuple_(t.schedule_id, t.fire_time).in_(keys), t.execution_id.is_(None)
                )
            )
        return _count(result)

    async def count_idle_ticks(self, before: datetime, tenant_id: str) -> int:
        async with self._auto() as conn:
            n = (
                await conn.execute(
                    select(func.count())
                    .select_from(schedule_ticks)
                    .where(self._idle_ticks(before, tenant_id, ()))
                )
            ).scalar_one()
        return int(n)


def _count(result: Any) -> int:
    return int(result.rowcount or 0)
