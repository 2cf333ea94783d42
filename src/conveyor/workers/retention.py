"""Retention passes: the leading scheduler's loop and ``conveyor prune``.

On PostgreSQL a pass first creates the daily partitions of the days ahead and drops the
partitions of each day whose executions are all due (:mod:`conveyor.store.partitions`): a
whole day goes at the cost of a ``DROP TABLE``. Then (the only step on SQLite) it goes through
every tenant
(:meth:`RetentionService.policies <conveyor.store.retention.RetentionService.policies>`),
computes what it loses at the pass's instant, and deletes it in batches of
``RETENTION_BATCH_SIZE`` executions — each batch one short transaction with the executions'
step runs, timers and schedule ticks — sleeping ``RETENTION_PAUSE_MS`` between two batches so
triggers and workers are never kept waiting behind a long delete. Ticks that created no
execution go by their instant, in batches too. Each tenant that lost rows is logged
(``retention.pruned``), each pass once (``retention.pass``); rows deleted are counted in
``conveyor_retention_pruned_rows_total{table}``.

:meth:`Retention.loop` runs a pass every ``RETENTION_INTERVAL_MS`` while this scheduler leads;
a pass stops between two batches when leadership is lost or the process stops.
:meth:`Retention.plan` is the dry run of ``conveyor prune --dry-run``.

The clock (``clock``) and the pause (``sleep``) are injectable; nothing here reads the time
otherwise.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import TYPE_CHECKING

from conveyor.errors import StoreError
from conveyor.store import DAYS_AHEAD, Pruned, RetentionPolicy

if TYPE_CHECKING:
    from conveyor.runtime import MetricsPublisher
    from conveyor.settings import Settings
    from conveyor.store import Store
    from conveyor.workers.leader import LeaderElection

log = logging.getLogger(__name__)

__all__ = ["PassReport", "Retention", "TenantPlan"]

Clock = Callable[[], datetime]
Sleep = Callable[[float], Awaitable[object]]


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class TenantPlan:
    """What a pass at ``now`` would delete for one tenant (dry run)."""

    policy: RetentionPolicy
    pruned: Pruned


@dataclass(slots=True)
class PassReport:
    """One pass: rows deleted per table, per tenant, batches, seconds."""

    at: datetime
    pruned: Pruned = field(default_factory=Pruned)
    tenants: dict[str, Pruned] = field(default_factory=dict)
    batches: int = 0
    seconds: float = 0.0
    complete: bool = True
    """``False``: stopped before the end (leadership lost, shutting down)."""
    partitions_created: list[str] = field(default_factory=list)
    """PostgreSQL: the partitions this pass created (the days ahead)."""
    partitions_dropped: list[date] = field(default_factory=list)
    """PostgreSQL: the days whose partitions this pass dropped (their rows are counted in
    ``pruned`` and ``tenants``: step runs, timers and ticks only in ``pruned``)."""


class Retention:
    """Runs retention passes on ``store`` (see the module docstring)."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        metrics: MetricsPublisher | None = None,
        clock: Clock = _utcnow,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics
        self.clock = clock
        self.sleep = sleep
        self.batch_size = settings.retention_batch_size
        self.pause_s = settings.retention_pause_ms / 1000.0
        self.last: PassReport | None = None

    async def policies(self) -> list[RetentionPolicy]:
        """Every tenant's limits: its overrides, else the settings."""
        return await self.store.retention.policies(
            retention_s=self.settings.execution_retention,
            max_executions=self.settings.execution_retention_max_per_tenant,
        )

    # --- one pass ----------------------------------------------------------------------------
    async def run_pass(self, *, keep_going: Callable[[], bool] = lambda: True) -> PassReport:
        """Delete everything past retention at ``clock()``, batch by batch; stops early (between
        batches) once ``keep_going()`` is false."""
        started = time.monotonic()
        report = PassReport(at=self.clock())
        service = self.store.retention
        policies = await self.policies()
        await self._partitions(policies, report, keep_going)
        for policy in policies:
            cutoff = await service.cutoff(policy, report.at)
            tenant = Pruned()
            while True:
                if not keep_going():
                    report.complete = False
                    break
                batch = await service.prune_batch(cutoff, self.batch_size)
                if batch.executions == 0 and batch.total == 0:
                    break
                tenant.add(batch)
                report.batches += 1
                self._count(batch)
                if batch.executions < self.batch_size:
                    break
                await self.sleep(self.pause_s)
            if tenant.total:
                report.tenants.setdefault(policy.tenant_id, Pruned()).add(tenant)
                report.pruned.add(tenant)
                log.info("retention.pruned", extra={"tenantId": policy.tenant_id,
                    "retentionS": policy.retention_s, "maxExecutions": policy.max_executions,
                    **tenant.as_dict()})  # fmt: skip
            if not report.complete:
                break
        if report.complete:
            ticks = await self._idle_ticks(policies, report, keep_going)
            report.pruned.schedule_ticks += ticks
        report.seconds = round(time.monotonic() - started, 3)
        self.last = report
        log.info("retention.pass", extra={**report.pruned.as_dict(), "tenants": len(report.tenants),
            "batches": report.batches, "seconds": report.seconds,
            "complete": report.complete})  # fmt: skip
        return report

    async def _partitions(
        self, policies: list[RetentionPolicy], report: PassReport, keep_going: Callable[[], bool]
    ) -> None:
        """PostgreSQL: create the partitions of the days ahead, then drop each day's partitions
        whose executions are all due (:mod:`conveyor.store.partitions`); what is left of a day
        kept goes row by row (the tenant loop)."""
        partitions = self.store.partitions
        if not partitions.enabled:
            return
        report.partitions_created = await partitions.ensure(report.at, DAYS_AHEAD)
        default_s = self.settings.execution_retention
        shortest = min([default_s, *(p.retention_s for p in policies)])
        for day in await partitions.due(report.at, shortest):
            if not keep_going():
                report.complete = False
                return
            dropped = await partitions.drop_if_due(day, report.at, default_s)
            if dropped is None:
                continue
            report.partitions_dropped.append(day)
            rows = Pruned(dropped.executions, dropped.step_runs, dropped.timers,
                          dropped.schedule_ticks)  # fmt: skip
            report.pruned.add(rows)
            self._count(rows)
            for tenant_id, n in dropped.tenants.items():
                report.tenants.setdefault(tenant_id, Pruned()).executions += n
            log.info("retention.partition_dropped", extra={"day": day.isoformat(),
                **rows.as_dict()})  # fmt: skip

    async def _idle_ticks(
        self, policies: list[RetentionPolicy], report: PassReport, keep_going: Callable[[], bool]
    ) -> int:
        """Ticks without an execution, and webhook events no execution received (counted in
        the metric only): of tenants on the setting in one sweep, of tenants with their own
        retention one by one."""
        own = [p for p in policies if p.retention_s != self.settings.execution_retention]
        sweeps: list[tuple[timedelta, str | None, list[str]]] = [
            (timedelta(seconds=self.settings.execution_retention), None, [p.tenant_id for p in own])
        ]
        sweeps += [(timedelta(seconds=p.retention_s), p.tenant_id, []) for p in own]
        total = 0
        for age, tenant_id, exclude in sweeps:
            while keep_going():
                n = await self.store.retention.prune_idle_ticks(
                    report.at - age, self.batch_size, tenant_id=tenant_id, exclude=exclude
                )
                total += n
                if n:
                    report.batches += 1
                    self._metric("schedule_ticks", n)
                if n < self.batch_size:
                    break
                await self.sleep(self.pause_s)
            while keep_going():  # webhook events no execution received (wait steps)
                n = await self.store.events.prune_kept(
                    report.at - age, self.batch_size, tenant_id=tenant_id, exclude=exclude
                )
                if n:
                    report.batches += 1
                    self._metric("events", n)
                    log.info("retention.events_pruned", extra={"tenantId": tenant_id,
                                                               "events": n})  # fmt: skip
                if n < self.batch_size:
                    break
                await self.sleep(self.pause_s)
        return total

    def _count(self, batch: Pruned) -> None:
        for table, rows in batch.as_dict().items():
            self._metric(table, rows)

    def _metric(self, table: str, rows: int) -> None:
        if self.metrics is not None:
            self.metrics.count_pruned(table, rows)

    # --- dry run -----------------------------------------------------------------------------
    async def plan_days(self) -> list[date]:
        """PostgreSQL: the days whose partitions a pass at ``clock()`` would drop whole (their
        rows are in :meth:`plan`'s counts too); nothing is dropped."""
        partitions = self.store.partitions
        if not partitions.enabled:
            return []
        now = self.clock()
        policies = await self.policies()
        default_s = self.settings.execution_retention
        shortest = min([default_s, *(p.retention_s for p in policies)])
        return [
            day
            for day in await partitions.due(now, shortest)
            if await partitions.is_due(day, now, default_s)
        ]

    async def plan(self) -> list[TenantPlan]:
        """Per tenant, what a pass at ``clock()`` would delete (nothing is deleted)."""
        now = self.clock()
        service = self.store.retention
        plans = []
        for policy in await self.policies():
            cutoff = await service.cutoff(policy, now)
            pruned = await service.count(cutoff)
            before = now - timedelta(seconds=policy.retention_s)
            pruned.schedule_ticks += await service.count_idle_ticks(before, policy.tenant_id)
            plans.append(TenantPlan(policy, pruned))
        return plans

    # --- the leader's loop -------------------------------------------------------------------
    async def loop(self, election: LeaderElection, stop: asyncio.Event) -> None:
        """A pass every ``RETENTION_INTERVAL_MS`` while ``election`` leads, until ``stop``."""
        every = self.settings.retention_interval_ms / 1000.0
        while not stop.is_set():
            if not election.is_leader:
                await election.wait_change(every)
                continue
            try:
                await self.run_pass(keep_going=lambda: election.is_leader and not stop.is_set())
            except (StoreError, OSError) as exc:
                log.warning("retention.pass_failed", extra={"error": repr(exc)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every)
