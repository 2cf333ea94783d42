"""Queue telemetry: a queue's events logged (or routed to handlers) and its counts sampled.

BullMQ spreads its events over several objects, so the sources depend on the process:

* **Global mode** (no ``worker``; the API, a monitor): ``completed``, ``failed``,
  ``stalled`` and ``waiting`` come from the queue's global event stream
  (:class:`QueueEvents`), covering every producer and worker on the queue, Node.js ones
  included (``stalled`` is published there by whichever worker's stalled-job checker found
  the job; ``failed`` means failed for good, retried attempts show as ``delayed``);
  ``error`` from the stream consumer (it reconnects by itself) and the metrics timer.
* **Worker mode** (``worker=`` given; worker processes): ``completed``, ``failed`` (final
  failures only, like the stream), ``stalled`` (jobs this worker's checker recovered) and
  ``error`` (Redis unreachable while fetching, lock renewal failures) come from that worker;
  ``waiting`` from the ``queue`` handle (jobs this process enqueued); ``error`` also from
  the metrics timer. The global stream is not read: every worker process reading (and
  logging) every event of the whole fleet would cost CPU in proportion to the fleet's
  throughput and log each event once per process.

Each event is logged by default (``completed`` and ``waiting`` at DEBUG because there is
one per job; ``failed`` and ``stalled`` at WARNING; ``error`` at ERROR) unless a handler is
given for it, in which case it is routed to the handler instead. Every
``QUEUE_METRICS_INTERVAL_MS`` the job counts are logged (``queue.metrics``) and passed to
``on_metrics``. Handlers may be plain functions or coroutines; one that raises is logged
and never stops a loop. ``detach()`` removes every listener and the timer.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Mapping
from typing import Any

from conveyor.errors import QueueError
from conveyor.queue._base import (
    TELEMETRY_EVENTS,
    Detach,
    EventHandler,
    MetricsHandler,
    Queue,
    QueueEvent,
    QueueEvents,
    Worker,
)

log = logging.getLogger(__name__)

_LEVELS = {
    "completed": logging.DEBUG,
    "waiting": logging.DEBUG,
    "failed": logging.WARNING,
    "stalled": logging.WARNING,
    "error": logging.ERROR,
}


def _default_logger(name: str) -> EventHandler:
    level = _LEVELS[name]
    message = f"queue.job_{name}" if name != "error" else "queue.error"

    def log_event(event: QueueEvent) -> None:
        if not log.isEnabledFor(level):
            return
        extra: dict[str, Any] = {"queue": event.queue}
        if event.job_id is not None:
            extra["jobId"] = event.job_id
        reason = event.data.get("failedReason")
        if reason is not None:
            extra["reason"] = reason
        if event.error is not None:
            extra["error"] = repr(event.error)
        log.log(level, message, extra=extra)

    return log_event


def register_queue_telemetry(
    queue: Queue,
    queue_events: QueueEvents | None,
    *,
    handlers: Mapping[str, EventHandler] | None = None,
    on_metrics: MetricsHandler | None = None,
    interval_ms: int | None = None,
    worker: Worker | None = None,
) -> Detach:
    """Wire the five events and the metrics timer; return ``detach``.

    Must be called with a running event loop: it starts the metrics task and, in global
    mode, ``queue_events`` consuming (if it is not already). ``interval_ms`` defaults to the
    queue's ``QUEUE_METRICS_INTERVAL_MS``.
    """
    handlers = dict(handlers or {})
    unknown = set(handlers) - set(TELEMETRY_EVENTS)
    if unknown:
        raise ValueError(f"unknown telemetry events {sorted(unknown)}; known: {TELEMETRY_EVENTS}")
    routed = {name: handlers.get(name) or _default_logger(name) for name in TELEMETRY_EVENTS}
    sources: dict[str, Queue | QueueEvents | Worker]
    if worker is not None:
        sources = {"completed": worker, "failed": worker, "stalled": worker, "error": worker}
        sources["waiting"] = queue
    elif queue_events is not None:
        sources = dict.fromkeys(TELEMETRY_EVENTS, queue_events)
        queue_events.start()
    else:
        raise ValueError("register_queue_telemetry needs queue_events or a worker")
    for name, source in sources.items():
        source.on(name, routed[name])

    interval_s = (interval_ms or queue.settings.queue_metrics_interval_ms) / 1000.0
    timer = asyncio.get_running_loop().create_task(
        _metrics_loop(queue, interval_s, on_metrics, routed["error"]),
        name=f"conveyor.queue_metrics[{queue.name}]",
    )
    timer.add_done_callback(_watch_timer)
    detached = False

    def detach() -> None:
        nonlocal detached
        if detached:
            return
        detached = True
        for name, source in sources.items():
            source.off(name, routed[name])
        timer.cancel()

    return detach


async def _metrics_loop(
    queue: Queue, interval_s: float, on_metrics: MetricsHandler | None, on_error: EventHandler
) -> None:
    while True:
        await asyncio.sleep(interval_s)
        try:
            counts = await queue.get_job_counts()
        except QueueError as exc:
            await _call(on_error, QueueEvent("error", queue.name, error=exc))
            continue
        log.info("queue.metrics", extra={"queue": queue.name, **counts})
        if on_metrics is not None:
            try:
                result = on_metrics(counts)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("queue.metrics_handler_failed", extra={"queue": queue.name})


async def _call(handler: EventHandler, event: QueueEvent) -> None:
    try:
        result = handler(event)
        if inspect.isawaitable(result):
            await result
    except Exception:
        log.exception("queue.handler_failed", extra={"queue": event.queue, "event": event.name})


def _watch_timer(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("queue.metrics_loop_died", extra={"error": repr(task.exception())})
