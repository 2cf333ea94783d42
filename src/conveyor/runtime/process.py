"""The process runtime every Conveyor process runs on (API, worker, scheduler, timers).

* :func:`entry` — ``python -m conveyor.<process>``: settings validated (exit 2 and one line
  naming a bad variable), logging configured, then the process's ``run``.
* :func:`run_loop` — the event loop (uvloop).
* Signals are handled in one place (:class:`Supervisor`): SIGTERM/SIGINT set the stop event; a
  second signal while draining is logged and ignored (the grace period still bounds the drain).
* Every background loop is started through :meth:`Supervisor.spawn`: it is named and kept;
  if one ends or raises while the process is not stopping, the supervisor records why and
  the process exits non-zero so the orchestrator restarts it (never up-but-idle).
* :func:`serve_checked` — a worker process's life: signal handlers, the start-up checks
  (:func:`open_checked`: schema current, Redis usable by BullMQ; exit 1 with one line
  otherwise), then its ``start``; tracing (:mod:`conveyor.tracing`) is configured first and
  flushed on the way out.
* :func:`heartbeat_loop` — the process's status published every interval.
* :func:`freeze_startup_heap` — what start-up allocated moved out of the collector's reach.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, TypeVar

from redis.exceptions import RedisClusterException, RedisError

from conveyor import tracing
from conveyor.errors import ConfigError, QueueError, StoreError
from conveyor.logs import configure_logging
from conveyor.queue import QueueFactory
from conveyor.settings import Settings, load_settings

if TYPE_CHECKING:
    from conveyor.runtime.heartbeat import Heartbeat
    from conveyor.store import Store

log = logging.getLogger(__name__)

T = TypeVar("T")


class LoopDied(Exception):
    """A supervised background loop ended while the process was not stopping."""


class Supervisor:
    """Owns a process's stop event and its named background tasks."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stop_event = asyncio.Event()
        self.failure: BaseException | None = None
        self._tasks: dict[str, asyncio.Task[Any]] = {}

    @property
    def stopping(self) -> bool:
        return self.stop_event.is_set()

    def stop(self, reason: str = "requested") -> None:
        """Ask the process to stop; idempotent."""
        if not self.stop_event.is_set():
            log.info("process.stopping", extra={"proc": self.name, "reason": reason})
            self.stop_event.set()

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def remove_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.stopping:
            log.warning(
                "process.signal_ignored", extra={"signal": sig.name, "why": "already draining"}
            )
        self.stop(reason=sig.name)

    def spawn(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` as a named, watched task."""
        task = asyncio.create_task(coro, name=f"{self.name}.{name}")
        self._tasks[name] = task
        task.add_done_callback(self._watch)
        return task

    def _watch(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or self.stopping:
            return
        exc = task.exception()
        why: BaseException = exc if exc is not None else LoopDied(f"{task.get_name()} returned")
        log.error(
            "process.loop_died",
            extra={"task": task.get_name(), "error": repr(why)},
            exc_info=(type(why), why, why.__traceback__) if exc is not None else None,
        )
        if self.failure is None:
            self.failure = why
        self.stop(reason=f"{task.get_name()} died")

    async def wait(self) -> None:
        """Block until the stop event is set."""
        await self.stop_event.wait()

    async def pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if the process is asked to stop meanwhile."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.stop_event.wait(), seconds)

    async def finish(self, names: list[str], grace_s: float) -> None:
        """Let the named loops end on their own (they watch :attr:`stopping`), for at most
        ``grace_s``: a loop interrupted inside a database transaction may leave the
        connection (on SQLite: the write lock) busy until its clean-up runs."""
        pending = [t for n, t in self._tasks.items() if n in names and not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=grace_s)

    async def cancel_all(self, grace_s: float = 5.0) -> None:
        """Cancel every task still running and wait (bounded) for them to finish."""
        await cancel_tasks(list(self._tasks.values()), grace_s=grace_s)
        self._tasks.clear()


async def bounded(what: str, aw: Awaitable[T], timeout_s: float) -> T | None:
    """``aw``'s result, or None once ``timeout_s`` passed or it failed (logged).

    Unlike :func:`asyncio.wait_for`, a timeout never waits for the cancelled operation to
    unwind: a shutdown step stuck in a driver's clean-up cannot hold the process past its grace.
    """
    task = asyncio.ensure_future(aw)
    done, _pending = await asyncio.wait([task], timeout=timeout_s)
    if not done:
        task.cancel()
        task.add_done_callback(_consume)
        log.warning("process.step_timed_out", extra={"step": what, "timeoutS": timeout_s})
        return None
    exc = task.exception()
    if exc is not None:
        log.warning("process.step_failed", extra={"step": what, "error": repr(exc)})
        return None
    return task.result()


def _consume(task: asyncio.Future[Any]) -> None:
    if not task.cancelled():
        task.exception()  # retrieved: no "exception was never retrieved" at exit


async def cancel_tasks(tasks: list[asyncio.Task[Any]], grace_s: float = 5.0) -> None:
    """Cancel ``tasks`` and wait at most ``grace_s`` seconds for them to end."""
    pending = [t for t in tasks if not t.done()]
    for task in pending:
        task.cancel()
    if pending:
        _done, still = await asyncio.wait(pending, timeout=grace_s)
        for task in still:
            log.warning("process.task_stuck", extra={"task": task.get_name()})


def entry(module_main: Callable[[argparse.Namespace, Settings], int], name: str) -> None:
    """``python -m conveyor.<process>``: the settings handling of the ``conveyor`` command
    (a malformed setting exits 2 with one line naming it), then ``module_main``."""
    try:
        settings = load_settings()
    except ConfigError as exc:
        print(f"conveyor {name}: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    configure_logging(settings)
    raise SystemExit(module_main(argparse.Namespace(command=name), settings))


GC_YOUNG_THRESHOLD = 20_000
"""Allocations of container objects between two collections of the youngest generation
(CPython's default: 700). A job or a request allocates a few hundred; nearly all are freed by
reference counting, and at 700 the collector ran every few executions to find almost nothing —
~6 µs of a noop execution's ~57 µs of engine CPU in process, 8 to 18 µs of the worker's per
execution (docs/benchmarks.md). The young generation then holds at most this many objects
(a few MB); the older generations keep their default ratios."""


def freeze_startup_heap() -> None:
    """Move everything allocated at start-up (modules, the app, pydantic and SQLAlchemy
    structures: ~150k objects) out of the collector's reach. A full collection otherwise
    walks them all — tens of milliseconds, paid by whichever job or request triggers it.
    Then collect the young generation every :data:`GC_YOUNG_THRESHOLD` allocations."""
    gc.collect()
    gc.freeze()
    _young, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` on uvloop when available (as every Conveyor process does)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


async def heartbeat_loop(heartbeat: Heartbeat, stop: asyncio.Event | None = None) -> None:
    """Beat every interval until ``stop`` is set (or cancelled); a failed beat is logged and
    retried at the next interval (a Redis outage never ends the loop)."""
    stop = stop or asyncio.Event()
    while not stop.is_set():
        try:
            await heartbeat.beat()
        except (RedisError, RedisClusterException, OSError) as exc:
            log.warning("heartbeat.failed", extra={"role": heartbeat.role, "error": repr(exc)})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=heartbeat.interval_s)


