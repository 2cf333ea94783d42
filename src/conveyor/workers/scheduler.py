"""``conveyor scheduler``: materialises cron ticks ahead onto ``workflow.execute.<region>``.

Any number of schedulers may run; one leads (:mod:`conveyor.workers.leader`: a Postgres
session advisory lock when the database is Postgres, else a Redis lock with an owner token).
The leader, every ``SCHEDULER_POLL_INTERVAL_MS``, loads (in batches of 500) the schedules with
a tick due within ``SCHEDULER_LOOKAHEAD_MS``, plans their ticks (misfire policy:
:func:`conveyor.cron.plan_ticks`) and records them with
:meth:`ScheduleService.materialise <conveyor.store.schedules.ScheduleService.materialise>` —
tick rows ``(schedule_id, fire_time)`` (primary key, ``ON CONFLICT DO NOTHING``) and the
executions of the ticks actually written, a few statements per batch, in one transaction. It
then enqueues those executions in bulk as BullMQ *delayed* jobs due at their tick instant (plus
a 2 ms margin: never runnable early), job id = execution id. So a tick becomes runnable on its
instant whatever the number of schedules, not when the scheduler gets to it.

Leader change: the old leader's ticks are rows (the new one skips them); executions it recorded
but may not have enqueued are enqueued again by the new leader as it takes over
(:meth:`ScheduleService.staged`, same job ids: a job already there is left alone), and by the
reconciler (with the delay still due). Missed ticks (beyond the grace) are recorded with outcome
``collapsed``/``skipped``, logged (``scheduler.misfire``) and counted
(``conveyor_scheduler_misfires_total{policy}``). A schedule whose expression cannot be evaluated
is parked with a ``scheduler.schedule_invalid`` warning; the round goes on.

Supervised loops: election, leader loop, reconciler (its own loop: never delays ticks),
heartbeat (``role: scheduler``), metrics. SIGTERM/SIGINT: stop, release the lock (a standby
takes over at its next poll), leave the registry, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import math
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Sequence
from contextlib import AsyncExitStack
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from conveyor.cron import CronSpec, MisfirePolicy, fire_times, next_fire, parse_cron, plan_ticks
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
from conveyor.store import PlannedTicks, asyncpg_dsn
from conveyor.workers.leader import (
    LeaderElection,
    LeaderLock,
    PostgresAdvisoryLock,
    RedisLock,
)
from conveyor.workers.reconcile import Reconciler
from conveyor.workers.retention import Retention

if TYPE_CHECKING:
    from conveyor.store import Execution, Schedule, Store

log = logging.getLogger(__name__)

ROLE = "scheduler"
LOCK_NAME = "scheduler"
_SECOND = timedelta(seconds=1)
_BATCH = 500
"""Schedules loaded, planned and materialised per database round."""
_MAX_ROUNDS = 200
"""Most batches per pass (100,000 schedules); the next pass continues."""
_MAX_AHEAD = 1000
"""Most ticks of one schedule materialised per pass (the window bounds them anyway)."""
_MISSED_RECORD_MAX = 1000
"""Most missed ticks of one schedule recorded individually per misfire."""
STAGE_MARGIN_MS = 2
"""Added to every delay: BullMQ rounds to milliseconds; a job must never run early."""
_ENQUEUE_CHUNK = 500
_SLOW_PASS_S = 2.0
_INITIAL_RATE = 1000.0
"""Ticks per second assumed until a pass of a batch or more was measured (conservative)."""
_RATE_ALPHA = 0.3
_LEAD_FACTOR = 2.0
"""Start recording upcoming ticks this many times the time recording them takes ahead."""
_WINDOW_READ_S = 1.0
"""A pass longer than this is logged (``scheduler.slow_pass``): the window may be too short."""


@functools.lru_cache(maxsize=4096)
def _spec(cron: str, timezone: str) -> CronSpec:
    return parse_cron(cron, timezone)


@functools.lru_cache(maxsize=4096)
def _next(cron: str, timezone: str, after: datetime) -> datetime:
    """The fire time after ``after``: thousands of schedules share an expression (every minute)
    and, at a boundary, the same instant — one evaluation serves them all."""
    return next_fire(_spec(cron, timezone), after)


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
    key = keys.leader(settings.queue_prefix, ROLE, cluster=settings.uses_cluster)
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
        self.lookahead_s = settings.scheduler_lookahead_ms / 1000
        self.lookahead_max_s = settings.scheduler_lookahead_max_ms / 1000
        self.window_s = self.lookahead_s
        """This pass's look-ahead (:meth:`window`): the setting, or longer before a burst."""
        self.rate = _INITIAL_RATE
        """Ticks recorded and staged per second, measured on passes of a batch or more."""
        self._window_read = -math.inf
        self._ahead: deque[float] = deque()
        """Instants (epoch s) of the ticks staged ahead, in staging order."""
        self._misfire_times: deque[tuple[float, int]] = deque()

    # --- the leader loop -----------------------------------------------------------------
    async def lead_loop(self) -> None:
        """While leading: every poll interval, materialise the ticks due within the window.
        On taking over, first re-enqueue what earlier leaders recorded (:meth:`restage`)."""
        restaged_for: float | None = None
        while not self.supervisor.stopping:
            if not self.election.is_leader:
                await self.election.wait_change(self.poll_s)
                continue
            round_end = time.monotonic() + self.poll_s
            self.election.changed.clear()
            try:
                if restaged_for != self.election.leader_since:
                    await self.restage()
                    restaged_for = self.election.leader_since
                await self.fire_due(await self.window())
            except (StoreError, QueueError, OSError) as exc:
                log.warning("scheduler.round_failed", extra={"error": repr(exc)})
            left = round_end - time.monotonic()
            if left > 0:
                await self.election.wait_change(left)

    async def reconcile_loop(self) -> None:
        """The reconciler, on its own loop (a slow pass never delays a tick)."""
        every = self.settings.reconcile_interval_ms / 1000
        while not self.supervisor.stopping:
            if not self.election.is_leader:
                await self.election.wait_change(self.poll_s)
                continue
            try:
                await self.reconciler.run_once()
            except (StoreError, QueueError, OSError) as exc:
                log.warning("scheduler.reconcile_failed", extra={"error": repr(exc)})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.supervisor.stop_event.wait(), every)

    async def restage(self) -> int:
        """Enqueue again the still-queued executions of ticks recorded from ``now - grace``
        on (a previous leader may have died between recording and enqueueing them). Same job
        ids: a job that is already on the queue is left alone. Returns executions sent."""
        since = datetime.now(UTC) - max(self.grace, timedelta(seconds=60))
        staged = await self.store.schedules.staged(since)
        if staged:
            await self._stage([(e.scheduled_for, e) for e in staged if e.scheduled_for])
            log.info("scheduler.restaged", extra={"executions": len(staged)})
        return len(staged)

    async def window(self) -> float:
        """The look-ahead of this pass: ``SCHEDULER_LOOKAHEAD_MS``, or longer when recording
        the ticks coming up (every schedule with a tick within ``SCHEDULER_LOOKAHEAD_MAX_MS``)
        at the measured rate would take more than half the window — so a minute boundary of
        30,000 schedules starts being recorded early enough to be staged before its instant.
        The count is one index range scan, read at most once a second."""
        if self.lookahead_max_s <= self.lookahead_s:
            return self.lookahead_s
        now = time.monotonic()
        if now - self._window_read >= _WINDOW_READ_S:
            self._window_read = now
            horizon = datetime.now(UTC) + timedelta(seconds=self.lookahead_max_s)
            upcoming = await self.store.schedules.count_due(horizon)
            needed = _LEAD_FACTOR * upcoming / self.rate
            self.window_s = min(self.lookahead_max_s, max(self.lookahead_s, needed))
        return self.window_s

    def _measured(self, ticks: int, seconds: float) -> None:
        if ticks >= _BATCH and seconds > 0:
            sample = ticks / seconds
            self.rate = sample if self.rate == _INITIAL_RATE else (
                _RATE_ALPHA * sample + (1 - _RATE_ALPHA) * self.rate)  # fmt: skip

    async def fire_due(self, window_s: float) -> int:
        """Materialise the ticks due within ``window_s`` (batches of schedules, each one
        transaction), enqueue them as delayed jobs due at their instants. Returns ticks
        recorded with an execution."""
        fired = 0
        started = time.monotonic()
        staging: asyncio.Task[None] | None = None  # one batch enqueued while the next is recorded
        try:
            for _ in range(_MAX_ROUNDS):
                if not self.election.is_leader or self.supervisor.stopping:
                    break
                now = datetime.now(UTC)
                horizon = now + timedelta(seconds=window_s)
                due = await self.store.schedules.due(horizon, limit=_BATCH)
                plans = [p for s in due if (p := await self._plan(s, now, horizon)) is not None]
                ticks, moved = await self.store.schedules.materialise(plans)
                if not self.election.is_leader:
                    break  # recorded: whoever leads now re-stages them (restage)
                if staging is not None:
                    await staging
                items = [(t.fire_time, t.execution) for t in ticks if t.execution]
                staging = asyncio.create_task(self._stage(items), name="scheduler.stage")
                fired += len(items)
                for t in ticks:
                    self._observe(t.fire_time, now)
                if len(due) < _BATCH or not moved:
                    break
        finally:
            if staging is not None:
                await staging
        took = time.monotonic() - started
        self._measured(fired, took)
        if took > _SLOW_PASS_S:
            log.warning("scheduler.slow_pass", extra={"ticks": fired, "seconds": round(took, 3),
                                                      "windowS": window_s})  # fmt: skip
        return fired

    def _policy(self, schedule: Schedule) -> MisfirePolicy:
        policy = schedule.misfire_policy or self.settings.scheduler_misfire_policy
        return "skip" if policy == "skip" else "fire_once"

    async def _plan(
        self, schedule: Schedule, now: datetime, horizon: datetime
    ) -> PlannedTicks | None:
        """The ticks of ``schedule`` up to ``horizon``: missed ones under its misfire policy
        (each recorded), then every tick of the window; ``None`` if it had to be parked."""
        assert schedule.next_fire_at is not None
        cursor = schedule.next_fire_at - _SECOND
        policy = self._policy(schedule)
        try:
            spec = _spec(schedule.cron, schedule.timezone)
            if schedule.next_fire_at > now:  # the common case: not due yet, nothing missed
                return self._plan_ahead(schedule, horizon)
            plan = plan_ticks(spec, cursor, now, policy=policy, grace=self.grace)
            ticks: list[tuple[datetime, str]] = []
            if plan.misfired:
                ticks = self._misfire(schedule, spec, cursor, plan.cursor, policy, bool(plan.fire))
            else:
                ticks = [(at, "fired") for at in plan.fire]
            for at in fire_times(spec, plan.cursor, horizon):
                ticks.append((at, "fired"))
                if len(ticks) >= _MAX_AHEAD:
                    break
            next_at = next_fire(spec, ticks[-1][0]) if ticks else plan.next_at
        except CronInvalid as exc:
            # Saved before validation refused it (an impossible date such as Feb 30): park
            # it (no next fire time) so no round loads it again; saving a valid cron revives it.
            log.warning("scheduler.schedule_invalid", extra={"scheduleId": schedule.id,
                                                             "error": str(exc)})  # fmt: skip
            await self.store.schedules.skip(schedule, next_fire_at=None)
            return None
        return PlannedTicks(schedule=schedule, ticks=ticks, next_fire_at=next_at)

    @staticmethod
    def _plan_ahead(schedule: Schedule, horizon: datetime) -> PlannedTicks:
        """Ticks of a schedule not due yet: its ``next_fire_at`` (a fire time by construction)
        and the following ones up to ``horizon`` — cron evaluations cached per (expression, zone, instant)."""
        assert schedule.next_fire_at is not None
        ticks: list[tuple[datetime, str]] = []
        at = schedule.next_fire_at
        while at <= horizon and len(ticks) < _MAX_AHEAD:
            ticks.append((at, "fired"))
            at = _next(schedule.cron, schedule.timezone, at)
        return PlannedTicks(schedule=schedule, ticks=ticks, next_fire_at=at)

    def _misfire(
        self,
        schedule: Schedule,
        spec: CronSpec,
        cursor: datetime,
        latest: datetime,
        policy: MisfirePolicy,
        fire_latest: bool,
    ) -> list[tuple[datetime, str]]:
        """The missed ticks in ``(cursor, latest]`` as recorded: ``collapsed`` (fire_once; the
        latest ``fired``) or ``skipped``. At most :data:`_MISSED_RECORD_MAX` older ones are
        recorded one by one (the oldest); the log line says when more were missed."""
        label = "collapsed" if policy == "fire_once" else "skipped"
        missed: list[tuple[datetime, str]] = []
        for at in fire_times(spec, cursor, latest - _SECOND):
            if len(missed) >= _MISSED_RECORD_MAX:
                break
            missed.append((at, label))
        recorded = len(missed) + (0 if fire_latest else 1)
        self._count_misfires(policy, recorded)
        log.warning("scheduler.misfire", extra={
            "scheduleId": schedule.id, "policy": policy, "missedSince": _iso(cursor + _SECOND),
            "latest": _iso(latest), "firing": _iso(latest) if fire_latest else None,
            "recorded": recorded, "truncated": len(missed) >= _MISSED_RECORD_MAX,
        })  # fmt: skip
        return [*missed, (latest, "fired" if fire_latest else "skipped")]

    def _count_misfires(self, policy: MisfirePolicy, ticks: int) -> None:
        self.misfires += ticks
        self._misfire_times.append((time.monotonic(), ticks))
        self.metrics.count_scheduler_misfires(policy, ticks)

    async def _stage(self, items: Sequence[tuple[datetime, Execution]]) -> None:
        """Enqueue executions as delayed jobs runnable at (never before) their tick instant;
        a tick already due is enqueued now. A queue failure is logged: the executions are
        recorded, the reconciler (or the next leader's restage) enqueues them."""
        now_ms = time.time() * 1000
        payloads, delays = [], []
        for fire_time, execution in items:
            ahead_ms = math.ceil(fire_time.timestamp() * 1000 - now_ms)
            payloads.append(payload_for(execution, reason="schedule"))
            delays.append(ahead_ms + STAGE_MARGIN_MS if ahead_ms > 0 else 0)
            self._ahead.append(fire_time.timestamp())
        for i in range(0, len(payloads), _ENQUEUE_CHUNK):
            chunk = payloads[i : i + _ENQUEUE_CHUNK]
            try:
                await self.dispatcher.enqueue_many(chunk, delays_ms=delays[i : i + _ENQUEUE_CHUNK])
            except QueueError as exc:  # recorded: the reconciler / restage enqueues them
                log.warning("scheduler.enqueue_failed", extra={"executions": len(chunk),
                                                              "error": repr(exc)})  # fmt: skip

    def _observe(self, fire_time: datetime, staged_at: datetime) -> None:
        """A tick put on the queue at ``staged_at``: its lag is how late that was (0 ahead)."""
        lag = max(0.0, (staged_at - fire_time).total_seconds())
        self.metrics.observe_scheduler_lag(lag)
        self.lag_ms = round(lag * 1000, 3)
        self.ticks += 1
        if self.last_tick is None or fire_time > self.last_tick:
            self.last_tick = fire_time

    def ticks_in_window(self) -> int:
        """Ticks staged ahead whose instant is still to come."""
        now = time.time()
        while self._ahead and self._ahead[0] <= now:
            self._ahead.popleft()
        return sum(1 for at in self._ahead if at > now)

    def misfires_per_minute(self) -> int:
        """Misfired ticks recorded in the last 60 s."""
        cutoff = time.monotonic() - 60
        while self._misfire_times and self._misfire_times[0][0] < cutoff:
            self._misfire_times.popleft()
        return sum(n for _at, n in self._misfire_times)

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
            "misfiresPerMinute": self.misfires_per_minute(),
            "ticksInWindow": self.ticks_in_window(),
            "lookaheadMs": self.settings.scheduler_lookahead_ms,
            "windowMs": round(self.window_s * 1000),
            "ticksPerSecond": round(self.rate),
            "reconciled": self.reconciler.recovered,
        }

    # --- lifecycle -------------------------------------------------------------------------
    async def serve(self) -> int:
        sup = self.supervisor
        sup.spawn("election", self.election.run())
        sup.spawn("lead", self.lead_loop())
        sup.spawn("reconcile", self.reconcile_loop())
        retention = Retention(self.store, self.settings, metrics=self.metrics)  # own loop
        sup.spawn("retention", retention.loop(self.election, sup.stop_event))
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
