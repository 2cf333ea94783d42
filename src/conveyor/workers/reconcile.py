"""The reconciler: the database is the source of truth, the queue is rebuilt from it.

Runs inside the leading scheduler (one active instance cluster-wide), every
``RECONCILE_INTERVAL_MS``. Each pass asks the store for *stranded* executions
(:meth:`ExecutionService.stranded`): ``queued`` and not (re-)enqueued for
``RECONCILE_MIN_AGE_MS``, ``running`` with an expired lease, ``waiting`` whose wake time passed.
For each, it looks for a live job in Redis — the execution's own job (job id = execution id)
and, for waiting/running ones, the job of its latest timer (``timer:<id>``). If none is
waiting, delayed or active, it reads the execution again: a worker may have run it between
the first read and the look at its job (its job then *completed*, and the row is no longer
stranded) — only what is still stranded after its job was seen gone or finished is enqueued
again, through the :class:`~conveyor.dispatch.ExecutionDispatcher` with job id = execution id
(a finished job under that id is removed first, since BullMQ ignores an add whose id exists).
The engine's lease fencing makes a redundant run harmless anyway. Checked executions get
``enqueued_at = now`` so they are looked at again only after the minimum age.

A cron tick's execution materialised ahead (``scheduled_for`` still in the future) whose job is
missing — the scheduler died between recording and enqueueing it — is enqueued as a delayed
job due at its tick instant (plus the scheduler's margin), never early.

Runs on its own supervised loop in the leading scheduler, so a slow pass never delays a tick.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from conveyor.dispatch import ExecutionDispatcher, payload_for
from conveyor.queue import Queue, QueueFactory

if TYPE_CHECKING:
    from conveyor.settings import Settings
    from conveyor.store import Execution, Store

log = logging.getLogger(__name__)

FINISHED_STATES = frozenset({"completed", "failed"})
_CONCURRENCY = 32
_DELAY_MARGIN_MS = 2
"""As the scheduler's: a job due at a tick instant must never become runnable before it."""


class Reconciler:
    """Re-enqueues executions whose queue job is missing."""

    def __init__(
        self,
        store: Store,
        queues: QueueFactory,
        dispatcher: ExecutionDispatcher,
        settings: Settings,
        *,
        limit: int = 500,
    ) -> None:
        self.store = store
        self.queues = queues
        self.dispatcher = dispatcher
        self.min_age_s = settings.reconcile_min_age_ms / 1000
        self.limit = limit
        self.recovered = 0
        self.passes = 0
        self._after: tuple[datetime, str] | None = None
        """Where the next pass goes on: after the last execution a full page checked (each
        check counts as an enqueue, so the same oldest page would be due again next pass, and
        a lost execution behind a backlog larger than a page never looked at); ``None``: from
        the oldest again."""

    def _queue(self, region: str) -> Queue:
        return self.dispatcher.queue(region)

    async def run_once(self, now: datetime | None = None) -> list[str]:
        """One pass; returns the ids of the executions enqueued again."""
        now = now or datetime.now(UTC)
        stranded = await self.store.executions.stranded(
            now, min_age_s=self.min_age_s, limit=self.limit, after=self._after
        )
        self.passes += 1
        full = len(stranded) >= self.limit
        self._after = (stranded[-1].queued_at, stranded[-1].id) if full else None
        if not stranded:
            return []
        gate = asyncio.Semaphore(_CONCURRENCY)

        async def check(execution: Execution) -> tuple[bool, str | None]:
            async with gate:
                return await self._job_gone(execution)

        looks = await asyncio.gather(*(check(e) for e in stranded))
        gone = {e.id: state for e, (is_gone, state) in zip(stranded, looks, strict=True) if is_gone}
        recovered: list[str] = []
        if gone:  # the second look: the job was read after the row, so this row is the truth
            still = await self.store.executions.stranded(
                now, min_age_s=self.min_age_s, limit=len(gone), ids=list(gone)
            )

            async def recover(execution: Execution) -> None:
                async with gate:
                    await self._recover(execution, gone[execution.id])

            await asyncio.gather(*(recover(e) for e in still))
            recovered = [e.id for e in still]
        await self.store.executions.mark_enqueued([e.id for e in stranded], now)
        if recovered:
            self.recovered += len(recovered)
            log.warning(
                "reconcile.recovered",
                extra={"executions": len(recovered), "checked": len(stranded)},
            )
        return recovered

    async def _job_ids(self, execution: Execution) -> list[str]:
        ids = [execution.id]
        if execution.status in ("waiting", "running"):
            timers = await self.store.timers.for_execution(execution.tenant_id, execution.id)
            if timers:
                ids.append(timers[-1].job_id)
        return ids

    async def _job_gone(self, execution: Execution) -> tuple[bool, str | None]:
        """(no live job will run it, the state of its own job)."""
        queue = self._queue(execution.region)
        own_state: str | None = None
        for job_id in await self._job_ids(execution):
            state = await queue.get_job_state(job_id)
            if job_id == execution.id:
                own_state = state
            if state is not None and state not in FINISHED_STATES:
                return False, state  # a live job will run it
        return True, own_state

    async def _recover(self, execution: Execution, own_state: str | None) -> None:
        queue = self._queue(execution.region)
        if own_state in FINISHED_STATES:
            await queue.remove(execution.id)
        await self.dispatcher.enqueue(
            payload_for(execution, reason="recovery"), delay_ms=delay_until(execution)
        )
        log.info(
            "reconcile.enqueued",
            extra={"executionId": execution.id, "status": execution.status, "job": own_state},
        )


def delay_until(execution: Execution) -> int:
    """Milliseconds until a cron tick's execution may run (0 when its instant has passed or
    it is not a tick's), margin included."""
    if execution.scheduled_for is None:
        return 0
    ahead_ms = math.ceil((execution.scheduled_for.timestamp() - time.time()) * 1000)
    return ahead_ms + _DELAY_MARGIN_MS if ahead_ms > 0 else 0
