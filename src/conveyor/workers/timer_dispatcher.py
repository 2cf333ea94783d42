"""``conveyor timers``: fires the durable timers that ``delay`` steps and retry waits create.

Timers live in the database (``timers`` table). Every ``TIMER_POLL_INTERVAL_MS`` this process
claims the pending timers due within ``TIMER_LOOKAHEAD_MS`` (:meth:`TimerService.claim`:
Postgres ``FOR UPDATE SKIP LOCKED``, so any number of dispatchers share the work), holds them
in memory and enqueues each on ``workflow.execute.<region>`` with job id ``timer:<id>`` at its
due instant — never before it (see :mod:`conveyor.workers.timer_wheel`) — then marks it fired.
On SQLite the dispatchers elect one active instance with the Redis lock.

Supervised loops: claim, fire, mark, heartbeat (``role: timers`` with ``nextDueAt``,
``backlog``, ``lagMs``), metrics (timer lag), and the election on SQLite. SIGTERM/SIGINT:
stop claiming, flush the fired marks, give the unfired claims back so another dispatcher takes
them at once, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import math
import os
import socket
import time
import uuid
from contextlib import AsyncExitStack
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from conveyor.dispatch import ExecutionDispatcher, keys, payload_for
from conveyor.errors import QueueError, StoreError
from conveyor.queue import Queue, QueueFactory
from conveyor.runtime import (
    Heartbeat,
    MetricsPublisher,
    Supervisor,
    bounded,
    freeze_startup_heap,
    heartbeat_loop,
    run_loop,
    serve_checked,
)
from conveyor.settings import Settings
from conveyor.workers.leader import LeaderElection, RedisLock
from conveyor.workers.timer_wheel import CLAIM_MARGIN_S, TimerWheel

if TYPE_CHECKING:
    from conveyor.store import Store, Timer

log = logging.getLogger(__name__)

ROLE = "timers"
_MARK_BATCH_S = 0.25
_STAGE_MIN_S = 0.1
"""Timers due sooner than this are not staged ahead (enqueued at the instant instead)."""
_STAGE_CONCURRENCY = 1
"""Staging runs one enqueue at a time so it never queues up ahead of a due timer."""
_STAGE_MARGIN_MS = 2
_RETRY_S = 1.0


_LATE_S = 0.05
"""A timer fired later than this is logged (debug: ``timers.late``)."""


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _iso(at: datetime | float | None) -> str | None:
    if at is None:
        return None
    if isinstance(at, float):
        at = datetime.fromtimestamp(at, UTC)
    return at.isoformat(timespec="milliseconds")


class TimerDispatcher:
    """The running process (everything that exists once start-up checks passed)."""

    def __init__(
        self, settings: Settings, store: Store, queues: QueueFactory, supervisor: Supervisor
    ) -> None:
        self.settings = settings
        self.store = store
        self.queues = queues
        self.supervisor = supervisor
        host, pid = socket.gethostname(), os.getpid()
        self.owner = f"{ROLE}-{host}-{pid}-{uuid.uuid4().hex[:6]}"
        self.dispatcher = ExecutionDispatcher(queues, settings)
        self.metrics = MetricsPublisher(queues)
        self.wheel: TimerWheel[Timer] = TimerWheel(self._fire, retry_s=_RETRY_S)
        self.heartbeat = Heartbeat(
            queues, role=ROLE, settings=settings, info_fn=self.info, process_id=self.owner
        )
        self.election: LeaderElection | None = None
        if not store.is_postgres:  # SQLite: one active dispatcher, chosen by the Redis lock
            ttl = settings.scheduler_lock_ttl_ms
            lock_key = keys.leader(settings.queue_prefix, ROLE, cluster=settings.uses_cluster)
            lock = RedisLock(queues.redis, lock_key, self.owner, ttl_ms=ttl)
            self.election = LeaderElection(
                lock, poll_s=settings.scheduler_poll_interval_ms / 1000, renew_s=ttl / 4000
            )
        self._marks: list[str] = []
        self._staged: set[str] = set()
        self._marked = asyncio.Event()
        self.last_lag_ms: float | None = None
        self.last_fired_at: float | None = None

    @property
    def active(self) -> bool:
        return self.election is None or self.election.is_leader

    # --- the loops -----------------------------------------------------------------------
    async def claim_loop(self) -> None:
        """Claim the timers due within the look-ahead window, every poll interval."""
        s = self.settings
        poll = s.timer_poll_interval_ms / 1000
        horizon = s.timer_lookahead_ms / 1000
        limit = s.timer_batch_size
        while not self.supervisor.stopping:
            got = 0
            if self.active and len(self.wheel) < 4 * limit:
                try:
                    t0 = time.perf_counter()
                    claimed = await self.store.timers.claim(
                        datetime.now(UTC),
                        owner=self.owner,
                        horizon_s=horizon,
                        claim_ttl_s=horizon + CLAIM_MARGIN_S,
                        limit=limit,
                    )
                    t1 = time.perf_counter()
                    fresh = [t for t in claimed if t.id not in self.wheel]
                    got = self.wheel.add(fresh)
                    await self._stage(fresh)
                    if claimed:
                        log.debug("timers.claimed", extra={
                            "timers": len(claimed), "new": got, "claimMs": _ms(t1 - t0),
                            "stageMs": _ms(time.perf_counter() - t1)})  # fmt: skip
                except StoreError as exc:
                    log.warning("timers.claim_failed", extra={"error": repr(exc)})
                    await self.supervisor.pause(_RETRY_S)
            if got < limit:  # a full batch means a backlog: claim again at once
                await self.supervisor.pause(poll)

    async def _stage(self, timers: list[Timer]) -> None:
        """Put soon-due timers on the queue ahead of time as delayed jobs (``timer:<id>``).

        At the due instant :meth:`_fire` only promotes the job (one short round trip); if this
        process dies first, BullMQ itself runs the delayed job (later, but never early).
        """
        soon = time.time() + _STAGE_MIN_S
        todo = [t for t in timers if t.due_at.timestamp() > soon]
        gate = asyncio.Semaphore(_STAGE_CONCURRENCY)

        async def stage(timer: Timer) -> None:
            # BullMQ rounds its clock to the millisecond (its own promotion may act up to ~1 ms
            # early): the margin keeps even that fallback path from running a timer early.
            delay_ms = math.ceil((timer.due_at.timestamp() - time.time()) * 1000) + _STAGE_MARGIN_MS
            if delay_ms <= _STAGE_MARGIN_MS:
                return
            async with gate:
                try:
                    await self.dispatcher.enqueue(
                        payload_for(timer, reason="timer"), job_id=timer.job_id, delay_ms=delay_ms
                    )
                except QueueError as exc:
                    log.warning("timers.stage_failed", extra={"timerId": timer.id,
                                                              "error": repr(exc)})  # fmt: skip
                    return
            self._staged.add(timer.id)

        await asyncio.gather(*(stage(t) for t in todo))

    async def _fire(self, timer: Timer) -> None:
        """At (never before) the due instant: promote the staged job, or enqueue it now."""
        promoted = False
        begin = time.time()
        staged = timer.id in self._staged
        if staged:
            promoted = await self.queue(timer.region).promote(timer.job_id)
        if not promoted:  # not staged, or already run by BullMQ: a duplicate add is a no-op
            await self.dispatcher.enqueue(payload_for(timer, reason="timer"), job_id=timer.job_id)
        self._staged.discard(timer.id)
        now = time.time()
        lag = max(0.0, now - timer.due_at.timestamp())
        if lag > _LATE_S:  # where the lag came from: before the call (wake-up) or in it
            log.debug("timers.late", extra={
                "timerId": timer.id, "lagMs": _ms(lag),
                "startMs": _ms(begin - timer.due_at.timestamp()), "callMs": _ms(now - begin),
                "staged": staged, "promoted": promoted})  # fmt: skip
        self.metrics.observe_timer_lag(lag)
        self.last_lag_ms = round(lag * 1000, 3)
        self.last_fired_at = now
        self._marks.append(timer.id)
        self._marked.set()

    def queue(self, region: str) -> Queue:
        return self.dispatcher.queue(region)

    async def mark_loop(self) -> None:
        """Mark fired timers in batches (off the firing path)."""
        sup = self.supervisor
        while not sup.stopping:
            marked = asyncio.ensure_future(self._marked.wait())
            stop = asyncio.ensure_future(sup.stop_event.wait())
            await asyncio.wait([marked, stop], return_when=asyncio.FIRST_COMPLETED)
            marked.cancel()
            stop.cancel()
            if sup.stopping:
                return  # the drain flushes what is left, outside any cancelled transaction
            await sup.pause(_MARK_BATCH_S)
            self._marked.clear()
            if not await self.flush_marks():
                await sup.pause(_RETRY_S)
                self._marked.set()

    async def flush_marks(self) -> bool:
        batch, self._marks = self._marks, []
        if not batch:
            return True
        t0 = time.perf_counter()
        try:
            await self.store.timers.mark_fired(batch, owner=self.owner, at=datetime.now(UTC))
        except StoreError as exc:
            log.warning("timers.mark_failed", extra={"error": repr(exc), "timers": len(batch)})
            self._marks[:0] = batch
            return False
        log.debug("timers.marked", extra={"timers": len(batch),
                                          "ms": _ms(time.perf_counter() - t0)})  # fmt: skip
        return True

    async def info(self) -> dict[str, Any]:
        """The ``timers`` part of the heartbeat document."""
        next_due: datetime | None = None
        backlog: int | None = None
        with contextlib.suppress(StoreError, TimeoutError, OSError):
            async with asyncio.timeout(2.0):
                next_due = await self.store.timers.next_due_at()
                backlog = await self.store.timers.backlog(datetime.now(UTC))
        return {
            "strategy": "skip-locked" if self.election is None else "redis",
            "lockHeld": self.active,
            "nextDueAt": _iso(next_due),
            "backlog": backlog,
            "lagMs": self.last_lag_ms,
            "held": len(self.wheel),
            "fired": self.wheel.fired,
            "lastFiredAt": _iso(self.last_fired_at),
        }

    # --- lifecycle -----------------------------------------------------------------------
    async def serve(self) -> int:
        sup = self.supervisor
        # Everything allocated at start-up (modules, pools) is long-lived: keep it out of the
        # collector's way so a full collection cannot stall a due timer.
        freeze_startup_heap()
        if self.election is not None:
            sup.spawn("election", self.election.run())
        sup.spawn("claim", self.claim_loop())
        sup.spawn("fire", self.wheel.run())
        sup.spawn("mark", self.mark_loop())
        sup.spawn("heartbeat", heartbeat_loop(self.heartbeat, sup.stop_event))
        sup.spawn("metrics", self.metrics.run())
        log.info(
            "timers.started",
            extra={
                "id": self.owner,
                "strategy": "skip-locked" if self.election is None else "redis",
                "lookaheadMs": self.settings.timer_lookahead_ms,
                "pollMs": self.settings.timer_poll_interval_ms,
            },
        )
        await sup.wait()
        await self.drain()
        if sup.failure is not None:
            log.error("timers.exit_failed", extra={"error": repr(sup.failure)})
            return 1
        return 0

    async def drain(self) -> None:
        """Stop firing, hand the lead over, record what fired, give the rest back, leave the
        registry. Claim and mark end between transactions (never cancelled inside one), and
        every later step is bounded, so the whole drain stays within a few seconds."""
        sup = self.supervisor
        await sup.finish(["claim", "mark"], 2.0)
        await sup.cancel_all(2.0)
        if self.election is not None:  # the standby may start at once: claims stay fenced
            await self.election.release()
        await bounded("flush marks", self.flush_marks(), 2.0)
        held = self.wheel.held_ids()
        released = await bounded(
            "release claims", self.store.timers.release(held, owner=self.owner), 2.0
        )
        await bounded("leave registry", self.heartbeat.remove(), 1.0)
        log.info(
            "timers.stopped",
            extra={
                "fired": self.wheel.fired,
                "released": released or 0,
                "failed": self.wheel.failed,
            },
        )


async def serve(settings: Settings) -> int:
    """Check, start, serve, drain. Returns the process exit code."""

    supervisor = Supervisor(ROLE)

    async def start(stack: AsyncExitStack, store: Store, queues: QueueFactory) -> int:
        return await TimerDispatcher(settings, store, queues, supervisor).serve()

    return await serve_checked(settings, ROLE, supervisor, start, pool_size=4)


def run(args: argparse.Namespace, settings: Settings) -> int:
    """``conveyor timers``."""
    return run_loop(serve(settings))


if __name__ == "__main__":
    from conveyor.runtime import entry

    entry(run, "timers")
