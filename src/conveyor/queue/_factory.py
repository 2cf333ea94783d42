"""QueueFactory: the one place that builds queues, workers and event streams.

One factory per process. Everything it makes shares the connection settings, the key
prefix, the payload registry and the defaults; it owns every Redis client it creates and
closes them (after the workers, bounded) when its ``async with`` block ends.

It is the only place a process creates Redis clients (:func:`connection.make_client`): the
command client of Conveyor's own keys (fairness counters, heartbeats, leader locks, metrics),
BullMQ's queue, worker, blocking and event clients, and the readiness probe. With
``QUEUE_REDIS_SENTINELS`` every one of them is Sentinel-managed through the factory's one
:class:`~redis.asyncio.sentinel.Sentinel`, so the whole process follows a failover.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.asyncio.sentinel import Sentinel

from conveyor.errors import QueueNotReady
from conveyor.queue import connection, health
from conveyor.queue._base import (
    Detach,
    EventHandler,
    MetricsHandler,
    Processor,
    Queue,
    QueueEvents,
    Worker,
)
from conveyor.queue.payloads import payload_spec
from conveyor.queue.telemetry import register_queue_telemetry
from conveyor.settings import Settings

log = logging.getLogger(__name__)


class QueueFactory:
    """Builds every queue object of a process; ``async with QueueFactory(settings) as qf:``."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.driver: Literal["bullmq", "inmemory"] = settings.driver
        self._clients: list[aioredis.Redis] = []
        self._redis: aioredis.Redis | None = None
        self._probe: aioredis.Redis | None = None
        self._sentinel: Sentinel | None = None
        self._workers: list[Worker] = []
        self._events: list[QueueEvents] = []
        self._queues: dict[str, Queue] = {}
        self._detaches: list[Detach] = []
        self._broker: Any = None
        self._closed = False

    @property
    def durable(self) -> bool:
        """Jobs survive a process restart (only with the ``bullmq`` driver)."""
        return self.driver == "bullmq"

    async def __aenter__(self) -> QueueFactory:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- clients ----------------------------------------------------------------------------
    def _client(self, role: connection.ClientRole) -> aioredis.Redis:
        if self._closed:
            raise RuntimeError("QueueFactory is closed")
        client = connection.make_client(self.settings, role, self.sentinel)
        self._clients.append(client)
        return client

    @property
    def sentinel(self) -> Sentinel | None:
        """The process's clients to the sentinels (``None`` without ``QUEUE_REDIS_SENTINELS``)."""
        if self._sentinel is None and self.settings.uses_sentinel and not self._closed:
            self._sentinel = connection.make_sentinel(self.settings)
        return self._sentinel

    @property
    def redis(self) -> aioredis.Redis:
        """Shared fast-fail client for Conveyor's own keys (:mod:`conveyor.dispatch.keys`)."""
        if self._redis is None:
            self._redis = self._client("command")
        return self._redis

    def _memory_broker(self) -> Any:
        if self._broker is None:
            from conveyor.queue.inmemory import Broker

            self._broker = Broker()
        return self._broker

    # -- builders ---------------------------------------------------------------------------
    def create_queue(self, name: str) -> Queue:
        """A producer handle on ``name`` (cached: one per name)."""
        queue = self._queues.get(name)
        if queue is not None:
            return queue
        spec = payload_spec(name)
        if self.driver == "inmemory":
            from conveyor.queue.inmemory import MemoryQueue

            queue = MemoryQueue(
                name, spec, self.settings, self._memory_broker(), redis=lambda: self.redis
            )
        else:
            from conveyor.queue.bullmq import BullQueue

            queue = BullQueue(name, spec, self.settings, self.redis)
        self._queues[name] = queue
        return queue

    def create_worker(
        self,
        name: str,
        processor: Processor,
        *,
        concurrency: int = 1,
        lock_duration_ms: int = 30000,
        stalled_interval_ms: int = 30000,
        max_stalled_count: int = 1,
    ) -> Worker:
        """A worker for ``name``; call ``await worker.run()`` (e.g. in a supervised task)."""
        spec = payload_spec(name)
        worker: Worker
        if self.driver == "inmemory":
            from conveyor.queue.inmemory import MemoryWorker

            worker = MemoryWorker(
                name,
                processor,
                spec=spec,
                settings=self.settings,
                broker=self._memory_broker(),
                concurrency=concurrency,
            )
        else:
            from conveyor.queue.bullmq import BullWorker

            worker = BullWorker(
                name,
                processor,
                spec=spec,
                settings=self.settings,
                client=self._client("worker"),
                blocking_client=self._client("blocking"),
                concurrency=concurrency,
                lock_duration_ms=lock_duration_ms,
                stalled_interval_ms=stalled_interval_ms,
                max_stalled_count=max_stalled_count,
            )
        self._workers.append(worker)
        return worker

    def create_queue_events(self, name: str) -> QueueEvents:
        """The global event stream of ``name``; ``start()``/``run()`` it, or let telemetry do it."""
        events: QueueEvents
        if self.driver == "inmemory":
            from conveyor.queue.inmemory import MemoryQueueEvents

            events = MemoryQueueEvents(name, self._memory_broker())
        else:
            from conveyor.queue.bullmq import BullQueueEvents

            events = BullQueueEvents(name, self.settings, self._client("events"))
        self._events.append(events)
        return events

    def register_queue_telemetry(
        self,
        queue: Queue,
        queue_events: QueueEvents | None,
        *,
        handlers: Mapping[str, EventHandler] | None = None,
        on_metrics: MetricsHandler | None = None,
        worker: Worker | None = None,
    ) -> Detach:
        """See :func:`conveyor.queue.telemetry.register_queue_telemetry`: pass ``worker=`` in
        worker processes (local sources), ``queue_events`` elsewhere (the global stream)."""
        detach = register_queue_telemetry(
            queue,
            queue_events,
            handlers=handlers,
            on_metrics=on_metrics,
            interval_ms=self.settings.queue_metrics_interval_ms,
            worker=worker,
        )
        self._detaches.append(detach)
        return detach

    # -- readiness and health ---------------------------------------------------------------
    def _probe_client(self) -> aioredis.Redis:
        if self._probe is None:
            self._probe = self._client("probe")
        return self._probe

    async def assert_queue_is_ready(self) -> None:
        """Raise QueueUnavailable (unreachable, refused credentials) or QueueNotReady
        (in-memory driver, Redis too old) within a few seconds; warn on eviction policy."""
        if self.driver == "inmemory":
            raise QueueNotReady(
                "QUEUE_DRIVER=inmemory is for isolated unit tests only; workers need Redis"
            )
        await health.assert_ready(self._probe_client(), self.settings, self.sentinel)

    async def health(self, timeout_s: float = 2.0) -> dict[str, Any]:
        """``{"driver", "status", "latencyMs", "durable", "persistence", "evictionPolicy",
        "redisVersion", "address", "sentinel", "warnings", "error"?}``; never takes longer
        than ``timeout_s``. ``address`` is the master's ``host:port``; ``sentinel`` the
        sentinels' view (``None`` without Sentinel), see :func:`health.sentinel_view`."""
        client = None if self.driver == "inmemory" else self._probe_client()
        return await health.probe(client, self.settings, timeout_s, self.sentinel)

    # -- shutdown ---------------------------------------------------------------------------
    async def aclose(self) -> None:
        """Detach telemetry, close workers (bounded by SHUTDOWN_GRACE_MS), event streams,
        queues, then every Redis client. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for detach in self._detaches:
            detach()
        if self._workers:
            await asyncio.gather(*(w.close() for w in self._workers), return_exceptions=True)
        if self._events:
            await asyncio.gather(*(e.close() for e in self._events), return_exceptions=True)
        for queue in self._queues.values():
            await queue.close()
        results = await asyncio.gather(*(c.aclose() for c in self._clients), return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.debug("queue.client_close_failed", extra={"error": repr(result)})
        self._clients.clear()
        if self._sentinel is not None:
            try:
                await self._sentinel.aclose()
            except Exception as exc:
                log.debug("queue.sentinel_close_failed", extra={"error": repr(exc)})
            self._sentinel = None
