"""Group commit: concurrent callers share one statement and one commit.

Used by the API's triggers (:mod:`conveyor.store.triggers`) and by the worker's claims and
step writes on PostgreSQL (:mod:`conveyor.store.pg.runs`). Each trigger request must know its
execution row was committed before it enqueues the job, and one insert is a round trip and a commit (a WAL flush on Postgres, a file sync on SQLite) — the
database's share of a trigger. :class:`GroupCommit` lets concurrent callers share it, as
:class:`~conveyor.dispatch.EnqueueBatcher` does for the Redis round trips: a caller hands its
item over and waits; while one batch is on its way to the database, the items that arrive
meanwhile gather and go together as the next batch (ONE statement, ONE commit). A lone caller
is sent at once on its own — it never waits for a batch to fill — so an idle process adds no
latency.

Nothing is weakened: every caller gets ITS own result once the batch's transaction committed
(or the batch's error — a database failure fails the whole batch, which stored nothing, and
each of its callers sees it).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from conveyor.errors import ConveyorError, DatabaseUnavailable

__all__ = ["GroupCommit", "each_alone"]

log = logging.getLogger(__name__)

In = TypeVar("In")
Out = TypeVar("Out")

MAX_BATCH = 128
"""Most items sent in one batch."""
MAX_IN_FLIGHT = 1
"""Most batches on their way to the database at once."""


class GroupCommit(Generic[In, Out]):
    """Coalesces concurrent :meth:`submit` calls into batches (no I/O until used): a batch of
    one goes to ``send_one``, a larger one to ``send_many``, which returns one result per item,
    in order.

    At most ``max_in_flight`` batches are on their way at once; an item arriving while all of
    them are busy waits for the next free one, together with the others that arrive meanwhile.
    """

    def __init__(
        self,
        send_one: Callable[[In], Awaitable[Out]],
        send_many: Callable[[Sequence[In]], Awaitable[Sequence[Out]]],
        *,
        name: str,
        max_batch: int = MAX_BATCH,
        max_in_flight: int = MAX_IN_FLIGHT,
        orphaned: Callable[[In, Out], None] | None = None,
    ) -> None:
        self._send_one = send_one
        self._send_many = send_many
        self._orphaned = orphaned
        """Told of each item whose caller was cancelled before its batch's result came: what
        was stored for nobody (a claim nobody runs: give it back)."""
        self._name = name
        self._max_batch = max_batch
        self._max_in_flight = max_in_flight
        self._pending: list[tuple[In, asyncio.Future[Out]]] = []
        self._senders: set[asyncio.Task[None]] = set()
        self._starting = False  # a sender was started and has not taken its batch yet
        self.batches = 0
        """Batches sent so far (of any size): tests and metrics read it."""
        self.items = 0
        """Items sent so far (``items / batches`` is the mean batch size)."""

    @property
    def waiting(self) -> int:
        """Items handed over and not yet taken into a batch."""
        return len(self._pending)

    async def submit(self, item: In) -> Out:
        """``item``'s own result; raises what its batch raised.

        Cancelling the caller does not withdraw the item: it may still be stored (a trigger's
        ``queued`` row is then enqueued by the reconciler, as when a request is cancelled
        mid-statement); ``orphaned`` is then told of its result.
        """
        future: asyncio.Future[Out] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if not self._starting and len(self._senders) < self._max_in_flight:
            self._starting = True
            sender = asyncio.create_task(self._send_all(), name=self._name)
            self._senders.add(sender)
        return await future

    async def _send_all(self) -> None:
        # The sender leaves ``_senders`` in the same step in which it finds nothing more to
        # send (not in a done-callback, which runs later): a caller woken by its last batch
        # that submits again at once must see a free slot and start a sender of its own.
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
                _settle(self._pending, None, asyncio.CancelledError())
                self._pending.clear()

    async def _send(self, batch: list[tuple[In, asyncio.Future[Out]]]) -> None:
        self.batches += 1
        self.items += len(batch)
        try:
            if len(batch) == 1:
                results: Sequence[Out] = [await self._send_one(batch[0][0])]
            else:
                results = await self._send_many([item for item, _future in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{len(results)} results for a batch of {len(batch)}")
        except BaseException as exc:
            _settle(batch, None, exc)
            if not isinstance(exc, Exception):
                raise
            return
        _settle(batch, results, None)
        if self._orphaned is not None:
            for (item, future), result in zip(batch, results, strict=True):
                if future.cancelled():
                    try:
                        self._orphaned(item, result)
                    except Exception:
                        log.exception("store.orphan_failed", extra={"batch": self._name})


def _settle(
    batch: Sequence[tuple[object, asyncio.Future[Out]]],
    results: Sequence[Out] | None,
    error: BaseException | None,
) -> None:
    """Wake the callers of ``batch`` (those still waiting)."""
    for index, (_item, future) in enumerate(batch):
        if future.done():
            continue
        if results is not None:
            future.set_result(results[index])
        elif isinstance(error, Exception):
            future.set_exception(error)
        else:
            future.cancel()


async def each_alone(
    items: Sequence[In], send_one: Callable[[In], Awaitable[Out]]
) -> list[Out | ConveyorError]:
    """A batch the database refused for one item's sake, sent one item at a time: an error the
    database gives for an item is that item's answer alone, not its neighbours' (stored, or
    claimed, they are answered as such). Once the database is unavailable, the items not sent
    yet are answered so without trying."""
    answers: list[Out | ConveyorError] = []
    down: DatabaseUnavailable | None = None
    for item in items:
        if down is not None:
            answers.append(down)
            continue
        try:
            answers.append(await send_one(item))
        except DatabaseUnavailable as exc:
            down = exc
            answers.append(exc)
        except ConveyorError as exc:
            answers.append(exc)
    return answers
