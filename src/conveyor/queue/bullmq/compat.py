"""The one module that reaches inside ``bullmq`` (the Python port, pinned in ``pyproject.toml``).

Everything else in Conveyor uses bullmq's public surface only (``Queue``/``Worker``/
``QueueEvents`` constructors, ``add``, ``addBulk``, ``getJobState``, ``remove``, ``on``, ``run``,
``close``, ``pause``/``resume``, ``Job`` data). What Conveyor needs beyond it is here, so a bullmq
upgrade breaks in one place:

* :class:`FetchingWorker` — ``bullmq.Worker`` with Node BullMQ's fetch discipline (below).
* :class:`StreamConsumer` — ``bullmq.QueueEvents`` that hands stream entries to our emitter.
* small functions for what the worker and queue wrappers do to bullmq objects: a dedicated
  blocking connection, observers on lock renewals and fetches, server capabilities, the
  count-and-add transaction, the bulk add (bullmq's own script calls, sent without redis-py's
  pipeline), counts, priorities and promotion through bullmq's scripts.

:data:`RELIED_ON` lists every internal attribute used here and :func:`missing_internals`
checks them against the installed bullmq (``tests/queue/test_bullmq_compat.py`` runs it), so an
upgrade that renames or reshapes one fails with a message naming it. ``docs/bullmq-notes.md``
describes the bullmq bugs worked around here, with reproductions.

The fetch loop
--------------
The Python port's ``Worker.run`` starts up to ``concurrency`` fetches *at once* whenever a slot
frees, and most of them run ``moveToActive`` against an empty queue: at 100 jobs/s with
concurrency 10 that is ~25 Lua calls per job, which costs the worker ~5 ms of CPU per job and
puts every new job behind a queue of useless round trips (a p99 enqueue-to-start latency of
15+ ms instead of a few). It also completes a job and fetches the next one in two calls.

:class:`FetchingWorker` replaces the loop with Node BullMQ's (``Worker.mainLoop``):

* Fetches run **one at a time**: a non-blocking ``moveToActive`` while jobs keep coming, and
  when the queue is drained exactly one blocking wait (``BZPOPMIN`` on the marker) alongside
  the jobs in progress.
* A finishing job **fetches the next one in the same call** (``moveToFinished`` with
  ``fetchNext``) as long as the worker is not over its concurrency, so a busy worker makes one
  call per job.
* Jobs that finish together **complete together**: their ``moveToFinished`` calls (one each,
  as bullmq's — same keys, arguments, lock token, events and ``removeOnComplete``) go to Redis
  in one pipeline (:class:`~conveyor.queue.scripts.ScriptBatcher`), one write and one read for
  all. A lone completion goes at once; those made while a pipeline is on its way go with the
  next. Each job's call succeeds or fails on its own (a job whose lock was lost fails as with
  bullmq's own call, the others complete).

Everything else (locks, stalled-job checks, events, pause and close) is bullmq's own; only
``run`` and ``processJob`` are replaced, and both keep bullmq's bookkeeping (``processing``,
``jobs``, ``waiting``, the lock manager) so ``close()``/``pause()`` work unchanged.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import bullmq
import redis.asyncio as aioredis
from bullmq.custom_errors import DelayedError, UnrecoverableError, WaitingChildrenError
from bullmq.redis_connection import RedisConnection
from bullmq.scripts import raw2NextJobData
from bullmq.timer import Timer
from bullmq.utils import extract_result, is_redis_cluster
from redis.exceptions import ResponseError

from conveyor.queue._base import QueueEvent, ScriptCall
from conveyor.queue._emitter import Emitter
from conveyor.queue.connection import is_missing_script
from conveyor.queue.scripts import ScriptBatcher, transaction

__all__ = [
    "RELIED_ON",
    "FetchingWorker",
    "Internal",
    "StreamConsumer",
    "active_job_count",
    "add_bulk",
    "add_in_transaction",
    "change_priority",
    "concurrency",
    "get_counts",
    "is_missing_script",
    "job_exists",
    "load_add_scripts",
    "missing_internals",
    "new_job",
    "node_worker_client_name",
    "observe_fetches",
    "observe_lock_renewals",
    "promote",
    "set_server_capabilities",
    "use_blocking_client",
]


class FetchingWorker(bullmq.Worker):  # type: ignore[misc]  # bullmq is untyped
    """See the module docstring. Construct with ``autorun=False`` and await :meth:`run`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.processing: set[asyncio.Future[Any]] = set()
        """Fetches and jobs in progress (bullmq's own ``close``/``pause`` wait for them)."""
        self.running: bool = False
        self._client_name_set: bool = False
        self._blocked = False
        """A blocking fetch is in flight (at most one at a time)."""
        self._woken = False
        """The last blocking fetch got a job: the next fetch blocks too. Taking a job leaves
        a marker (for other workers) that ends the next wait at once, so a non-blocking fetch
        here would find the queue empty and be followed by that same wait and fetch anyway:
        one ``moveToActive`` per job saved at low rates."""
        self._tokens = 0
        self._loop_done = asyncio.Event()
        """Set when :meth:`run` has returned (every job it started has ended)."""
        conn = self.backend.connection.conn
        self._finisher = ScriptBatcher(conn, cluster=is_redis_cluster(conn))
        """Sends the completions of jobs that finish together in one pipeline."""

    # -- connection names ---------------------------------------------------------------------
    async def _ensure_client_names(self) -> None:
        """Name the connections as Node BullMQ does, so BullMQ dashboards see this worker.

        Node's ``Queue.getWorkers()`` (Bull Board's "workers" view) lists the clients named
        ``<prefix>:<base64(queue)>:w:<worker name>``; bullmq-python names its connections
        ``<prefix>:<queue>:w:<name>``, which Node never matches. The blocking connection (one
        per worker, like Node's) gets Node's name; the command connections keep bullmq's, so the
        worker is listed once."""
        if self._client_name_set:
            return
        await self.backend.connection.set_client_name(self.clientName)
        blocking = self.backend.blocking_connection
        if blocking is not None:
            await blocking.set_client_name(node_worker_client_name(self))
        self._client_name_set = True

    # -- the loop ---------------------------------------------------------------------------
    async def run(self) -> None:
        if self.running:
            raise RuntimeError("Worker is already running")
        await self._ensure_client_names()
        self.lockManager.start()
        self.stalledCheckTimer = Timer(
            self.opts["stalledInterval"] / 1000, self.runStalledJobsCheck, self.emit
        )
        self.running = True
        try:
            while not self.closed:
                if self.paused and not self.closing and not self.processing:
                    await self.resume_event.wait()  # jobs fetched before the pause have started
                    continue
                await self._fill()
                if not self.processing:
                    if self.closing:
                        break
                    continue
                done, self.processing = await asyncio.wait(
                    self.processing, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    if task.cancelled():  # close(force=True) cancelled it
                        continue
                    job = extract_result(task, self.emit)
                    if job is not None:
                        self._start(job)
                if self.closing and not self.processing:
                    break
        finally:
            await self._stopped()

    async def close(self, force: bool = False) -> None:
        """bullmq's ``close``; a graceful one first waits for :meth:`run` to end. bullmq's waits
        only for the tasks in progress when it is called, not for a job that a completion or
        fetch then in flight brings back (already active and locked to this worker)."""
        if not force and self.running:
            self.closing = True
            self.paused = False
            self.resume_event.set()
            if self.waiting is not None:
                self.waiting.cancel()
            await asyncio.shield(self._loop_done.wait())
        await super().close(force=force)

    async def _stopped(self) -> None:
        """Release what ``run`` started, also when it ends by cancellation or an error
        (a graceful ``close()`` has waited for the jobs; a forced one cancelled them)."""
        self._loop_done.set()
        self.running = False
        if not self.closing:
            for task in self.processing:
                task.cancel()
            if self.waiting is not None and not self.waiting.done():
                self.waiting.cancel()
            if self.processing:
                await asyncio.gather(*self.processing, return_exceptions=True)
            self.processing.clear()
        self.stalledCheckTimer.stop()
        await self.lockManager.close()

    async def _fill(self) -> None:
        """Fetch until every slot is taken, the queue is drained (then leave one blocking
        fetch running) or the worker is closing/paused. One fetch at a time."""
        concurrency = self.opts["concurrency"]
        while (
            not self._blocked
            and len(self.processing) < concurrency
            and not self.closing
            and not self.paused
        ):
            self._tokens += 1
            token = f"{self.id}:{self._tokens}"
            if self.drained or self._woken:
                self._woken = False
                self._blocked = True
                self.processing.add(asyncio.ensure_future(self._fetch(token, block=True)))
                return
            job = await self._fetch(token, block=False)
            if job is not None:
                self._start(job)

    def _start(self, job: Any) -> None:
        if self.forceClosing:
            return  # like the jobs just cancelled: its lock expires, it is recovered as stalled
        self.processing.add(asyncio.ensure_future(self.processJob(job, job.token)))

    async def _fetch(self, token: str, *, block: bool) -> Any:
        """One fetch with bullmq's retry policy (connection errors: retried after
        ``runRetryDelay``, until the worker closes; other errors: emitted, ``None``)."""

        async def attempt() -> Any:
            # bullmq retries a connection error at once (no delay) while closing: stop instead.
            stopped = self.closing or self.paused
            return None if stopped else await self.fetch_next(token, block)

        try:
            return await self.retryIfFailed(
                attempt, {"delay_in_ms": self.opts["runRetryDelay"], "only_emit_error": True}
            )
        finally:
            if block:
                self._blocked = False

    async def fetch_next(self, token: str, block: bool) -> Any:
        """The next job, or ``None``. ``block``: wait for one first (``BZPOPMIN`` on the
        queue's marker, up to ``drainDelay`` or the next delayed job's due time)."""
        if block:
            self.waiting = asyncio.ensure_future(self.waitForJob())
            try:
                self.blockUntil = await self.waiting
            except asyncio.CancelledError:
                if not self.paused and not self.closing:
                    raise
                return None  # pause()/close() cancelled the wait
            finally:
                self.waiting = None
            if self.blockUntil > 0 and self.blockUntil > int(time.time() * 1000):
                return None  # woken for a delayed job that is not due yet: wait again
        job = await self.moveToActive(token)
        if job is not None:
            self._woken = block
            self.emit("active", job, "waiting")
        return job

    # -- one job ----------------------------------------------------------------------------
    async def processJob(self, job: Any, token: str) -> Any:
        """bullmq's ``processJob``, except that completing a job also fetches the next one
        (returned, to be started by the loop) while the worker is within its concurrency."""
        opts = self.opts
        for key in ("removeOnComplete", "removeOnFail"):
            if key not in job.opts and key in opts:
                job.opts[key] = opts[key]
        self.jobs.add((job, token))
        controller = self.lockManager.track_job(
            job.id,
            token,
            int(time.time() * 1000),
            should_create_controller=self._processor_wants_signal,
        )
        try:
            if job.deferredFailure:
                await job.moveToFailed(UnrecoverableError(job.deferredFailure), token)
                self.emit("failed", job, UnrecoverableError(job.deferredFailure))
                return None
            if controller is not None:
                result = await self.processor(job, token, controller.signal)
            else:
                result = await self.processor(job, token)
            fetched = None
            if not self.forceClosing:
                fetch = (
                    not self.closing
                    and not self.paused
                    and len(self.processing) <= opts["concurrency"]
                )
                done = await self._move_to_completed(
                    job, result, job.opts.get("removeOnComplete", False), token, fetch
                )
                job.returnvalue = result
                job.attemptsMade = job.attemptsMade + 1
                if fetch:
                    fetched = done
        except (DelayedError, WaitingChildrenError):
            return None
        except Exception as err:
            try:
                if not self.forceClosing:
                    await job.moveToFailed(err, token)
                self.emit("failed", job, err)
            except Exception as failure:
                self.emit("error", failure, job)
            return None
        finally:
            self.jobs.discard((job, token))
            self.lockManager.untrack_job(job.id)
        # The job is completed: whatever fails from here on must not fail it.
        try:
            self.emit("completed", job, result)
            return None if fetched is None else await self._next_from(fetched, token)
        except Exception as err:
            self.emit("error", err, job)
            return None  # a fetched job left active is recovered as stalled

    async def _move_to_completed(
        self, job: Any, result: Any, remove_on_complete: Any, token: str, fetch: bool
    ) -> Any:
        """bullmq's ``moveToCompleted`` (``Scripts.moveToFinished``: same keys, arguments and
        error mapping) with the call sent through :attr:`_finisher`; the next job's raw data
        when ``fetch``."""
        scripts = self.backend.scripts
        keys, args = scripts.moveToCompletedArgs(job, result, remove_on_complete, token, fetch)
        script = self.backend.connection.commands["moveToFinished"]
        raw = await self._finisher.call(script.script, script.sha, keys, args)
        if raw is None:
            return None
        if isinstance(raw, int) and raw < 0:
            raise scripts.finishedErrors(
                {"code": raw, "jobId": job.id, "command": "moveToFinished", "state": "active"}
            )
        return raw2NextJobData(raw)

    async def _next_from(self, result: Any, token: str) -> Any:
        """The job ``moveToFinished`` fetched (``None`` when the queue was empty)."""
        job_data, job_id, limit_until, delay_until = result or (None, None, 0, 0)
        job = await self.nextJobFromJobData(
            job_data, job_id, int(limit_until or 0), int(delay_until or 0), token
        )
        if job is not None:
            self.emit("active", job, "waiting")
        return job


def node_worker_client_name(worker: Any) -> str:
    """The Redis client name Node BullMQ gives a worker of ``worker``'s queue."""
    queue64 = base64.b64encode(str(worker.name).encode()).decode()
    suffix = f":w:{worker.workerName}" if worker.workerName else ""
    return f"{worker.opts['prefix']}:{queue64}{suffix}"


class StreamConsumer(bullmq.QueueEvents):  # type: ignore[misc]  # bullmq is untyped
    """``bullmq.QueueEvents`` that hands entries straight to Conveyor's emitter.

    It remembers the last entry id so a reconnect resumes where the stream was left, and
    builds event objects only for events someone listens to (the stream carries several
    entries per job, so this keeps a busy queue cheap to watch). Overrides bullmq's private
    ``_dispatch_entry``.
    """

    def __init__(
        self, name: str, opts: dict[str, Any], sink: Emitter, label: str | None = None
    ) -> None:
        super().__init__(name, opts)
        self.sink = sink
        self.label = name if label is None else label
        """The queue's name in the events emitted (Conveyor's, without a cluster hash tag)."""
        self.last_id: str = opts.get("lastEventId") or "$"

    def _dispatch_entry(self, entry_id: str, args: dict[str, Any]) -> None:
        self.last_id = entry_id
        event = args.pop("event", None)
        if not event or not self.sink.has(event):
            return
        if event == "completed" and "returnvalue" in args:
            with contextlib.suppress(TypeError, ValueError):
                args["returnvalue"] = json.loads(args["returnvalue"])
        self.sink.emit(QueueEvent(event, self.label, args.get("jobId"), args))


# -- what the worker wrapper does to a FetchingWorker -------------------------------------------
def use_blocking_client(worker: Any, client: aioredis.Redis) -> None:
    """Give ``worker`` its own connection for the blocking ``BZPOPMIN`` (bullmq would reuse the
    command client, whose read timeout is shorter than the block)."""
    blocking = RedisConnection(client, skipVersionCheck=True)
    worker.backend.blocking_connection = blocking
    worker.blockingRedisConnection = blocking
    worker.bclient = client


def observe_lock_renewals(
    worker: Any,
    wrap: Callable[[Callable[..., Awaitable[Any]]], Callable[..., Awaitable[Any]]],
) -> None:
    """Route bullmq's lock renewals (``extendLocks(job_ids, tokens, duration)``, returning the
    ids it could not renew) through ``wrap(original)``."""
    worker.backend.extendLocks = wrap(worker.backend.extendLocks)


def observe_fetches(
    worker: Any,
    wrap: Callable[[Callable[[str, bool], Awaitable[Any]]], Callable[[str, bool], Awaitable[Any]]],
) -> None:
    """Route :meth:`FetchingWorker.fetch_next` through ``wrap(original)``."""
    worker.fetch_next = wrap(worker.fetch_next)


def set_server_capabilities(worker: Any, version: tuple[int, ...]) -> None:
    """Tell bullmq what the server can do (it assumes Redis 5 when the version check is
    skipped, and then rounds every block up to whole seconds: delayed jobs run late)."""
    capabilities = {
        "canBlockFor1Ms": version >= (7, 0, 8),
        "canDoubleTimeout": version >= (6, 0, 0),
    }
    worker.backend.connection.capabilities = capabilities
    worker.backend.blocking_connection.capabilities = capabilities


def active_job_count(worker: Any) -> int:
    """Jobs the worker is running now."""
    return len(worker.jobs)


def concurrency(worker: Any) -> int:
    return int(worker.opts["concurrency"])


# -- what the queue wrapper does through bullmq's scripts ---------------------------------------
async def add_in_transaction(
    queue: Any, script: Any, call: ScriptCall, job: Any, *, check_scripts: bool
) -> list[Any]:
    """``MULTI; EVALSHA call; EVALSHA addJob; EXEC`` in one write (``script`` is ``call``'s
    source registered on the queue's client); ``[call's result, the job id]``.

    On a plain client the two calls go through :func:`transaction` (hiredis packing, one
    write, one read, no ``SCRIPT EXISTS``), bullmq's own ``Scripts.addJob`` recording its call
    as in :func:`add_bulk`. A script Redis lost (restart, ``SCRIPT FLUSH``) is loaded and only
    the call it refused is sent again: Redis ran the other one (a ``NOSCRIPT`` inside ``EXEC``
    does not stop the rest), so nothing runs twice. (A lost count script with the add run
    counts the job as already there — 0 — as a duplicate delivery would: drift the fairness
    ledger's clamp repairs.) ``check_scripts`` is then not needed.

    On Redis Cluster redis-py's cluster pipeline is used; it never checks nor loads scripts:
    with ``check_scripts`` this loads ``script`` and bullmq's add scripts on every master first
    (``SCRIPT LOAD``), and the caller calls again with it on ``NoScriptError``. Every key of
    both calls is in the queue's slot (a hash tag), as a transaction on a cluster requires."""
    conn = queue.backend.connection.conn
    if is_redis_cluster(conn):
        if check_scripts:
            await load_add_scripts(queue, script.script)
        async with conn.pipeline(transaction=True) as pipe:
            await script(keys=list(call.keys), args=list(call.args), client=pipe)
            await queue.backend.scripts.addJob(job, pipe)
            results: list[Any] = await pipe.execute()
            return results
    recorder = _CallRecorder()
    await queue.backend.scripts.addJob(job, recorder)
    count = (b"EVALSHA", script.sha, len(call.keys), *call.keys, *call.args)
    return await _send_adds(queue, [count, *recorder.calls], script)


ADD_SCRIPTS = ("addStandardJob", "addPrioritizedJob", "addDelayedJob")
"""The bullmq scripts ``Scripts.addJob`` picks from (by the job's delay and priority)."""


class _CallRecorder:
    """Stands in for the pipeline ``Scripts.addJob`` queues its ``EVALSHA`` on: records it."""

    __slots__ = ("calls",)

    def __init__(self) -> None:
        self.calls: list[tuple[Any, ...]] = []

    async def evalsha(self, sha: str, numkeys: int, *keys_and_args: Any) -> None:
        self.calls.append((b"EVALSHA", sha, numkeys, *keys_and_args))


async def add_bulk(queue: Any, jobs: Sequence[dict[str, Any]]) -> list[Any]:
    """bullmq's ``Queue.addBulk`` on a plain (non-cluster) client: the same ``Job`` objects
    (the queue's default options under each job's) and the same script calls, made by bullmq's
    own ``Scripts.addJob``, in one ``MULTI``/``EXEC`` — sent by :func:`transaction` (one
    write and one read, ``hiredis`` packing) instead of redis-py's pipeline, which also asks
    ``SCRIPT EXISTS`` before every transaction (a round trip of its own).

    Returns the job ids (bullmq's replies). A script Redis does not know (restart, ``SCRIPT
    FLUSH``, a promoted replica) is loaded and the adds it refused are sent again; any other
    error reply is raised, as redis-py's pipeline raises it."""
    scripts = queue.backend.scripts
    defaults = queue.jobsOpts
    recorder = _CallRecorder()
    for entry in jobs:
        opts = {**defaults, **(entry.get("opts") or {})}
        job = bullmq.Job(queue, entry.get("name"), entry.get("data"), opts, opts.get("jobId"))
        await scripts.addJob(job, recorder)
    return await _send_adds(queue, recorder.calls)


async def _send_adds(queue: Any, calls: list[tuple[Any, ...]], *extra: Any) -> list[Any]:
    """``calls`` (``EVALSHA`` of bullmq's add scripts, and of the ``extra`` registered
    scripts) in one ``MULTI``/``EXEC`` by :func:`transaction`; their replies. A script Redis
    does not know is loaded and only the calls Redis refused are sent again (a ``NOSCRIPT``
    inside ``EXEC`` does not stop the others); any other error reply is raised, as redis-py's
    pipeline raises it."""
    conn = queue.backend.connection.conn
    try:
        results = await transaction(conn, calls)
    except ResponseError as exc:  # refused when queued (EXECABORT): nothing ran
        if not is_missing_script(exc):
            raise
        await _load_scripts(queue, calls, extra)
        results = await transaction(conn, calls)
    missing = [i for i, result in enumerate(results) if is_missing_script(result)]
    if missing:
        again = [calls[i] for i in missing]
        await _load_scripts(queue, again, extra)
        for i, result in zip(missing, await transaction(conn, again), strict=True):
            results[i] = result
    for result in results:
        if isinstance(result, Exception):
            raise result
    return results


async def _load_scripts(
    queue: Any, calls: Sequence[tuple[Any, ...]], extra: Sequence[Any] = ()
) -> None:
    """``SCRIPT LOAD`` the scripts ``calls`` use: bullmq's add scripts (``EVALSHA`` calls
    recorded from ``Scripts.addJob``) and those of the ``extra`` registered scripts."""
    commands = queue.backend.connection.commands
    shas = {call[1] for call in calls}
    sources = [commands[name].script for name in ADD_SCRIPTS if commands[name].sha in shas]
    sources += [script.script for script in extra if script.sha in shas]
    for source in sources:
        await queue.backend.connection.conn.script_load(source)


async def load_add_scripts(queue: Any, *extra: str) -> bool:
    """On Redis Cluster, ``SCRIPT LOAD`` bullmq's add scripts (and the ``extra`` sources) on
    every master: redis-py's cluster pipeline sends ``EVALSHA`` without checking, so a
    transaction of adds (``addBulk``, :func:`add_in_transaction`) fails with ``NOSCRIPT`` on a
    master that never ran them. A plain client's pipeline checks by itself: nothing to do
    (``False``)."""
    conn = queue.backend.connection.conn
    if not is_redis_cluster(conn):
        return False
    commands = queue.backend.connection.commands
    for source in (*extra, *(commands[name].script for name in ADD_SCRIPTS)):
        await conn.script_load(source)
    return True


async def set_events_max_len(owner: Any, max_len: int) -> None:
    """Cap the events stream of ``owner``'s queue (a ``bullmq.Queue`` or ``Worker``) at about
    ``max_len`` entries: Node BullMQ's ``streams.events.maxLen`` queue option, which the
    Python package lacks. Every BullMQ script that adds an event reads the meta hash's
    ``opts.maxLenEvents`` (``XADD … MAXLEN ~``; 10,000 when unset)."""
    await owner.client.hset(owner.keys["meta"], "opts.maxLenEvents", int(max_len))


def new_job(queue: Any, name: str, data: Any, opts: dict[str, Any]) -> Any:
    """A ``bullmq.Job`` of ``queue`` with the queue's default options under ``opts``, as
    ``Queue.add`` builds it (for :func:`add_in_transaction`)."""
    return bullmq.Job(queue, name, data, {**queue.jobsOpts, **opts})


async def job_exists(queue: Any, job_id: str) -> bool:
    return bool(await queue.client.exists(queue.toKey(job_id)))


async def change_priority(queue: Any, job_id: str, priority: int) -> None:
    await queue.backend.changePriority(job_id, priority)


async def get_counts(queue: Any, states: Sequence[str]) -> list[Any]:
    """Job counts in bullmq's state names (``wait``, ``active``, ...), in order."""
    return list(await queue.backend.getCounts(list(states)))


async def promote(queue: Any, job_id: str) -> None:
    """Move a delayed job to waiting now; ``TypeError`` when it is not delayed (bullmq's
    returned error code)."""
    await queue.backend.promote(job_id)


# -- the internals relied on ----------------------------------------------------------------------
@dataclass(frozen=True)
class Internal:
    """One bullmq internal Conveyor relies on: ``owner.name``, and for methods the parameter
    names it must still take (in order, after ``self``)."""

    owner: str
    name: str
    params: tuple[str, ...] | None = None
    """``None``: an attribute set by the owner's ``__init__`` (checked on an instance)."""


RELIED_ON: tuple[Internal, ...] = (
    # FetchingWorker: bullmq.Worker's loop state and helpers
    Internal("Worker", "moveToActive", ("token",)),
    Internal("Worker", "waitForJob", ()),
    Internal(
        "Worker",
        "nextJobFromJobData",
        ("job_data", "job_id", "limit_until", "delay_until", "token"),
    ),
    Internal("Worker", "retryIfFailed", ("fn", "opts")),
    Internal("Worker", "runStalledJobsCheck", ()),
    Internal("Worker", "_ensure_client_names", ()),
    Internal("Worker", "_client_name_set"),
    Internal("Worker", "clientName"),
    Internal("Worker", "workerName"),
    Internal("Worker", "name"),
    Internal("Worker", "emit", ("event_name",)),
    Internal("Worker", "lockManager"),
    Internal("Worker", "jobs"),
    Internal("Worker", "waiting"),
    Internal("Worker", "drained"),
    Internal("Worker", "closing"),
    Internal("Worker", "closed"),
    Internal("Worker", "paused"),
    Internal("Worker", "forceClosing"),
    Internal("Worker", "resume_event"),
    Internal("Worker", "blockUntil"),
    Internal("Worker", "opts"),
    Internal("Worker", "processor"),
    Internal("Worker", "_processor_wants_signal"),
    Internal("Worker", "backend"),
    Internal("Worker", "blockingRedisConnection"),
    Internal("Worker", "bclient"),
    Internal("Worker", "id"),
    Internal("Worker", "keys"),
    Internal("Worker", "client"),
    Internal("LockManager", "start", ()),
    Internal("LockManager", "close", ()),
    Internal("LockManager", "track_job", ("job_id", "token", "ts", "should_create_controller")),
    Internal("LockManager", "untrack_job", ("job_id",)),
    Internal(
        "Scripts",
        "moveToCompletedArgs",
        ("job", "return_value", "shouldRemove", "token", "fetchNext"),
    ),
    Internal("Scripts", "finishedErrors", ("opts",)),
    Internal("RedisBackend", "extendLocks", ("job_ids", "tokens", "duration")),
    Internal("RedisBackend", "changePriority", ("job_id", "priority")),
    Internal("RedisBackend", "getCounts", ("types",)),
    Internal("RedisBackend", "promote", ("job_id",)),
    Internal("RedisBackend", "connection"),
    Internal("RedisBackend", "blocking_connection"),
    Internal("RedisBackend", "scripts"),
    Internal("RedisConnection", "conn"),
    Internal("RedisConnection", "capabilities"),
    Internal("RedisConnection", "set_client_name", ("name",)),
    Internal("RedisConnection", "commands"),
    Internal("Scripts", "addJob", ("job", "pipe")),
    Internal("Timer", "stop", ()),
    Internal("Job", "deferredFailure"),
    # BullQueue: the count-and-add transaction and bullmq's own job options
    Internal("Queue", "backend"),
    Internal("Queue", "client"),
    Internal("Queue", "jobsOpts"),
    Internal("Queue", "keys"),
    # StreamConsumer
    Internal("QueueEvents", "_dispatch_entry", ("entry_id", "args")),
)


def missing_internals() -> list[str]:
    """What of :data:`RELIED_ON` the installed bullmq lacks or has reshaped (empty: all there).

    Methods are checked by their parameter names; attributes on a real (unstarted) instance.
    """
    classes = _owners()
    problems: list[str] = []
    instances: dict[str, Any] = {}
    for item in RELIED_ON:
        cls = classes.get(item.owner)
        if cls is None:
            problems.append(f"bullmq.{item.owner} is gone")
            continue
        where = f"bullmq {bullmq_version()}: {item.owner}.{item.name}"
        if item.params is not None:
            problems.extend(_check_method(cls, item, where))
            continue
        if item.owner not in instances:
            instances[item.owner] = _instance(item.owner)
        instance = instances[item.owner]
        if instance is not None and not hasattr(instance, item.name):
            problems.append(f"{where} is no longer set on a new instance")
    return problems


def _check_method(cls: type, item: Internal, where: str) -> list[str]:
    method = getattr(cls, item.name, None)
    if method is None or not callable(method):
        return [f"{where} is gone"]
    names = [n for n in inspect.signature(method).parameters if n != "self"]
    wanted = list(item.params or ())
    if names[: len(wanted)] != wanted:
        return [f"{where} takes ({', '.join(names)}), Conveyor calls it with ({', '.join(wanted)})"]
    return []


def _owners() -> dict[str, type]:
    from bullmq.backends.redis_backend import RedisBackend
    from bullmq.job import Job
    from bullmq.lock_manager import LockManager
    from bullmq.scripts import Scripts

    return {
        "Worker": bullmq.Worker,
        "Queue": bullmq.Queue,
        "RedisBackend": RedisBackend,
        "RedisConnection": RedisConnection,
        "QueueEvents": bullmq.QueueEvents,
        "LockManager": LockManager,
        "Scripts": Scripts,
        "Timer": Timer,
        "Job": Job,
    }


def _instance(owner: str) -> Any:
    """An instance to look for attributes on, built without I/O (a client that never
    connects); ``None`` for owners checked by class only."""
    client = aioredis.Redis(host="127.0.0.1", port=1)  # never used: nothing is sent
    opts = {"connection": client, "autorun": False, "skipVersionCheck": True}
    if owner in ("Worker", "RedisBackend", "RedisConnection"):
        worker = bullmq.Worker("conveyor-compat-check", _noop, opts)
        if owner == "Worker":
            return worker
        return worker.backend if owner == "RedisBackend" else worker.backend.connection
    queue = bullmq.Queue("conveyor-compat-check", opts)
    if owner == "Queue":
        return queue
    if owner == "Job":
        return bullmq.Job(queue, "check", {}, {})
    return None


async def _noop(job: Any, token: str) -> None:
    return None


def bullmq_version() -> str:
    from importlib.metadata import version

    return version("bullmq")
