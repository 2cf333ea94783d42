"""Group commit for enqueues: concurrent requests share Redis round trips.

Each trigger must add its job before it answers, and one :meth:`ExecutionDispatcher.enqueue`
costs two Redis round trips (the fairness count script, then BullMQ's add script) — most of a
trigger's CPU. :class:`EnqueueBatcher` lets concurrent requests share them: a request hands its
payload over and waits; while one batch is on its way to Redis, the payloads that arrive meanwhile
gather and go together as the next batch with :meth:`ExecutionDispatcher.enqueue_many` (one
count script call and one bulk add for the whole batch). A lone request is sent at once with
:meth:`~ExecutionDispatcher.enqueue`, so an idle API adds no latency.

Nothing is weakened: every caller still returns only after ITS job was added (or raises the
dispatcher's error — a Redis failure fails the whole batch, and each of its callers answers
503); job id = execution id, so a job that was added although its caller gave up is harmless.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from conveyor.dispatch import ExecutionDispatcher
    from conveyor.queue import WorkflowExecute

log = logging.getLogger(__name__)

MAX_BATCH = 64
"""Most payloads sent in one batch."""

_Item = tuple["WorkflowExecute", "asyncio.Future[None]"]


class EnqueueBatcher:
    """Coalesces concurrent :meth:`enqueue` calls into dispatcher batches (no I/O until used)."""

    def __init__(self, dispatcher: ExecutionDispatcher, *, max_batch: int = MAX_BATCH) -> None:
        self._dispatcher = dispatcher
        self._max_batch = max_batch
        self._pending: list[_Item] = []
        self._sender: asyncio.Task[None] | None = None

    async def enqueue(self, payload: WorkflowExecute) -> None:
        """Add ``payload``'s job (job id = execution id); raises what the dispatcher raises.

        Cancelling the caller does not withdraw the job: it may still be added (harmless).
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((payload, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_all(), name="api.enqueue_batch")
        await future

    async def _send_all(self) -> None:
        try:
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                await self._send(batch)
        finally:
            self._sender = None
            if self._pending:  # cancelled: nobody will send these
                _settle(self._pending, asyncio.CancelledError())
                self._pending.clear()

    async def _send(self, batch: list[_Item]) -> None:
        try:
            if len(batch) == 1:
                await self._dispatcher.enqueue(batch[0][0])
            else:
                await self._dispatcher.enqueue_many([payload for payload, _future in batch])
        except BaseException as exc:
            _settle(batch, exc)
            if not isinstance(exc, Exception):
                raise
            return
        _settle(batch, None)


def _settle(batch: list[_Item], error: BaseException | None) -> None:
    """Wake the callers of ``batch`` (those still waiting)."""
    for _payload, future in batch:
        if future.done():
            continue
        if error is None:
            future.set_result(None)
        elif isinstance(error, Exception):
            future.set_exception(error)
        else:
            future.cancel()
