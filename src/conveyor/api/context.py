"""What one API process holds open: the store, the queue factory and the dispatcher (whose
enqueues concurrent requests share, :class:`~conveyor.dispatch.EnqueueBatcher`).

:func:`open_context` opens everything in order (database first, refusing an out-of-date schema;
then Redis) and closes it in reverse. It never fails because Redis is down: the API starts,
answers ``/api/health`` and reports not-ready until Redis returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from conveyor.dispatch import ExecutionDispatcher
from conveyor.queue import QueueFactory
from conveyor.runtime import Heartbeat, cancel_tasks, heartbeat_loop
from conveyor.settings import Settings
from conveyor.store import Store
from conveyor.store.tenants import hash_secret

if TYPE_CHECKING:
    from conveyor.queue import Queue

log = logging.getLogger(__name__)

AUTH_CACHE_TTL_S = 5.0
"""How long a verified API key is trusted without asking the database again."""
AUTH_CACHE_SIZE = 10_000

T = TypeVar("T")


@dataclass
class ApiContext:
    """Per-process resources shared by every request (read through ``deps``)."""

    settings: Settings
    store: Store
    queues: QueueFactory
    dispatcher: ExecutionDispatcher
    _auth_cache: dict[str, tuple[str, str, float]] = field(default_factory=dict)
    _inflight: dict[str, asyncio.Task[Any]] = field(default_factory=dict)

    async def single_flight(self, key: str, factory: Callable[[], Awaitable[T]]) -> T:
        """Run ``factory()`` once for all concurrent callers with the same ``key``.

        Probes use it so that a burst of health checks costs one Redis and one database round
        trip; a caller that gives up (cancelled) does not cancel the shared probe.
        """
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.ensure_future(factory())
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._forget_flight(key, done))
        result: T = await asyncio.shield(task)
        return result

    def _forget_flight(self, key: str, task: asyncio.Task[Any]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]

    def execution_queue(self, region: str) -> Queue:
        """The queue object of ``workflow.execute.<region>``."""
        return self.dispatcher.queue(region)

    async def authenticate(self, token: str) -> tuple[str, str] | None:
        """``(tenant_id, key_id)`` of an active API key, or ``None``.

        Verified keys are cached for :data:`AUTH_CACHE_TTL_S` (keyed by the token's digest),
        so a revocation through another API process takes effect within that time; through
        this process it is immediate (:meth:`forget_key`).
        """
        digest = hash_secret(token)
        now = time.monotonic()
        hit = self._auth_cache.get(digest)
        if hit is not None and hit[2] > now:
            return hit[0], hit[1]
        key = await self.store.api_keys.verify(token)
        if key is None:
            self._auth_cache.pop(digest, None)
            return None
        if len(self._auth_cache) >= AUTH_CACHE_SIZE:
            self._auth_cache.clear()
        self._auth_cache[digest] = (key.tenant_id, key.id, now + AUTH_CACHE_TTL_S)
        return key.tenant_id, key.id

    def forget_key(self, key_id: str) -> None:
        """Drop a (revoked) key from the authentication cache."""
        for digest, entry in list(self._auth_cache.items()):
            if entry[1] == key_id:
                self._auth_cache.pop(digest, None)

    def known_regions(self, *extra: str) -> list[str]:
        """Configured regions, the default region and ``extra`` ones, in a stable order."""
        regions = [*self.settings.execution_regions, self.settings.default_region, *extra]
        return list(dict.fromkeys(r for r in regions if r))


def _log_death(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        exc = task.exception()
        log.error("api.heartbeat_died", extra={"error": repr(exc)}, exc_info=exc)


@contextlib.asynccontextmanager
async def open_context(settings: Settings, *, heartbeat: bool = True) -> AsyncIterator[ApiContext]:
    """Open the store (checking the schema) and the queues; close both on exit.

    Raises :class:`~conveyor.errors.SchemaOutOfDate` / ``DatabaseUnavailable`` before
    anything is served, and :class:`~conveyor.errors.ConfigError` when secrets are stored that
    ``SECRETS_KEY`` cannot decrypt.
    """
    async with AsyncExitStack() as stack:
        store = await stack.enter_async_context(Store(settings))
        await store.check_schema()
        await store.secrets.check_keys()  # ConfigError naming SECRETS_KEY: the process exits 2
        queues = await stack.enter_async_context(QueueFactory(settings))
        dispatcher = ExecutionDispatcher(queues, settings)
        ctx = ApiContext(settings, store, queues, dispatcher)
        tasks: list[asyncio.Task[Any]] = []
        beat: Heartbeat | None = None
        if heartbeat:
            beat = Heartbeat(queues, role="api", settings=settings, regions=[])
            task = asyncio.create_task(heartbeat_loop(beat), name="api.heartbeat")
            task.add_done_callback(_log_death)
            tasks.append(task)
        log.info("api.context_open", extra={"driver": queues.driver})
        try:
            yield ctx
        finally:
            await dispatcher.aclose(2.0)
            await cancel_tasks(tasks, 2.0)
            if beat is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(beat.remove(), timeout=2.0)
            log.info("api.context_closed")
