"""``conveyor worker [--processes N]``: one execution worker, or N of them under a supervisor.

With one process (the default, ``EXECUTION_WORKER_PROCESSES=1``) the command *is* the worker
(:mod:`conveyor.workers.execution`), as it always was; that is what a Kubernetes pod runs (scale
with replicas). With N > 1 this process becomes a small supervisor, the :class:`Fleet`:

* it starts N children, each ``python -m conveyor.workers.execution`` with the same environment
  (one event loop per core: a worker process is single-threaded);
* a child that exits while the fleet is not stopping is started again, after a delay that doubles
  for each quick failure (:class:`Backoff`: 0.5 s, 1 s, 2 s … 30 s; a child that lived
  ``STABLE_S`` is restarted after 0.5 s again), so a child failing at start-up (database not
  migrated, Redis unreachable: exit 1) does not spin;
* a child exiting 2 (a configuration error: it will not go away by itself) stops the fleet,
  which exits 2 too;
* SIGTERM/SIGINT: SIGTERM to every child, which drains (stops fetching, lets active executions
  finish within ``SHUTDOWN_GRACE_MS``, hands the rest back); children still running
  ``SHUTDOWN_GRACE_MS`` + ``KILL_MARGIN_S`` later are killed. Exit 0 when every child stopped
  cleanly, 1 otherwise;
* children die with the supervisor: on Linux each child asks the kernel (``prctl
  PR_SET_PDEATHSIG``) for a SIGTERM when its parent dies, so a ``kill -9`` of the supervisor
  leaves no orphan worker (each drains as on a normal SIGTERM).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import FrameType

from conveyor.settings import Settings
from conveyor.workers import execution

log = logging.getLogger("conveyor.workers.fleet")

CHILD_ARGV: tuple[str, ...] = (sys.executable, "-m", "conveyor.workers.execution")
CONFIG_ERROR = 2
"""A child's exit code for bad configuration (as every Conveyor command's)."""
KILL_MARGIN_S = 10.0
"""Children still running this long after the shutdown grace period are killed."""
POLL_S = 0.1
"""How often the supervisor looks at its children."""
_PR_SET_PDEATHSIG = 1


@dataclass
class Backoff:
    """The delay before a child is started again: ``initial_s`` doubled for each failure in a
    row, at most ``max_s``; a child that lived ``stable_s`` or more resets the count."""

    initial_s: float = 0.5
    max_s: float = 30.0
    stable_s: float = 10.0
    failures: int = 0

    def next_delay(self, lived_s: float) -> float:
        if lived_s >= self.stable_s:
            self.failures = 0
        delay = min(self.max_s, self.initial_s * 2.0**self.failures)
        self.failures += 1
        return delay


@dataclass
class Slot:
    """One of the N places a child runs in."""

    index: int
    backoff: Backoff
    proc: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    restart_at: float | None = None
    starts: int = 0


def parse_processes(value: str | None, settings: Settings) -> int | str:
    """The number of processes (``--processes`` wins over ``EXECUTION_WORKER_PROCESSES``), or
    the one-line error about a bad ``--processes``."""
    if value is None:
        return settings.execution_worker_processes
    try:
        n = int(value.strip())
    except ValueError:
        n = 0
    if n < 1:
        return f"invalid --processes={value}: give a whole number of worker processes, at least 1"
    return n


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` asking Linux to SIGTERM the child when this process dies (None
    elsewhere). Runs in the child between fork and exec: no imports, no allocation to speak of."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - every Linux libc has prctl
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:  # the supervisor died before the request took effect
            os._exit(1)

    return preexec


@dataclass
class Fleet:
    """N execution worker processes, kept running until a signal; see the module docstring."""

    settings: Settings
    processes: int
    argv: Sequence[str] = CHILD_ARGV
    backoff: Callable[[], Backoff] = Backoff
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    slots: list[Slot] = field(init=False)
    stop_reason: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.slots = [Slot(i, self.backoff()) for i in range(self.processes)]
        self._preexec = _die_with_parent()

    @property
    def starts(self) -> int:
        return sum(s.starts for s in self.slots)

    def stop(self, reason: str = "requested") -> None:
        if self.stop_reason is None:
            self.stop_reason = reason

    # --- life -------------------------------------------------------------------------------
    def run(self) -> int:
        """Start the children, keep them running, drain them; the exit code."""
        previous = self._install_signal_handlers()
        try:
            log.info(
                "fleet.started",
                extra={"processes": self.processes, "graceS": self.settings.shutdown_grace_s},
            )
            for slot in self.slots:
                self._start(slot)
            config_error = self._supervise()
            code = self._drain()
            return CONFIG_ERROR if config_error else code
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _supervise(self) -> bool:
        """Until asked to stop; True if a child reported a configuration error."""
        while self.stop_reason is None:
            now = self.clock()
            for slot in self.slots:
                if slot.proc is not None:
                    code = slot.proc.poll()
                    if code is not None and self._exited(slot, code, now):
                        return True
                elif slot.restart_at is not None and now >= slot.restart_at:
                    self._start(slot)
            self.sleep(POLL_S)
        return False

    def _start(self, slot: Slot) -> None:
        # Its own process group: a Ctrl-C in the terminal reaches the supervisor only, which
        # forwards one SIGTERM (a child would otherwise get both and log the second).
        try:
            slot.proc = subprocess.Popen(list(self.argv), preexec_fn=self._preexec, process_group=0)
        except OSError as exc:  # out of processes, memory, descriptors: try again later
            delay = slot.backoff.next_delay(0.0)
            slot.restart_at = self.clock() + delay
            log.error(
                "fleet.child_start_failed",
                extra={"slot": slot.index, "error": repr(exc), "restartInS": delay},
            )
            return
        slot.started_at = self.clock()
        slot.restart_at = None
        slot.starts += 1
        log.info(
            "fleet.child_started",
            extra={"slot": slot.index, "pid": slot.proc.pid, "start": slot.starts},
        )

    def _exited(self, slot: Slot, code: int, now: float) -> bool:
        """A child ended on its own: schedule its restart; True on a configuration error."""
        assert slot.proc is not None
        pid, lived = slot.proc.pid, round(now - slot.started_at, 3)
        slot.proc = None
        how = _describe_exit(code)
        if code == CONFIG_ERROR:
            log.error(
                "fleet.child_config_error: a worker process exited 2 (bad configuration); "
                "stopping the fleet",
                extra={"slot": slot.index, "pid": pid},
            )
            self.stop("a worker process reported a configuration error")
            return True
        delay = slot.backoff.next_delay(lived)
        slot.restart_at = now + delay
        log.warning(
            "fleet.child_exited",
            extra={
                "slot": slot.index,
                "pid": pid,
                "exit": how,
                "livedS": lived,
                "restartInS": delay,
            },
        )
        return False

    def _drain(self) -> int:
        """SIGTERM every child, wait for them (grace + margin), kill the rest."""
        live = [s.proc for s in self.slots if s.proc is not None and s.proc.poll() is None]
        log.info("fleet.draining", extra={"reason": self.stop_reason, "children": len(live)})
        for proc in live:
            _signal(proc, signal.SIGTERM)
        deadline = self.clock() + self.settings.shutdown_grace_s + KILL_MARGIN_S
        while any(p.poll() is None for p in live) and self.clock() < deadline:
            self.sleep(POLL_S)
        clean = True
        for proc in live:
            if proc.poll() is None:
                log.error("fleet.child_killed", extra={"pid": proc.pid, "why": "drain too long"})
                _signal(proc, signal.SIGKILL)
                proc.wait()
                clean = False
            elif proc.returncode not in (0, -signal.SIGTERM):
                clean = False
        log.info("fleet.stopped", extra={"clean": clean, "starts": self.starts})
        return 0 if clean else 1

    # --- signals ----------------------------------------------------------------------------
    def _install_signal_handlers(
        self,
    ) -> dict[int, Callable[[int, FrameType | None], object] | int]:
        previous: dict[int, Callable[[int, FrameType | None], object] | int] = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            old = signal.signal(sig, self._on_signal)
            if old is not None:
                previous[sig] = old
        return previous

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # Only a flag here: the supervising loop logs, so a signal never re-enters logging.
        self.stop(signal.Signals(signum).name)


def _signal(proc: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):  # exited between poll and signal
            proc.send_signal(sig)


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:  # pragma: no cover
            return f"signal {-code}"
    return f"code {code}"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--processes",
        metavar="N",
        help="worker processes to run under one supervisor (default: "
        "EXECUTION_WORKER_PROCESSES, 1); one per core is the usual choice",
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    """``conveyor worker``: the worker itself, or a fleet of them."""
    n = parse_processes(getattr(args, "processes", None), settings)
    if isinstance(n, str):
        print(f"conveyor worker: {n}", file=sys.stderr)
        return CONFIG_ERROR
    if n == 1:
        return execution.run(args, settings)
    return Fleet(settings, n).run()
