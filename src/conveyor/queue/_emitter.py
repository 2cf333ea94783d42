"""A small event emitter whose listeners can never break the loop that emits.

BullMQ's own emitter calls listeners inline and lets their exceptions escape into its
worker and event loops; every Conveyor listener goes through :class:`Emitter` instead,
which logs a failing handler and carries on. A handler that returns an awaitable is run
as a task that is kept (so it is not garbage-collected) and whose failure is logged.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Coroutine
from typing import Any

from conveyor.queue._base import EventHandler, QueueEvent

log = logging.getLogger(__name__)


class Emitter:
    """Listeners per event name; ``emit`` never raises."""

    __slots__ = ("_listeners", "_owner", "_tasks")

    def __init__(self, owner: str) -> None:
        self._owner = owner
        self._listeners: dict[str, tuple[EventHandler, ...]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()

    def on(self, event: str, handler: EventHandler) -> None:
        self._listeners[event] = (*self._listeners.get(event, ()), handler)

    def off(self, event: str, handler: EventHandler) -> None:
        handlers = list(self._listeners.get(event, ()))
        if handler in handlers:
            handlers.remove(handler)
        if handlers:
            self._listeners[event] = tuple(handlers)
        else:
            self._listeners.pop(event, None)

    def has(self, event: str) -> bool:
        return event in self._listeners

    def count(self) -> int:
        return sum(len(handlers) for handlers in self._listeners.values())

    def emit(self, event: QueueEvent) -> None:
        for handler in self._listeners.get(event.name, ()):
            try:
                result = handler(event)
            except Exception:
                log.exception(
                    "queue.handler_failed",
                    extra={"owner": self._owner, "event": event.name, "jobId": event.job_id},
                )
                continue
            if inspect.isawaitable(result):
                self._track(result, event)

    def _track(self, awaitable: Any, event: QueueEvent) -> None:
        coro: Coroutine[Any, Any, Any] = (
            awaitable if inspect.iscoroutine(awaitable) else _await(awaitable)
        )
        task = asyncio.get_running_loop().create_task(coro, name=f"{self._owner}.{event.name}")
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, event))

    def _done(self, task: asyncio.Task[Any], event: QueueEvent) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error(
                "queue.handler_failed",
                extra={"owner": self._owner, "event": event.name, "jobId": event.job_id},
                exc_info=(type(exc), exc, exc.__traceback__) if exc else None,
            )

    def clear(self) -> None:
        self._listeners.clear()
        for task in self._tasks:
            task.cancel()
        self._tasks.clear()


async def _await(awaitable: Any) -> Any:
    return await awaitable
