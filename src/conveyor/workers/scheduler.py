"""``conveyor scheduler``: promotes due cron schedules onto ``workflow.execute.<region>``.

Any number of schedulers may run; one leads (:mod:`conveyor.workers.leader`: a Postgres
session advisory lock when the database is Postgres, else a Redis lock with an owner token).
The leader, every ``SCHEDULER_POLL_INTERVAL_MS``, loads the schedules due within the next
interval, sleeps until each tick's instant and fires it with
:meth:`ScheduleService.fire <conveyor.store.schedules.ScheduleService.fire>`: the tick row
``(schedule_id, fire_time)`` (primary key) and its execution are written in one transaction,
so a tick fires once even if two processes both believe they lead. The execution is then
enqueued with job id = its execution id (the id recorded with the tick; the reconciler uses
the same one). Which missed ticks fire is the misfire policy (:func:`conveyor.cron.plan_ticks`).
A schedule whose expression cannot be evaluated (saved before validation refused it, e.g. one
that never fires) is parked with a ``scheduler.schedule_invalid`` warning; the round goes on.
The leader also runs the reconciler (:mod:`conveyor.workers.reconcile`).

Supervised loops: election, leader loop, heartbeat (``role: scheduler`` with ``strategy``,
``lockHeld``, ``holderId``, ``lastTick``, ``lagMs``), metrics. SIGTERM/SIGINT: stop, release
the lock (a standby takes over at its next poll), leave the registry, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import os
import socket
import time
import uuid
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from itertools import groupby
from typing import TYPE_CHECKING, Any

from conveyor.cron import CronSpec, MisfirePolicy, parse_cron, plan_ticks
from conveyor.dispatch import ExecutionDispatcher, keys, payload_for
from conveyor.errors import (
    CronInvalid,
    QueueError,
    StoreError,
)
from conveyor.queue import QueueFactory
from conveyor.runtime import (
    Heartbeat,
    MetricsPublisher,
    Supervisor,
    heartbeat_loop,
    run_loop,
    serve_checked,
)
from conveyor.settings import Settings
from conveyor.store import asyncpg_dsn
from conveyor.workers.leader import (
    LeaderElection,
    LeaderLock,
    PostgresAdvisoryLock,
    RedisLock,
)
from conveyor.workers.reconcile import Reconciler
from conveyor.workers.timer_wheel import sleep_until

if TYPE_CHECKING:
    from conveyor.store import Execution, Schedule, Store

log = logging.getLogger(__name__)

ROLE = "scheduler"
LOCK_NAME = "scheduler"
_FIRE_CONCURRENCY = 16
_SECOND = timedelta(seconds=1)


@functools.lru_cache(maxsize=4096)
def _spec(cron: str, timezone: str) -> CronSpec:
    return parse_cron(cron, timezone)


def _iso(at: datetime | None) -> str | None:
    return None if at is None else at.isoformat(timespec="milliseconds")


def make_lock(
    settings: Settings, queues: QueueFactory, holder: str, *, postgres: bool
) -> LeaderLock:
    """The lock of the configured strategy (``auto``: Postgres when the database is)."""
    strategy = settings.scheduler_lock_strategy
    if strategy == "auto":
        strategy = "postgres" if postgres else "redis"
    if strategy == "postgres":
        if not postgres:
            raise ValueError("SCHEDULER_LOCK_STRATEGY=postgres needs a PostgreSQL DATABASE_URL")
        return PostgresAdvisoryLock(asyncpg_dsn(settings.database_url), LOCK_NAME, holder)
    key = keys.leader(settings.queue_prefix, ROLE)
    return RedisLock(queues.redis, key, holder, ttl_ms=settings.scheduler_lock_ttl_ms)


class Scheduler:
    """The running process (everything that exists once start-up checks passed)."""

    def __init__(
        self, settings: Settings, store: Store, queues: QueueFactory, supervisor: Supervisor
    ) -> None:
        self.settings = settings
        self.store = store
        self.queues = queues
        self.supervisor = supervisor
        self.holder = f"{ROLE}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.lock = make_lock(settings, queues, self.holder, postgres=store.is_postgres)
        poll_s = settings.scheduler_poll_interval_ms / 1000
        renew_s = settings.scheduler_lock_ttl_ms / 4000 if self.lock.strategy == "redis" else poll_s
        self.election = LeaderElection(self.lock, poll_s=poll_s, renew_s=renew_s)
        self.poll_s = poll_s
        self.grace = timedelta(milliseconds=settings.scheduler_misfire_grace_ms)
        self.dispatcher = ExecutionDispatcher(queues, settings)
        self.metrics = MetricsPublisher(queues)
        self.reconciler = Reconciler(store, queues, self.dispatcher, settings)
        self.heartbeat = Heartbeat(
            queues, role=ROLE, settings=settings, info_fn=self.info, process_id=self.holder
        )
        self.last_tick: datetime | None = None
        self.lag_ms: float | None = None
        self.ticks = 0
        self.misfires = 0

    # --- the leader loop -----------------------------------------------------------------
    async def lead_loop(self) -> None:
        """While leading: fire due ticks every poll interval, reconcile every few seconds."""
        reconcile_every = self.settings.reconcile_interval_ms / 1000
        next_reconcile = 0.0
        while not self.supervisor.stopping:
            if not self.election.is_leader:
                await self.election.wait_change(self.poll_s)
                continue
            round_end = time.monotonic() + self.poll_s
            self.election.changed.clear()
            try:
                await self.fire_due(self.poll_s)
                if self.election.is_leader and time.monotonic() >= next_reconcile:
                    next_reconcile = time.monotonic() + reconcile_every
                    await self.reconciler.run_once()
            except (StoreError, QueueError, OSError) as exc:
                log.warning("scheduler.round_failed", extra={"error": repr(exc)})
            left = round_end - time.monotonic()
            if left > 0:
                await self.election.wait_change(left)

    async def fire_due(self, window_s: float) -> int:
        """Fire the ticks due within ``window_s``, each at its instant. Returns ticks fired."""
        horizon = datetime.now(UTC) + timedelta(seconds=window_s)
        due = await self.store.schedules.due(horizon, limit=500)
        fired = 0
        gate = asyncio.Semaphore(_FIRE_CONCURRENCY)

        async def one(schedule: Schedule) -> int:
            async with gate:
                return await self.fire_schedule(schedule)

        for at, group in groupby(due, key=lambda s: s.next_fire_at):
            assert at is not None
            reached = await sleep_until(at.timestamp(), self.election.changed)
            if not reached or not self.election.is_leader:
                break  # leadership changed: stop acting at once
            fired += sum(await asyncio.gather(*(one(s) for s in group)))
        return fired

    def _policy(self, schedule: Schedule) -> MisfirePolicy:
        policy = schedule.misfire_policy or self.settings.scheduler_misfire_policy
        return "skip" if policy == "skip" else "fire_once"

    async def fire_schedule(self, schedule: Schedule) -> int:
        """Fire the due ticks of one schedule under its misfire policy."""
        assert schedule.next_fire_at is not None
        try:
            spec = _spec(schedule.cron, schedule.timezone)
            plan = plan_ticks(
                spec, schedule.next_fire_at - _SECOND, datetime.now(UTC),
                policy=self._policy(schedule), grace=self.grace,
            )  # fmt: skip
        except CronInvalid as exc:
            # Saved before validation refused it (an impossible date such as Feb 30): park
            # it (no next fire time) so no round loads it again; saving a valid cron revives it.
            log.warning("scheduler.schedule_invalid", extra={"scheduleId": schedule.id,
                                                             "error": str(exc)})  # fmt: skip
            await self.store.schedules.skip(schedule, next_fire_at=None)
            return 0
        if plan.misfired:
            self.misfires += 1
            log.warning("scheduler.misfire", extra={
                "scheduleId": schedule.id, "policy": self._policy(schedule),
                "missedSince": _iso(schedule.next_fire_at), "firing": _iso(plan.cursor)
                if plan.fire else None,
            })  # fmt: skip
        if not plan.fire:
            if plan.next_at != schedule.next_fire_at:
                await self.store.schedules.skip(schedule, next_fire_at=plan.next_at)
            return 0
        fired = 0
        for i, fire_time in enumerate(plan.fire):
            if not self.election.is_leader:
                break
            following = plan.fire[i + 1] if i + 1 < len(plan.fire) else plan.next_at
            tick = await self.store.schedules.fire(schedule, fire_time, next_fire_at=following)
            if tick is None:
                log.info("scheduler.tick_duplicate", extra={"scheduleId": schedule.id,
                                                           "fireTime": _iso(fire_time)})  # fmt: skip
                continue
            fired += 1
            if tick.execution is not None:
                await self._enqueue(tick.execution)
            self._observe(fire_time)
            log.info("scheduler.tick", extra={
                "scheduleId": schedule.id, "fireTime": _iso(fire_time),
                "executionId": tick.execution.id if tick.execution else None, "lagMs": self.lag_ms,
            })  # fmt: skip
        return fired

    async def _enqueue(self, execution: Execution) -> None:
        try:
            await self.dispatcher.enqueue(payload_for(execution, reason="schedule"))
        except QueueError as exc:  # the execution is committed: the reconciler enqueues it
            log.warning("scheduler.enqueue_failed", extra={"executionId": execution.id,
                                                          "error": repr(exc)})  # fmt: skip

    def _observe(self, fire_time: datetime) -> None:
        lag = max(0.0, time.time() - fire_time.timestamp())
        self.metrics.observe_scheduler_lag(lag)
        self.lag_ms = round(lag * 1000, 3)
        self.ticks += 1
        if self.last_tick is None or fire_time > self.last_tick:
            self.last_tick = fire_time

    # --- status ----------------------------------------------------------------------------
    async def info(self) -> dict[str, Any]:
        """The ``scheduler`` part of the heartbeat document."""
        holder: str | None = self.holder if self.election.is_leader else None
        if holder is None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    holder = await self.lock.current_holder()
        since = self.election.leader_since
        return {
            "strategy": self.lock.strategy,
            "preferredStrategy": "postgres" if self.store.is_postgres else "redis",
            "lockHeld": self.election.is_leader,
            "holderId": holder,
            "leaderSince": _iso(datetime.fromtimestamp(since, UTC)) if since else None,
            "lastTick": _iso(self.last_tick),
            "lagMs": self.lag_ms,
            "ticksFired": self.ticks,
            "misfires": self.misfires,
            "reconciled": self.reconciler.recovered,
        }

    # --- lifecycle -------------------------------------------------------------------------
    async def serve(self) -> int:
        sup = self.supervisor
        sup.spawn("election", self.election.run())
        sup.spawn("lead", self.lead_loop())
        sup.spawn("heartbeat", heartbeat_loop(self.heartbeat, sup.stop_event))
        sup.spawn("metrics", self.metrics.run())
        log.info("scheduler.started", extra={"id": self.holder, "strategy": self.lock.strategy})
        await sup.wait()
        await self.drain()
        if sup.failure is not None:
            log.error("scheduler.exit_failed", extra={"error": repr(sup.failure)})
            return 1
        return 0

    async def drain(self) -> None:
        """Stop acting, give the lock up (a standby takes over), leave the registry."""
        await self.supervisor.cancel_all(5.0)
        await self.election.release()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.heartbeat.remove(), timeout=2.0)
        log.info("scheduler.stopped", extra={"ticksFired": self.ticks, "id": self.holder})


async def serve(settings: Settings) -> int:
    """Check, start, serve, drain. Returns the process exit code."""

    supervisor = Supervisor(ROLE)

    async def start(stack: AsyncExitStack, store: Store, queues: QueueFactory) -> int:
        try:
            scheduler = Scheduler(settings, store, queues, supervisor)
        except ValueError as exc:
            log.error("scheduler.config_invalid: %s", exc)
            return 2
        return await scheduler.serve()

    return await serve_checked(settings, ROLE, supervisor, start, pool_size=4)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """``conveyor scheduler``."""
    return run_loop(serve(settings))


if __name__ == "__main__":
    from conveyor.runtime import entry

    entry(run, "scheduler")
