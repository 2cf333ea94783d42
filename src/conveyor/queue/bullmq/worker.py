"""The ``bullmq`` driver's worker: ``bullmq.Worker`` wrapped so its weaknesses cannot hurt.

* Fetches like Node BullMQ (one at a time; completing a job fetches the next in the same
  call), see :mod:`conveyor.queue.bullmq.compat`.
* Built with ``autorun=False``; :meth:`BullWorker.run` runs bullmq's loop in a task it
  watches and **raises** if that loop ends on its own (bullmq's ``run()`` returns silently
  after ``traceback.print_exc()`` on an unexpected error).
* :meth:`BullWorker.close` is bounded: graceful first (stop fetching, let active jobs
  finish), then forced after the timeout (active jobs are cancelled; their locks expire and
  another worker picks them up as stalled).
* The blocking ``BZPOPMIN`` gets its own client whose read timeout exceeds the 10 s block,
  and ``runRetryDelay`` is 1 s instead of 15 s, so a Redis blip stalls consumption briefly.
* Payloads are validated: data that does not fit the queue's model fails the job with
  ``UnrecoverableError`` (no retry) and a reason naming the bad field.
* :class:`~conveyor.queue.JobDeferred` moves the job back to delayed without using an attempt,
  its data saying why (``parked: …`` / ``deferred: …``) for readers of BullMQ dashboards.
* The queue's events stream is capped at ``QUEUE_EVENTS_MAX_LEN`` entries when it starts
  (:func:`compat.set_events_max_len`); finished jobs are kept per ``QUEUE_KEEP_COMPLETED`` /
  ``QUEUE_KEEP_FAILED`` (also for jobs a producer added without ``removeOn*`` options).
* Lock renewals are observed (by wrapping the backend's ``extendLocks``) so
  ``JobContext.lock_lost`` is set when a lock could not be renewed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from bullmq.custom_errors import DelayedError, UnrecoverableError
from pydantic import BaseModel, ValidationError
from redis.exceptions import NoPermissionError, ResponseError

from conveyor.errors import PayloadInvalid, QueueError, QueueUnavailable
from conveyor.queue import connection
from conveyor.queue._base import (
    EventHandler,
    JobContext,
    JobDeferred,
    Processor,
    QueueEvent,
    parked_before,
)
from conveyor.queue._emitter import Emitter
from conveyor.queue.bullmq import compat
from conveyor.queue.health import parse_version
from conveyor.queue.payloads import PayloadSpec, payload_invalid
from conveyor.settings import Settings

log = logging.getLogger(__name__)

RUN_RETRY_DELAY_MS = 1000
"""bullmq waits this long before fetching again after a connection error (its default: 15 s)."""
_ERROR_LOG_EVERY_S = 30.0
_RELAYED = ("completed", "failed", "stalled", "active")


class BullWorker:
    """Consumes one queue with ``bullmq.Worker``; see the module docstring."""

    def __init__(
        self,
        name: str,
        processor: Processor,
        *,
        spec: PayloadSpec,
        settings: Settings,
        client: aioredis.Redis,
        blocking_client: aioredis.Redis,
        concurrency: int = 1,
        lock_duration_ms: int = 30000,
        stalled_interval_ms: int = 30000,
        max_stalled_count: int = 1,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self._name = name
        self._spec = spec
        self._model = spec.model
        self._processor = processor
        self._settings = settings
        self._client = client
        self._lock_duration_s = lock_duration_ms / 1000.0
        self._contexts: dict[str, JobContext] = {}
        self._emitter = Emitter(f"worker[{name}]")
        self._run_task: asyncio.Task[Any] | None = None
        self._closing = False
        self._close_cut = False
        """A close was cancelled partway (see :meth:`close`)."""
        self._closed = asyncio.Event()
        self._fetch_failing_since: float | None = None
        self._last_error_log = 0.0
        opts: dict[str, Any] = {
            "connection": client,
            "prefix": settings.queue_prefix,
            "autorun": False,
            "skipVersionCheck": True,
            "concurrency": concurrency,
            "lockDuration": lock_duration_ms,
            "stalledInterval": stalled_interval_ms,
            "maxStalledCount": max_stalled_count,
            "runRetryDelay": RUN_RETRY_DELAY_MS,
            "name": f"{socket.gethostname()}-{os.getpid()}",
        }
        defaults = spec.options_for(settings)
        for key in ("removeOnComplete", "removeOnFail"):
            if key in defaults:  # also bounds jobs added by producers that set none
                opts[key] = defaults[key]
        bull: Any = compat.FetchingWorker(
            connection.bull_name(name, settings.uses_cluster), self._process, opts
        )
        self._bull = bull
        compat.use_blocking_client(bull, blocking_client)
        compat.observe_lock_renewals(bull, self._observe_lock_renewals)
        compat.observe_fetches(bull, self._observe_fetches)
        bull.on("error", self._on_bull_error)

    # -- public API -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._name

    @property
    def active_count(self) -> int:
        return compat.active_job_count(self._bull)

    @property
    def bullmq_worker(self) -> Any:
        """The underlying ``bullmq.Worker`` (for diagnostics)."""
        return self._bull

    def on(self, event: str, handler: EventHandler) -> None:
        """Local events of this worker: ``completed``, ``failed`` (final failures only),
        ``stalled`` (jobs its stalled-job checker recovered), ``active``, ``error``."""
        if event in _RELAYED and not self._emitter.has(event):
            self._bull.on(event, self._relay(event))
        self._emitter.on(event, handler)

    def off(self, event: str, handler: EventHandler) -> None:
        self._emitter.off(event, handler)

    async def run(self) -> None:
        """Consume until :meth:`close`; raise :class:`QueueError` if bullmq's loop dies."""
        if self._closing:
            return
        if self._run_task is not None:
            raise RuntimeError(f"worker for {self._name} is already running")
        await self._detect_capabilities()
        if self._closing:
            return
        self._run_task = asyncio.get_running_loop().create_task(
            self._bull.run(), name=f"bullmq.worker[{self._name}]"
        )
        log.info(
            "queue.worker_started",
            extra={"queue": self._name, "concurrency": compat.concurrency(self._bull)},
        )
        task = self._run_task
        try:
            await asyncio.wait({task})
        except asyncio.CancelledError:
            task.cancel()
            raise
        if self._closing:
            await self._closed.wait()
            return
        exc = None if task.cancelled() else task.exception()
        if exc is None:
            raise QueueError(
                f"worker loop for {self._name} stopped on its own (bullmq printed the cause above)"
            )
        if connection.is_connection_error(exc):
            raise QueueUnavailable(
                f"worker for {self._name} lost Redis: {connection.translate(exc, self._settings)}"
            ) from exc
        raise QueueError(f"worker loop for {self._name} crashed: {exc!r}") from exc

    async def close(self, timeout_s: float | None = None) -> None:
        """Stop fetching, let active jobs finish for ``timeout_s`` (default SHUTDOWN_GRACE_MS),
        then cancel them. Idempotent; bounded."""
        if self._closing and not self._close_cut:
            await self._closed.wait()
            return
        again, self._close_cut = self._close_cut, False
        self._closing = True
        closed = False
        try:
            grace = self._settings.shutdown_grace_s if timeout_s is None else timeout_s
            if again:  # a close was cut short (its caller's deadline) after its grace began
                grace = 0.0
            active = self.active_count
            log.info(
                "queue.worker_closing",
                extra={"queue": self._name, "active": active, "grace_s": grace},
            )
            graceful = asyncio.ensure_future(self._bull.close())
            finished, _ = await asyncio.wait({graceful}, timeout=grace)
            forced = not finished
            if forced:
                log.warning(
                    "queue.worker_force_closing",
                    extra={"queue": self._name, "active": self.active_count},
                )
                force = asyncio.ensure_future(self._bull.close(force=True))
                await asyncio.wait({graceful, force}, timeout=5)
                _log_failure(force, self._name)
            _log_failure(graceful, self._name)
            if self._run_task is not None and not self._run_task.done():
                await asyncio.wait({self._run_task}, timeout=5)
                if not self._run_task.done():
                    self._run_task.cancel()
                    await asyncio.wait({self._run_task}, timeout=5)
            closed = True
        finally:
            if closed:
                self._emitter.clear()
                self._closed.set()
            else:  # cancelled (its caller's deadline): the next close() forces it at once,
                self._close_cut = True  # rather than waiting for this one, which never ends
        log.info(
            "queue.worker_closed",
            extra={"queue": self._name, "active_at_close": active, "forced": forced},
        )

    async def _detect_capabilities(self) -> None:
        """Tell bullmq what the server can do (see :func:`compat.set_server_capabilities`)."""
        try:
            info = await self._client.info("server")
        except (NoPermissionError, ResponseError):
            return  # INFO denied by ACL: keep bullmq's conservative defaults
        except connection.QUEUE_ERRORS as exc:
            raise connection.translate(exc, self._settings, "start a worker on") from exc
        version = parse_version(str(info.get("redis_version", "")))
        if version is not None:
            compat.set_server_capabilities(self._bull, version)
        try:  # the events stream's cap (producers set it too: whoever comes first)
            await compat.set_events_max_len(self._bull, self._settings.queue_events_max_len)
        except connection.QUEUE_ERRORS as exc:
            raise connection.translate(exc, self._settings, "start a worker on") from exc

    # -- the processor bullmq calls ---------------------------------------------------------
    async def _process(self, job: Any, token: str) -> Any:
        try:
            payload = self._model.model_validate(job.data)
        except ValidationError as exc:
            reason = payload_invalid(self._name, exc).message
            log.warning(
                "queue.payload_invalid",
                extra={"queue": self._name, "jobId": job.id, "reason": reason},
            )
            raise UnrecoverableError(reason) from None
        job_id = job.id
        parked = parked_before(job.data)
        ctx = JobContext(
            job_id, job.name, self._name, job.attemptsMade, job.timestamp, parked=parked
        )
        contexts = self._contexts
        contexts[job_id] = ctx
        try:
            result = await self._processor(payload, ctx)
        except JobDeferred as deferred:
            await self._note(job, deferred.note)
            await job.moveToDelayed(int(time.time() * 1000) + deferred.delay_ms, token)
            raise DelayedError(str(deferred)) from None
        except PayloadInvalid as exc:
            raise UnrecoverableError(exc.message) from exc
        finally:
            contexts.pop(job_id, None)
        if isinstance(result, BaseModel):
            return result.model_dump(mode="json", by_alias=True)
        return result

    async def _note(self, job: Any, note: dict[str, str]) -> None:
        """Say in the job's data why it waits (best effort: a failure leaves the data as it
        was; the job is deferred all the same)."""
        data = job.data
        if not note or not isinstance(data, dict) or all(data.get(k) == v for k, v in note.items()):
            return
        try:
            await job.updateData({**data, **note})
        except Exception as exc:
            log.warning("queue.note_failed", extra={"queue": self._name, "jobId": job.id,
                                                    "error": repr(exc)})  # fmt: skip

    # -- hooks into bullmq ------------------------------------------------------------------
    def _relay(self, event: str) -> Callable[..., None]:
        emit, queue = self._emitter.emit, self._name
        if event == "stalled":
            return lambda job_id, *_: emit(QueueEvent(event, queue, str(job_id)))
        if event == "failed":
            return lambda job, err, *_: self._relay_failed(job, err)
        if event == "completed":
            return lambda job, result, *_: emit(
                QueueEvent(event, queue, job.id, {"returnvalue": result})
            )
        return lambda job, *_: emit(QueueEvent(event, queue, getattr(job, "id", None)))

    def _relay_failed(self, job: Any, err: BaseException) -> None:
        """Relay only final failures (as the global stream does); retried attempts are not."""
        attempts = int(job.opts.get("attempts") or 1)
        if isinstance(err, UnrecoverableError) or job.attemptsMade >= attempts:
            data = {"failedReason": str(err), "attemptsMade": job.attemptsMade}
            self._emitter.emit(QueueEvent("failed", self._name, job.id, data, error=err))

    def _on_bull_error(self, err: BaseException, *_: Any) -> None:
        if self._emitter.has("error"):  # e.g. telemetry, which logs it itself
            self._emitter.emit(QueueEvent("error", self._name, error=err))
        else:
            log.warning("queue.worker_error", extra={"queue": self._name, "error": repr(err)})

    def _observe_fetches(
        self, fetch: Callable[[str, bool], Awaitable[Any]]
    ) -> Callable[[str, bool], Awaitable[Any]]:
        async def fetch_next(token: str, block: bool) -> Any:
            try:
                job = await fetch(token, block)
            except Exception as exc:
                if connection.is_connection_error(exc) and not self._closing:
                    self._on_fetch_error(exc)
                raise
            if self._fetch_failing_since is not None:
                down_s = round(time.monotonic() - self._fetch_failing_since, 1)
                self._fetch_failing_since = None
                log.warning(
                    "queue.worker_reconnected", extra={"queue": self._name, "down_s": down_s}
                )
            return job

        return fetch_next

    def _on_fetch_error(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self._fetch_failing_since is None:
            self._fetch_failing_since = now
        if now - self._last_error_log >= _ERROR_LOG_EVERY_S:
            self._last_error_log = now
            error = connection.translate(exc, self._settings, "fetch jobs from")
            log.error(
                "queue.worker_redis_unavailable",
                extra={"queue": self._name, "error": error.message},
            )
            self._emitter.emit(QueueEvent("error", self._name, error=error))

    def _observe_lock_renewals(
        self, extend: Callable[..., Awaitable[Any]]
    ) -> Callable[..., Awaitable[Any]]:
        async def extend_locks(job_ids: list[str], tokens: list[str], duration: int) -> Any:
            try:
                failed = await extend(job_ids, tokens, duration)
            except Exception:
                self._expire_overdue_locks(job_ids)
                raise
            refused = set(failed or ())
            now = time.monotonic()
            for job_id in job_ids:
                ctx = self._contexts.get(job_id)
                if ctx is None:
                    continue
                if job_id in refused:
                    self._lock_lost(ctx, "renewal refused")
                else:
                    ctx._renewed_at = now
            return failed

        return extend_locks

    def _expire_overdue_locks(self, job_ids: list[str]) -> None:
        deadline = time.monotonic() - self._lock_duration_s
        for job_id in job_ids:
            ctx = self._contexts.get(job_id)
            if ctx is not None and ctx._renewed_at < deadline:
                self._lock_lost(ctx, "not renewed within lockDuration")

    def _lock_lost(self, ctx: JobContext, why: str) -> None:
        if not ctx.lock_lost.is_set():
            ctx.lock_lost.set()
            log.warning("queue.lock_lost", extra={"queue": self._name, "jobId": ctx.id, "why": why})


def _log_failure(task: asyncio.Future[Any], queue: str) -> None:
    """Retrieve a finished close step's exception (bullmq's close can raise) and log it."""
    if task.done() and not task.cancelled() and task.exception() is not None:
        log.warning(
            "queue.worker_close_failed", extra={"queue": queue, "error": repr(task.exception())}
        )
