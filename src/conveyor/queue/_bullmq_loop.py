"""``bullmq.Worker`` with the fetch discipline of Node BullMQ's worker.

The Python port's ``Worker.run`` starts up to ``concurrency`` fetches *at once* whenever a slot
frees, and most of them run ``moveToActive`` against an empty queue: at 100 jobs/s with
concurrency 10 that is ~25 Lua calls per job, which costs the worker ~5 ms of CPU per job and
puts every new job behind a queue of useless round trips (a p99 enqueue-to-start latency of
15+ ms instead of a few). It also completes a job and fetches the next one in two calls.

:class:`FetchingWorker` replaces the loop with Node BullMQ's (``Worker.mainLoop``):

* Fetches run **one at a time**: a non-blocking ``moveToActive`` while jobs keep coming, and
  when the queue is drained exactly one blocking wait (``BZPOPMIN`` on the marker) alongside
  the jobs in progress.
* A finishing job **fetches the next one in the same call** (``moveToFinished`` with
  ``fetchNext``) as long as the worker is not over its concurrency, so a busy worker makes one
  round trip per job.

Everything else (locks, stalled-job checks, events, pause and close) is bullmq's own; only
``run`` and ``processJob`` are replaced, and both keep bullmq's bookkeeping (``processing``,
``jobs``, ``waiting``, the lock manager) so ``close()``/``pause()`` work unchanged.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import bullmq
from bullmq.custom_errors import DelayedError, UnrecoverableError, WaitingChildrenError
from bullmq.timer import Timer
from bullmq.utils import extract_result

__all__ = ["FetchingWorker"]


class FetchingWorker(bullmq.Worker):  # type: ignore[misc]  # bullmq is untyped
    """See the module docstring. Construct with ``autorun=False`` and await :meth:`run`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.processing: set[asyncio.Future[Any]] = set()
        """Fetches and jobs in progress (bullmq's own ``close``/``pause`` wait for them)."""
        self.running: bool = False
        self._blocked = False
        """A blocking fetch is in flight (at most one at a time)."""
        self._woken = False
        """The last blocking fetch got a job: the next fetch blocks too. Taking a job leaves
        a marker (for other workers) that ends the next wait at once, so a non-blocking fetch
        here would find the queue empty and be followed by that same wait and fetch anyway:
        one ``moveToActive`` per job saved at low rates."""
        self._tokens = 0
        self._loop_done = asyncio.Event()
        """Set when :meth:`run` has returned (every job it started has ended)."""

    # -- the loop ---------------------------------------------------------------------------
    async def run(self) -> None:
        if self.running:
            raise RuntimeError("Worker is already running")
        await self._ensure_client_names()
        self.lockManager.start()
        self.stalledCheckTimer = Timer(
            self.opts["stalledInterval"] / 1000, self.runStalledJobsCheck, self.emit
        )
        self.running = True
        try:
            while not self.closed:
                if self.paused and not self.closing and not self.processing:
                    await self.resume_event.wait()  # jobs fetched before the pause have started
                    continue
                await self._fill()
                if not self.processing:
                    if self.closing:
                        break
                    continue
                done, self.processing = await asyncio.wait(
                    self.processing, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    if task.cancelled():  # close(force=True) cancelled it
                        continue
                    job = extract_result(task, self.emit)
                    if job is not None:
                        self._start(job)
                if self.closing and not self.processing:
                    break
        finally:
            await self._stopped()

    async def close(self, force: bool = False) -> None:
        """bullmq's ``close``; a graceful one first waits for :meth:`run` to end. bullmq's waits
        only for the tasks in progress when it is called, not for a job that a completion or
        fetch then in flight brings back (already active and locked to this worker)."""
        if not force and self.running:
            self.closing = True
            self.paused = False
            self.resume_event.set()
            if self.waiting is not None:
                self.waiting.cancel()
            await asyncio.shield(self._loop_done.wait())
        await super().close(force=force)

    async def _stopped(self) -> None:
        """Release what ``run`` started, also when it ends by cancellation or an error
        (a graceful ``close()`` has waited for the jobs; a forced one cancelled them)."""
        self._loop_done.set()
        self.running = False
        if not self.closing:
            for task in self.processing:
                task.cancel()
            if self.waiting is not None and not self.waiting.done():
                self.waiting.cancel()
            if self.processing:
                await asyncio.gather(*self.processing, return_exceptions=True)
            self.processing.clear()
        self.stalledCheckTimer.stop()
        await self.lockManager.close()

    async def _fill(self) -> None:
        """Fetch until every slot is taken, the queue is drained (then leave one blocking
        fetch running) or the worker is closing/paused. One fetch at a time."""
        concurrency = self.opts["concurrency"]
        while (
            not self._blocked
            and len(self.processing) < concurrency
            and not self.closing
            and not self.paused
        ):
            self._tokens += 1
            token = f"{self.id}:{self._tokens}"
            if self.drained or self._woken:
                self._woken = False
                self._blocked = True
                self.processing.add(asyncio.ensure_future(self._fetch(token, block=True)))
                return
            job = await self._fetch(token, block=False)
            if job is not None:
                self._start(job)

    def _start(self, job: Any) -> None:
        if self.forceClosing:
            return  # like the jobs just cancelled: its lock expires, it is recovered as stalled
        self.processing.add(asyncio.ensure_future(self.processJob(job, job.token)))

    async def _fetch(self, token: str, *, block: bool) -> Any:
        """One fetch with bullmq's retry policy (connection errors: retried after
        ``runRetryDelay``, until the worker closes; other errors: emitted, ``None``)."""

        async def attempt() -> Any:
            # bullmq retries a connection error at once (no delay) while closing: stop instead.
            stopped = self.closing or self.paused
            return None if stopped else await self.fetch_next(token, block)

        try:
            return await self.retryIfFailed(
                attempt, {"delay_in_ms": self.opts["runRetryDelay"], "only_emit_error": True}
            )
        finally:
            if block:
                self._blocked = False

    async def fetch_next(self, token: str, block: bool) -> Any:
        """The next job, or ``None``. ``block``: wait for one first (``BZPOPMIN`` on the
        queue's marker, up to ``drainDelay`` or the next delayed job's due time)."""
        if block:
            self.waiting = asyncio.ensure_future(self.waitForJob())
            try:
                self.blockUntil = await self.waiting
            except asyncio.CancelledError:
                if not self.paused and not self.closing:
                    raise
                return None  # pause()/close() cancelled the wait
            finally:
                self.waiting = None
            if self.blockUntil > 0 and self.blockUntil > int(time.time() * 1000):
                return None  # woken for a delayed job that is not due yet: wait again
        job = await self.moveToActive(token)
        if job is not None:
            self._woken = block
            self.emit("active", job, "waiting")
        return job

    # -- one job ----------------------------------------------------------------------------
    async def processJob(self, job: Any, token: str) -> Any:
        """bullmq's ``processJob``, except that completing a job also fetches the next one
        (returned, to be started by the loop) while the worker is within its concurrency."""
        opts = self.opts
        for key in ("removeOnComplete", "removeOnFail"):
            if key not in job.opts and key in opts:
                job.opts[key] = opts[key]
        self.jobs.add((job, token))
        controller = self.lockManager.track_job(
            job.id,
            token,
            int(time.time() * 1000),
            should_create_controller=self._processor_wants_signal,
        )
        try:
            if job.deferredFailure:
                await job.moveToFailed(UnrecoverableError(job.deferredFailure), token)
                self.emit("failed", job, UnrecoverableError(job.deferredFailure))
                return None
            if controller is not None:
                result = await self.processor(job, token, controller.signal)
            else:
                result = await self.processor(job, token)
            fetched = None
            if not self.forceClosing:
                fetch = (
                    not self.closing
                    and not self.paused
                    and len(self.processing) <= opts["concurrency"]
                )
                done = await self.backend.moveToCompleted(
                    job, result, job.opts.get("removeOnComplete", False), token, fetch_next=fetch
                )
                job.returnvalue = result
                job.attemptsMade = job.attemptsMade + 1
                if fetch:
                    fetched = done["result"]
        except (DelayedError, WaitingChildrenError):
            return None
        except Exception as err:
            try:
                if not self.forceClosing:
                    await job.moveToFailed(err, token)
                self.emit("failed", job, err)
            except Exception as failure:
                self.emit("error", failure, job)
            return None
        finally:
            self.jobs.discard((job, token))
            self.lockManager.untrack_job(job.id)
        # The job is completed: whatever fails from here on must not fail it.
        try:
            self.emit("completed", job, result)
            return None if fetched is None else await self._next_from(fetched, token)
        except Exception as err:
            self.emit("error", err, job)
            return None  # a fetched job left active is recovered as stalled

    async def _next_from(self, result: Any, token: str) -> Any:
        """The job ``moveToFinished`` fetched (``None`` when the queue was empty)."""
        job_data, job_id, limit_until, delay_until = result or (None, None, 0, 0)
        job = await self.nextJobFromJobData(
            job_data, job_id, int(limit_until or 0), int(delay_until or 0), token
        )
        if job is not None:
            self.emit("active", job, "waiting")
        return job
