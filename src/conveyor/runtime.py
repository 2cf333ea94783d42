"""Process runtime shared by every entry point: signals, a stop event, supervised tasks.

* Signals are handled in one place: SIGTERM/SIGINT set the stop event; a second signal
  while draining is logged and ignored (the grace period still bounds the drain).
* Every background loop is started through :meth:`Supervisor.spawn`: it is named and kept;
  if one ends or raises while the process is not stopping, the supervisor records why and
  the process exits non-zero so the orchestrator restarts it (never up-but-idle).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from conveyor.errors import ConfigError
from conveyor.logs import configure_logging
from conveyor.settings import Settings, load_settings

log = logging.getLogger(__name__)


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

    async def cancel_all(self, grace_s: float = 5.0) -> None:
        """Cancel every task still running and wait (bounded) for them to finish."""
        await cancel_tasks(list(self._tasks.values()), grace_s=grace_s)
        self._tasks.clear()


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
