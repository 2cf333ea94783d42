"""Group commit for Lua script calls: concurrent callers share one pipeline.

Used by the fleet's tenant limits (:mod:`conveyor.dispatch.limits`) and by the bullmq worker to
complete the jobs that finish together (:mod:`conveyor.queue.bullmq.compat`); :func:`transaction`
sends a ``MULTI``/``EXEC`` the same way (the producer's bulk add).

On a plain (non-cluster) client the batch's ``EVALSHA`` commands are packed by ``hiredis`` in
one call each and written and read on one pooled connection, with the client's retry policy:
what redis-py's pipeline does, without its per-argument encoding in Python (~45 us of CPU for
a ``moveToFinished`` call's 22 arguments here, against ~7 us).
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from hiredis import pack_command  # redis[hiredis] is a dependency
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from conveyor.queue.connection import is_missing_script

if TYPE_CHECKING:
    import redis.asyncio as aioredis

__all__ = ["ScriptBatcher", "call_script", "transaction"]

_Call = tuple[str, str, Sequence[Any], Sequence[Any], "asyncio.Future[Any]"]


class ScriptBatcher:
    """Group commit for Lua script calls: concurrent callers share one pipeline
    (``EVALSHA`` each, no transaction); at most one pipeline is on its way at a time. A script
    Redis does not know (restart, ``SCRIPT FLUSH``, a promoted replica) is loaded and its
    calls sent again.

    ``cluster``: ``redis`` is a ``RedisCluster``, whose pipeline sends ``EVALSHA`` without
    ever loading a script — each script is loaded (``SCRIPT LOAD``: on every master) before
    its first call, and again on a ``NOSCRIPT``, once per batch whatever the number of calls
    the master refused (a plain client's ``SCRIPT LOAD`` reaches its one server the same way).
    """

    def __init__(self, redis: aioredis.Redis, *, cluster: bool = False) -> None:
        self._redis = redis
        self._cluster = cluster
        self._loaded: set[str] = set()
        """On Redis Cluster: the sources loaded on the masters (until a ``NOSCRIPT``)."""
        self._pending: list[_Call] = []
        self._sender: asyncio.Task[None] | None = None
        self.batches = 0
        self.loads = 0
        """``SCRIPT LOAD`` calls made (each reaches every master on a cluster)."""

    def submit(
        self, source: str, sha: str, names: Sequence[Any], args: Sequence[Any]
    ) -> asyncio.Future[Any]:
        """Queue one call now (calls reach Redis in the order they were submitted)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending.append((source, sha, names, args, future))
        if self._sender is None:
            self._sender = asyncio.create_task(self._send_all(), name="limits.script_batch")
        return future

    async def call(self, source: str, sha: str, names: Sequence[Any], args: Sequence[Any]) -> Any:
        return await self.submit(source, sha, names, args)

    async def _send_all(self) -> None:
        try:
            while self._pending:  # the last check and the reset below are one step
                batch, self._pending = self._pending, []
                await self._send(batch)
        finally:
            self._sender = None
            for *_rest, future in self._pending:  # cancelled: nobody else sends
                if not future.done():
                    future.cancel()

    async def _load(self, source: str) -> None:
        self.loads += 1
        await self._redis.script_load(source)
        self._loaded.add(source)

    async def _send(self, batch: list[_Call]) -> None:
        self.batches += 1
        try:
            results = await self._execute(batch)
        except BaseException as exc:
            self._loaded.clear()  # a failover may be why: check again next time
            for *_rest, future in batch:
                if not future.done():
                    future.set_exception(exc) if isinstance(exc, Exception) else future.cancel()
            if not isinstance(exc, Exception):
                raise
            return
        await self._send_missing_again(batch, results)
        for (*_rest, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)

    async def _execute(self, batch: list[_Call]) -> list[Any]:
        if not self._cluster:
            return await self._execute_packed(batch)
        for source in dict.fromkeys(call[0] for call in batch):
            if source not in self._loaded:
                await self._load(source)
        pipe = self._redis.pipeline(transaction=False)
        for _source, sha, names, args, _future in batch:
            pipe.evalsha(sha, len(names), *names, *args)
        return list(await pipe.execute(raise_on_error=False))

    async def _execute_packed(self, batch: list[_Call]) -> list[Any]:
        """The batch written at once and its replies read in order (an error reply is that
        call's result), see :func:`_send_packed`."""
        packed = b"".join(
            _evalsha(sha, names, args) for _source, sha, names, args, _future in batch
        )
        return await _send_packed(self._redis, packed, len(batch))

    async def _send_missing_again(self, batch: list[_Call], results: list[Any]) -> None:
        """Load each script Redis did not know once, then send its refused calls again (in
        order); ``results`` is updated in place."""
        missing = [i for i, result in enumerate(results) if is_missing_script(result)]
        if not missing:
            return
        try:
            for source in dict.fromkeys(batch[i][0] for i in missing):
                self._loaded.discard(source)
                await self._load(source)
        except Exception as exc:
            for i in missing:
                results[i] = exc
            return
        for i in missing:
            _source, sha, names, args, _future = batch[i]
            try:
                results[i] = await self._redis.evalsha(sha, len(names), *names, *args)
            except Exception as exc:
                results[i] = exc


async def call_script(
    redis: aioredis.Redis, source: str, sha: str, names: Sequence[Any], args: Sequence[Any]
) -> Any:
    """One ``EVALSHA`` on a plain (non-cluster) client, packed as :class:`ScriptBatcher` packs
    its calls, for a caller that makes one call at a time: redis-py's ``Script`` call without
    its per-argument encoding in Python. A script Redis does not know (restart, ``SCRIPT
    FLUSH``, a promoted replica) is loaded and the call sent again; an error reply is raised."""
    packed = _evalsha(sha, names, args)
    (result,) = await _send_packed(redis, packed, 1)
    if is_missing_script(result):
        await redis.script_load(source)
        (result,) = await _send_packed(redis, packed, 1)
    if isinstance(result, Exception):
        raise result
    return result


_MULTI = pack_command((b"MULTI",))
_EXEC = pack_command((b"EXEC",))


async def transaction(redis: aioredis.Redis, commands: Sequence[Sequence[Any]]) -> list[Any]:
    """``MULTI``, ``commands``, ``EXEC`` on a plain (non-cluster) client, packed by ``hiredis``
    and written at once, the replies read in order on one pooled connection: redis-py's
    transaction pipeline without its per-argument encoding in Python and without the
    ``SCRIPT EXISTS`` round trip it makes before any ``EVALSHA`` (the caller handles
    ``NOSCRIPT``).

    Returns ``EXEC``'s reply: one result per command, a command's error reply being its result
    (a ``ResponseError``, as Redis runs the others — a ``NOSCRIPT`` among them). A command Redis
    refuses when queued aborts the whole transaction: its error is raised and nothing ran.

    The replies are read without the client's per-read socket timeout (one timer per reply
    costs more than packing the commands): the caller bounds the call (``asyncio.timeout``),
    and a cancelled read closes the connection."""
    packed = b"".join(
        (_MULTI, *[pack_command(tuple(_plain(arg) for arg in cmd)) for cmd in commands], _EXEC)
    )
    replies = await _send_packed(redis, packed, len(commands) + 2, read_timeout=math.inf)
    for reply in replies[:-1]:  # MULTI's OK, then QUEUED for each command
        if isinstance(reply, Exception):
            raise reply
    result = replies[-1]
    if isinstance(result, Exception):  # EXECABORT
        raise result
    if not isinstance(result, list) or len(result) != len(commands):
        raise ResponseError(f"unexpected EXEC reply: {result!r:.200}")
    return result


async def _send_packed(
    redis: aioredis.Redis, packed: bytes, replies: int, *, read_timeout: float | None = None
) -> list[Any]:
    """``packed`` written at once and ``replies`` replies read in order on one pooled
    connection (an error reply is returned, not raised). ``read_timeout``: each read's, as
    redis-py's ``read_response`` takes it (``None``: the client's socket timeout;
    ``math.inf``: none).

    A lost connection (a pooled one gone stale when Redis restarted) is retried as the client's
    commands are, on a fresh connection. A reply later than the socket timeout is not: Redis
    has the calls and may have run them, and a script run twice is not harmless — a release
    would pop parked jobs twice (the first pop's never promoted), an acquire would take a
    second start token, a completion would find its job gone. The timeout is raised."""
    pool: Any = redis.connection_pool
    conn = await pool.get_connection()

    async def attempt() -> list[Any]:
        try:
            return await _round_trip(conn, packed, replies, read_timeout)
        except RedisTimeoutError as exc:
            raise _Late from exc  # not one of the errors the retry policy sends again on

    try:
        results: list[Any] = await conn.retry.call_with_retry(
            attempt, lambda _error: conn.disconnect()
        )
    except _Late as late:
        timeout = late.__cause__
        assert timeout is not None
        raise timeout from None
    finally:
        await pool.release(conn)
    return results


class _Late(Exception):
    """A reply was later than the socket timeout (its ``__cause__``): not sent again."""


def _evalsha(sha: str, names: Sequence[Any], args: Sequence[Any]) -> bytes:
    """One ``EVALSHA`` call packed by ``hiredis``."""
    packed: bytes = pack_command(
        (b"EVALSHA", sha, len(names), *names, *[_plain(arg) for arg in args])
    )
    return packed


def _plain(arg: Any) -> Any:
    """An argument as redis-py would send it (``repr`` of a float); ``hiredis`` packs str,
    bytes and int alike and refuses anything else (a bool too, as redis-py does)."""
    return repr(arg) if type(arg) is float else arg


async def _round_trip(
    conn: Any, packed: bytes, replies: int, read_timeout: float | None = None
) -> list[Any]:
    await conn.send_packed_command(packed)
    results: list[Any] = []
    try:
        for _ in range(replies):
            try:
                results.append(await conn.read_response(timeout=read_timeout))
            except ResponseError as exc:
                results.append(exc)
    except BaseException:
        # Replies still on the socket: never hand the connection back to be read by another.
        await conn.disconnect(nowait=True)
        raise
    return results