async def open_checked(
    stack: AsyncExitStack,
    settings: Settings,
    role: str,
    *,
    pool_size: int | None = None,
    secrets: bool = False,
) -> tuple[Store, QueueFactory] | None:
    """Open the store and the queue factory on ``stack`` and run the start-up checks.

    Returns ``None`` after ONE error line (``<role>.database_not_ready`` — schema out of date,
    database unreachable, missing or refusing the credentials — or ``<role>.queue_not_ready``);
    the caller then exits 1. ``secrets``: the process decrypts tenants' secrets — raises
    :class:`ConfigError` naming ``SECRETS_KEY`` if it cannot decrypt those stored.
    """
    from conveyor.store import Store

    try:
        store = await stack.enter_async_context(Store(settings, pool_size=pool_size))
        await store.check_schema()
        if secrets:
            await store.secrets.check_keys()
    except StoreError as exc:  # SchemaOutOfDate, DatabaseUnavailable, anything the store says
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
    secrets: bool = False,
) -> int:
    """A process's life: signal handlers, :func:`open_checked` (exit 1 on failure; exit 2 and
    one line naming ``SECRETS_KEY`` when ``secrets`` and it cannot decrypt the stored ones),
    then ``start(stack, store, queues)`` unless a signal came first (exit 0). Returns the exit
    code; everything opened on the stack is closed on the way out."""
    supervisor.install_signal_handlers()
    tracing.configure(role)
    try:
        async with AsyncExitStack() as stack:
            try:
                opened = await open_checked(
                    stack, settings, role, pool_size=pool_size, secrets=secrets
                )
            except ConfigError as exc:
                print(f"conveyor {role}: {exc.message}", file=sys.stderr, flush=True)
                return 2
            if opened is None:
                return 1
            if supervisor.stopping:
                return 0
            return await start(stack, *opened)
    finally:
        supervisor.remove_signal_handlers()
        tracing.shutdown()  # bounded: the spans still buffered, then the exporter
