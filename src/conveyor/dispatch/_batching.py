"""Group commit for enqueues: concurrent callers share Redis round trips.

Each producer (a trigger request, a cron tick, a fired timer, a recovered execution) must know
its job was added before it moves on, and one enqueue is a round trip to Redis (the fairness
count and BullMQ's add in one ``MULTI``) — most of a trigger's CPU. :class:`EnqueueBatcher` lets
concurrent callers share it: a caller hands its payload over and waits; while one batch is on
its way to Redis, the payloads that arrive meanwhile gather and go together as the next batch
(one count script call and one bulk add for the whole batch). A lone caller is sent at once
on its own, so an idle process adds no latency.

Nothing is weakened: every caller still returns only after ITS job was added (or raises the
dispatcher's error — a Redis failure fails the whole batch, and each of its callers sees it);
job id = execution id, so a job that was added although its caller gave up is harmless.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from conveyor.queue import WorkflowExecute

log = logging.getLogger(__name__)

MAX_BATCH = 64
"""Most payloads sent in one batch."""
MAX_IN_FLIGHT = 1
"""Most batches on their way to Redis at once."""

_Item = tuple["WorkflowExecute", "asyncio.Future[None]"]


class EnqueueBatcher:
    """Coalesces concurrent :meth:`enqueue` calls into batches (no I/O until used): a batch of
    one goes to ``send_one``, a larger one to ``send_many``.

    At most ``max_in_flight`` batches are on their way to Redis at once; a request arriving
    while all of them are busy waits for the next free one, together with the others that
    arrive meanwhile.
    """

    def __init__(
        self,
        send_one: Callable[[WorkflowExecute], Awaitable[Any]],
        send_many: Callable[[Sequence[WorkflowExecute]], Awaitable[Any]],
        *,
        max_batch: int = MAX_BATCH,
        max_in_flight: int = MAX_IN_FLIGHT,
    ) -> None:
        self._send_one = send_one
        self._send_many = send_many
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._pending: list[_Item] = []
        self._senders: set[asyncio.Task[None]] = set()
        self._starting = False  # a sender was started and has not taken its batch yet

    async def enqueue(self, payload: WorkflowExecute) -> None:
        """Add ``payload``'s job (job id = execution id); raises what the dispatcher raises.

        Cancelling the caller does not withdraw the job: it may still be added (harmless).
        """
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((payload, future))
        if not self._starting and len(self._senders) < self._max_in_flight:
            self._starting = True
            sender = asyncio.create_task(self._send_all(), name="dispatch.enqueue_batch")
            self._senders.add(sender)
        await future

    async def close(self, timeout_s: float = 2.0) -> None:
        """Let the batches on their way finish (at most ``timeout_s``), then cancel them."""
        senders = list(self._senders)
        if not senders:
            return
        _done, late = await asyncio.wait(senders, timeout=timeout_s)
        for sender in late:
            sender.cancel()
        if late:
            log.warning("dispatch.enqueue_batches_cancelled", extra={"batches": len(late)})
            await asyncio.wait(late)

    async def _send_all(self) -> None:
        # The sender leaves ``_senders`` in the same step in which it finds nothing more to
        # send (not in a done-callback, which runs later): a caller woken by its last batch
        # that enqueues again at once must see a free slot and start a sender of its own.
        me = asyncio.current_task()
        started = False
        try:
            while self._pending:
                batch = self._pending[: self._max_batch]
                del self._pending[: self._max_batch]
                if not started:
                    started, self._starting = True, False
                await self._send(batch)
        finally:
            self._senders.discard(me)
            if not started:
                self._starting = False
            if self._pending and not self._senders:  # cancelled, nobody else sends
                _settle(self._pending, asyncio.CancelledError())
                self._pending.clear()

    async def _send(self, batch: list[_Item]) -> None:
        try:
            if len(batch) == 1:
                await self._send_one(batch[0][0])
            else:
                await self._send_many([payload for payload, _future in batch])
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
