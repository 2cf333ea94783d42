"""The ``bullmq`` driver's producer side: Queue and QueueEvents on the official ``bullmq`` package.

The worker lives in :mod:`conveyor.queue.bullmq.worker`. What this module adds to
``bullmq``: payload validation at enqueue, errors translated into Conveyor's tree, a
deadline on every producer call (so a request handler fails in seconds when Redis is
down), and a QueueEvents consumer that reconnects by itself instead of exiting silently.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

import bullmq
import redis.asyncio as aioredis
from pydantic import BaseModel
from redis.exceptions import NoScriptError, ResponseError

from conveyor.errors import QueueError
from conveyor.queue import connection
from conveyor.queue._base import JOB_COUNT_STATES, EventHandler, QueueEvent, ScriptCall
from conveyor.queue._emitter import Emitter
from conveyor.queue.bullmq import compat
from conveyor.queue.payloads import PayloadSpec, job_options
from conveyor.settings import Settings

log = logging.getLogger(__name__)

_STATE_TO_BULL = {"waiting": "wait"}


class BullQueue:
    """Producer handle on one BullMQ queue (shares the factory's fast-fail client)."""

    def __init__(
        self, name: str, spec: PayloadSpec, settings: Settings, client: aioredis.Redis
    ) -> None:
        self._name = name
        self._spec = spec
        self._settings = settings
        self._deadline_s = settings.queue_redis_socket_timeout_ms / 1000.0
        self._emitter = Emitter(f"queue[{name}]")
        self._client = client
        self._scripts: dict[str, Any] = {}
        """Lua sources run before adds (:class:`ScriptCall`), registered on the client once."""
        self._scripts_loaded = False
        self._add_scripts_loaded = not settings.uses_cluster
        """bullmq's add scripts are loaded on every master (Redis Cluster only, see
        :func:`compat.load_add_scripts`)."""
        self._capped = False
        """The events stream's cap (``QUEUE_EVENTS_MAX_LEN``) was written (first add)."""
        self._bull = bullmq.Queue(
            connection.bull_name(name, settings.uses_cluster),
            {
                "connection": client,
                "prefix": settings.queue_prefix,
                "defaultJobOptions": spec.options_for(settings),
                "skipVersionCheck": True,
            },
        )

    @property
    def name(self) -> str:
        return self._name

    @property
    def settings(self) -> Settings:
        return self._settings

    def on(self, event: str, handler: EventHandler) -> None:
        """Local events: ``waiting`` for each job added through this handle."""
        self._emitter.on(event, handler)

    def off(self, event: str, handler: EventHandler) -> None:
        self._emitter.off(event, handler)

    async def _cap_events(self) -> None:
        """Before the first add: cap the queue's events stream (one HSET, once per process)."""
        if not self._capped:
            await compat.set_events_max_len(self._bull, self._settings.queue_events_max_len)
            self._capped = True

    def _added(self, job_ids: list[str]) -> None:
        if self._emitter.has("waiting"):
            for job_id in job_ids:
                self._emitter.emit(
                    QueueEvent("waiting", self._name, job_id, {"name": self._spec.base_name})
                )

    @property
    def bullmq_queue(self) -> Any:
        """The underlying ``bullmq.Queue`` (for benchmarks and diagnostics)."""
        return self._bull

    async def add(
        self,
        payload: BaseModel | Mapping[str, Any],
        *,
        job_id: str | None = None,
        priority: int = 0,
        delay_ms: int = 0,
    ) -> str:
        model, data = self._spec.dump(self._name, payload)
        opts = job_options(
            self._spec, model, {"job_id": job_id, "priority": priority, "delay_ms": delay_ms}
        )
        try:
            async with asyncio.timeout(self._deadline_s):
                await self._cap_events()
                job = await self._bull.add(self._spec.base_name, data, opts)
        except connection.QUEUE_ERRORS as exc:
            raise connection.translate(exc, self._settings, "enqueue on") from exc
        job_id = str(job.id)
        self._added([job_id])
        return job_id

    async def add_after(
        self,
        call: ScriptCall,
        payload: BaseModel | Mapping[str, Any],
        *,
        job_id: str,
        priority: int = 0,
    ) -> tuple[Any, str]:
        model, data = self._spec.dump(self._name, payload)
        opts = job_options(self._spec, model, {"job_id": job_id, "priority": priority})
        bull = self._bull
        job = compat.new_job(bull, self._spec.base_name, data, opts)
        try:
            async with asyncio.timeout(self._deadline_s):
                await self._cap_events()
                result, added = await self._count_and_add(call, job)
        except connection.QUEUE_ERRORS as exc:
            raise connection.translate(exc, self._settings, "enqueue on") from exc
        if isinstance(added, int) and added < 0:
            raise QueueError(f"BullMQ refused job {job_id} on {self._name} (code {added})")
        job_id = str(added)
        self._added([job_id])
        return result, job_id

    async def _count_and_add(self, call: ScriptCall, job: Any) -> list[Any]:
        """``MULTI; EVALSHA call; EVALSHA add; EXEC`` in one write
        (:func:`compat.add_in_transaction`). On a plain client a script Redis lost is loaded
        and only the call it refused sent again, there. On Redis Cluster the scripts are loaded
        on the masters once, and again (the whole transaction sent again) after a
        ``NOSCRIPT``: if only one of the two scripts was lost, the other runs twice — a count
        counted twice (drift the fairness ledger's clamp repairs), or an add (a no-op the
        second time)."""
        bull = self._bull
        script = self._scripts.get(call.source)
        if script is None:
            script = self._scripts[call.source] = self._client.register_script(call.source)
        try:
            results = await compat.add_in_transaction(
                bull, script, call, job, check_scripts=not self._scripts_loaded
            )
        except (NoScriptError, ResponseError) as exc:
            if not compat.is_missing_script(exc):
                raise
            results = await compat.add_in_transaction(bull, script, call, job, check_scripts=True)
        self._scripts_loaded = True
        return results

    async def change_priority(self, job_id: str, priority: int) -> None:
        try:
            async with asyncio.timeout(self._deadline_s):
                await compat.change_priority(self._bull, job_id, priority)
        except connection.QUEUE_ERRORS as exc:
            raise connection.translate(exc, self._settings, "re-rank a job on") from exc
        except Exception as exc:  # bullmq raises on a job that is gone: nothing to re-rank
            log.debug("queue.change_priority_skipped", extra={"jobId": job_id, "error": repr(exc)})

    async def add_bulk(
        self, items: Sequence[tuple[BaseModel | Mapping[str, Any], Mapping[str, Any]]]
    ) -> list[str]:
        jobs = []
        for payload, options in items:
            model, data = self._spec.dump(self._name, payload)
            jobs.append(
                {
                    "name": self._spec.base_name,
                    "data": data,
                    "opts": job_options(self._spec, model, options),
                }
            )
        try:
            async with asyncio.timeout(self._deadline_s + len(jobs) / 1000.0):
                await self._cap_events()
                added = await self._add_bulk(jobs)
        except connection.QUEUE_ERRORS as exc:
            raise connection.translate(exc, self._settings, "enqueue on") from exc
        job_ids = [str(job_id) for job_id in added]
        self._added(job_ids)
        return job_ids

    async def _add_bulk(self, jobs: list[dict[str, Any]]) -> list[Any]:
        """bullmq's ``addBulk`` (one ``MULTI`` of add scripts): on a plain client sent by
        :func:`compat.add_bulk`; on Redis Cluster bullmq's own, with the add scripts loaded on
        the masters first, once, and again after a ``NOSCRIPT``."""
        if not self._settings.uses_cluster:
            return await compat.add_bulk(self._bull, jobs)
        if not self._add_scripts_loaded:
            await compat.load_add_scripts(self._bull)
            self._add_scripts_loaded = True
        try:
            added: list[Any] = await self._bull.addBulk(jobs)
        except (NoScriptError, ResponseError) as exc:
            if not compat.is_missing_script(exc):
                raise
            await compat.load_add_scripts(self._bull)
            added = await self._bull.addBulk(jobs)
        return [job.id for job in added]

    async def get_job_counts(self, *states: str) -> dict[str, int]:
        wanted = states or JOB_COUNT_STATES
        try:
            async with asyncio.timeout(self._deadline_s):
                values = await compat.get_counts(
                    self._bull, [_STATE_TO_BULL.get(s, s) for s in wanted]
                )
        except connection.QUEUE_ERRORS as exc:
            raise connection.translate(exc, self._settings, "count jobs on") from exc
        return {state: int(value or 0) for state, value in zip(wanted, values, strict=True)}

    async def get_job_state(self, job_id: str) -> str | None:
        try:
            async with asyncio.timeout(self._deadline_s):
                state = await self._bull.getJobState(job_id)
        except connection.QUEUE_ERRORS as exc:
            raise connection.translate(exc, self._settings, "read a job state on") from exc
        return None if state in (None, "unknown") else str(state)

    async def promote(self, job_id: str) -> bool:
        try:
            async with asyncio.timeout(self._deadline_s):
                await compat.promote(self._bull, job_id)
        except TypeError:
            return False  # bullmq's "job is not in the delayed state" (a returned error code)
        except connection.QUEUE_ERRORS as exc:
            raise connection.translate(exc, self._settings, "promote a job on") from exc
        return True

    async def is_paused(self) -> bool:
        try:
            async with asyncio.timeout(self._deadline_s):
                return bool(await self._bull.isPaused())
        except connection.QUEUE_ERRORS as exc:
            raise connection.translate(exc, self._settings, "read the paused flag of") from exc

    async def pause(self) -> None:
        await self._set_paused(True)

    async def resume(self) -> None:
        await self._set_paused(False)

    async def _set_paused(self, paused: bool) -> None:
        action = "pause" if paused else "resume"
        try:
            async with asyncio.timeout(self._deadline_s):
                await (self._bull.pause() if paused else self._bull.resume())
        except connection.QUEUE_ERRORS as exc:
            raise connection.translate(exc, self._settings, action) from exc
        log.info(f"queue.{action}d", extra={"queue": self._name})

    async def remove(self, job_id: str) -> bool:
        """Remove a job that is not active; False if it is active or does not exist."""
        try:
            async with asyncio.timeout(self._deadline_s):
                if not await compat.job_exists(self._bull, job_id):
                    return False
                result = await self._bull.remove(job_id)
        except connection.QUEUE_ERRORS as exc:
            raise connection.translate(exc, self._settings, "remove a job on") from exc
        return bool(result == 1)

    async def close(self) -> None:
        """Nothing to release: the client belongs to the factory."""


class BullQueueEvents:
    """The global event stream of one queue, consumed by a loop that survives Redis errors."""

    def __init__(self, name: str, settings: Settings, client: aioredis.Redis) -> None:
        self._name = name
        self._settings = settings
        self._client = client
        self._emitter = Emitter(f"queue_events[{name}]")
        self._consumer: compat.StreamConsumer | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._last_id = "$"

    @property
    def name(self) -> str:
        return self._name

    def on(self, event: str, handler: EventHandler) -> None:
        self._emitter.on(event, handler)

    def off(self, event: str, handler: EventHandler) -> None:
        self._emitter.off(event, handler)

    def start(self) -> None:
        """Start consuming; events published from now on are delivered (the first read starts
        at this instant's stream id, so nothing is lost while the connection is set up)."""
        if self._task is None and not self._closing:
            self._last_id = f"{int(time.time() * 1000)}-0"
            self._task = asyncio.get_running_loop().create_task(
                self._loop(), name=f"conveyor.queue_events[{self._name}]"
            )
            self._task.add_done_callback(self._watch)

    async def run(self) -> None:
        self.start()
        task = self._task
        if task is None:
            return
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError:
            if self._closing and task.done():
                return  # close() had to cancel the loop: that is a normal end
            raise

    def _watch(self, task: asyncio.Task[None]) -> None:
        if task.cancelled() or self._closing:
            return
        exc = task.exception()
        log.error("queue.events_loop_died", extra={"queue": self._name, "error": repr(exc)})

    def _new_consumer(self) -> compat.StreamConsumer:
        opts = {
            "connection": self._client,
            "prefix": self._settings.queue_prefix,
            "autorun": False,
            "skipVersionCheck": True,
            "blockingTimeout": connection.EVENTS_BLOCK_MS,
            "lastEventId": self._last_id,
        }
        name = connection.bull_name(self._name, self._settings.uses_cluster)
        consumer = compat.StreamConsumer(name, opts, self._emitter, label=self._name)
        consumer.on("error", self._on_error)
        return consumer

    def _on_error(self, exc: BaseException) -> None:
        self._emitter.emit(QueueEvent("error", self._name, error=exc))

    async def _loop(self) -> None:
        backoff = 0.25
        loop = asyncio.get_running_loop()
        while not self._closing:
            consumer = self._consumer = self._new_consumer()
            started = loop.time()
            inner = loop.create_task(consumer.run(), name=f"bullmq.queue_events[{self._name}]")
            await asyncio.wait({inner})
            self._last_id = consumer.last_id
            if self._closing:
                return
            error = None if inner.cancelled() else inner.exception()
            if error is not None:
                self._on_error(error)  # bullmq emits only the errors its read loop catches
            if loop.time() - started > 30:
                backoff = 0.25
            log.warning(
                "queue.events_reconnecting",
                extra={"queue": self._name, "in_s": backoff, "error": repr(error)},
            )
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        consumer, task = self._consumer, self._task
        try:
            async with asyncio.timeout(5):
                if consumer is not None:
                    await consumer.close()  # cancels its read and closes the client
                else:
                    await self._client.aclose()
        except connection.QUEUE_ERRORS as exc:  # includes TimeoutError
            log.warning(
                "queue.events_close_failed", extra={"queue": self._name, "error": repr(exc)}
            )
        if task is not None:
            done, _ = await asyncio.wait({task}, timeout=2)
            if not done:
                task.cancel()
                await asyncio.wait({task}, timeout=5)
        self._emitter.clear()
