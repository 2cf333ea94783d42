"""Durable timers: claiming from the database and firing each at its exact instant.

Protocol (``docs/scheduling.md`` has the failure analysis):

1. **Claim** (every ``TIMER_POLL_INTERVAL_MS``): pending timers due within the look-ahead
   window whose claim is free or expired get ``claimed_by = <this dispatcher>`` and
   ``claimed_until = horizon + margin`` in one statement (Postgres: ``FOR UPDATE SKIP LOCKED``
   in the sub-select, so concurrent dispatchers take disjoint sets; SQLite: the statement runs
   in a ``BEGIN IMMEDIATE`` transaction, which serialises writers).
2. **Wait** in memory (a heap) until the due instant: a timed wait, then (when the loop's
   millisecond timer wakes early) a sub-millisecond spin on the wall clock, so a job is never
   enqueued early.
3. **Fire**: enqueue ``workflow.execute.<region>`` with job id ``timer:<id>`` (deterministic).
4. **Mark** ``status = 'fired'`` in batches shortly after.

A dispatcher that dies after 1 leaves claims that expire at ``claimed_until``; one that dies
between 3 and 4 leaves a pending timer whose job exists: the next claimer enqueues the same
job id again, which the queue ignores (and the engine's fencing covers a job already removed).
On clean shutdown the unfired claims are released so another dispatcher takes them at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Generic, Protocol, TypeVar

log = logging.getLogger(__name__)

SPIN_S = 0.001
"""Below this, waiting is a cooperative spin on the wall clock (uvloop's timers have 1 ms
resolution and may wake up to 1 ms early)."""
CLAIM_MARGIN_S = 2.0
"""A claim outlives the end of the look-ahead window by this long."""


class TimerLike(Protocol):
    """What the wheel needs of a timer (the store's :class:`~conveyor.store.records.Timer`)."""

    @property
    def id(self) -> str: ...

    @property
    def due_at(self) -> datetime: ...


async def sleep_until(instant: float, wake: asyncio.Event | None = None) -> bool:
    """Sleep until the wall-clock ``instant`` (never returns early); True when reached.

    A timed wait for the whole remaining time, then — if the loop's timer woke us a little
    early — a short cooperative spin (``sleep(0)``) on ``time.time()``. If ``wake`` is set
    first, returns False at once.
    """
    while True:
        left = instant - time.time()
        if left <= 0:
            return True
        if wake is not None and wake.is_set():
            return False
        if left < SPIN_S:
            await asyncio.sleep(0)
        elif wake is None:
            await asyncio.sleep(left)
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), timeout=left)


T = TypeVar("T", bound=TimerLike)
FireFn = Callable[[T], Awaitable[None]]


class TimerWheel(Generic[T]):
    """Timers in memory, fired at their instant by :meth:`run` (one task)."""

    def __init__(self, fire: FireFn[T], *, retry_s: float = 0.5, concurrency: int = 16) -> None:
        self._fire = fire
        self._retry_s = retry_s
        self._gate = asyncio.Semaphore(concurrency)
        self._heap: list[tuple[float, str, T]] = []
        self._ids: set[str] = set()
        self._added = asyncio.Event()
        self.fired = 0
        self.failed = 0

    def __len__(self) -> int:
        return len(self._heap)

    def __contains__(self, timer_id: object) -> bool:
        return timer_id in self._ids

    @property
    def next_due(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def add(self, timers: Sequence[T]) -> int:
        """Add timers not already held; wakes the firing loop. Returns how many were new."""
        new = 0
        for timer in timers:
            if timer.id in self._ids:
                continue
            self._ids.add(timer.id)
            heapq.heappush(self._heap, (timer.due_at.timestamp(), timer.id, timer))
            new += 1
        if new:
            self._added.set()
        return new

    def held_ids(self) -> list[str]:
        return list(self._ids)

    def _pop_due(self, now: float) -> list[T]:
        due: list[T] = []
        while self._heap and self._heap[0][0] <= now:
            due.append(heapq.heappop(self._heap)[2])
        return due

    async def run(self) -> None:
        """Fire every timer at its instant, until cancelled.

        Each due timer is enqueued by its own task (at most ``concurrency`` at once), so a slow
        enqueue never delays the timers due after it.
        """
        in_flight: set[asyncio.Task[None]] = set()
        try:
            while True:
                self._added.clear()
                head = self.next_due
                if head is None:
                    await self._added.wait()
                    continue
                if not await sleep_until(head, self._added):
                    continue  # an earlier timer may have arrived
                for timer in self._pop_due(time.time()):
                    task = asyncio.create_task(self._fire_one(timer))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
        finally:
            for task in in_flight:
                task.cancel()
            if in_flight:
                await asyncio.wait(in_flight, timeout=2.0)

    async def _fire_one(self, timer: T) -> None:
        try:
            async with self._gate:
                await self._fire(timer)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failed += 1
            log.warning("timers.fire_failed", extra={"timerId": timer.id, "error": repr(exc)})
            # keep the claim and try again shortly
            heapq.heappush(self._heap, (time.time() + self._retry_s, timer.id, timer))
            self._added.set()
            return
        self.fired += 1
        self._ids.discard(timer.id)
