"""Process plumbing shared by ``conveyor worker``, ``conveyor scheduler`` and ``conveyor timers``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from conveyor.errors import DatabaseUnavailable, QueueError, SchemaOutOfDate
from conveyor.heartbeat import Heartbeat
from conveyor.queue import QueueFactory
from conveyor.settings import Settings

if TYPE_CHECKING:
    from conveyor.runtime import Supervisor
    from conveyor.store import Store

log = logging.getLogger(__name__)


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` on uvloop when available (as every Conveyor process does)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


async def heartbeat_loop(heartbeat: Heartbeat, stop: asyncio.Event) -> None:
    """Beat every interval until ``stop`` is set (or cancelled); a failed beat is retried."""
    while not stop.is_set():
        try:
            await heartbeat.beat()
        except (RedisError, OSError) as exc:
            log.warning("heartbeat.failed", extra={"role": heartbeat.role, "error": repr(exc)})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=heartbeat.interval_s)


async def open_checked(
    stack: AsyncExitStack, settings: Settings, role: str, *, pool_size: int | None = None
) -> tuple[Store, QueueFactory] | None:
    """Open the store and the queue factory on ``stack`` and run the start-up checks.

    Returns ``None`` after ONE error line (``<role>.database_not_ready`` — schema out of date or
    database unreachable — or ``<role>.queue_not_ready``); the caller then exits 1.
    """
    from conveyor.store import Store

    try:
        store = await stack.enter_async_context(Store(settings, pool_size=pool_size))
        await store.check_schema()
    except (SchemaOutOfDate, DatabaseUnavailable) as exc:
        log.error("%s.database_not_ready: %s", role, exc, extra={"error": type(exc).__name__})
        return None
    queues = await stack.enter_async_context(QueueFactory(settings))
    try:
        await queues.assert_queue_is_ready()
    except QueueError as exc:
        log.error("%s.queue_not_ready: %s", role, exc, extra={"error": type(exc).__name__})
        return None
    return store, queues


async def serve_checked(
    settings: Settings,
    role: str,
    supervisor: Supervisor,
    start: Callable[[AsyncExitStack, Store, QueueFactory], Awaitable[int]],
    *,
    pool_size: int | None = None,
) -> int:
    """A process's life: signal handlers, :func:`open_checked` (exit 1 on failure), then
    ``start(stack, store, queues)`` unless a signal came first (exit 0). Returns the exit code;
    everything opened on the stack is closed on the way out."""
    supervisor.install_signal_handlers()
    try:
        async with AsyncExitStack() as stack:
            opened = await open_checked(stack, settings, role, pool_size=pool_size)
            if opened is None:
                return 1
            if supervisor.stopping:
                return 0
            return await start(stack, *opened)
    finally:
        supervisor.remove_signal_handlers()
