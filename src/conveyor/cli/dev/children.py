"""Child processes of ``conveyor dev``: started, watched, their output forwarded, always stopped.

* Each child runs in its own session (process group), so a terminal Ctrl-C reaches only
  ``conveyor dev``, which then stops the children in order; signals go to the whole group.
* On Linux each child also gets ``PR_SET_PDEATHSIG=SIGTERM`` (set by a tiny launcher that then
  ``exec``s the real command), so even a ``kill -9`` of ``conveyor dev`` leaves no orphan.
* Output (stdout and stderr merged) is forwarded line by line with the child's name in front.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TextIO

log = logging.getLogger(__name__)

# Runs with ``python -I -S -c``: asks the kernel to SIGTERM us when our parent dies (Linux;
# survives execve), refuses to start if the parent is already gone, then becomes the command.
_LAUNCHER = """\
import os, sys
try:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, 15)
except Exception:
    pass
if os.getppid() != int(sys.argv[1]):
    sys.exit(70)
os.execv(sys.argv[2], sys.argv[2:])
"""

_LINE_LIMIT = 1 << 20
_COLOURS = ("36", "32", "35", "33", "34", "31")


class Console:
    """Where ``conveyor dev`` writes: its own lines and the children's prefixed output."""

    def __init__(self, stream: TextIO | None = None, *, width: int = 9) -> None:
        self.stream = stream or sys.stdout
        self.colour = bool(getattr(self.stream, "isatty", lambda: False)())
        self.width = width
        self._colours: dict[str, str] = {}

    def say(self, text: str = "") -> None:
        # A closed terminal or pipe must not stop the forwarding: children would block on
        # a full pipe. Their output is dropped instead.
        with contextlib.suppress(OSError, ValueError):
            self.stream.write(text + "\n")
            self.stream.flush()

    def child_line(self, name: str, line: str) -> None:
        prefix = f"{name:<{self.width}}|"
        if self.colour:
            code = self._colours.setdefault(name, _COLOURS[len(self._colours) % len(_COLOURS)])
            prefix = f"\x1b[{code}m{prefix}\x1b[0m"
        self.say(f"{prefix} {line}")


@dataclass
class Child:
    """One child process: ``argv[0]`` must be an absolute path."""

    name: str
    argv: Sequence[str]
    env: Mapping[str, str]
    cwd: str | None = None
    proc: asyncio.subprocess.Process | None = None
    _pump: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self, console: Console) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-I", "-S", "-c", _LAUNCHER, str(os.getpid()), *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=dict(self.env),
            cwd=self.cwd,
            start_new_session=True,
            limit=_LINE_LIMIT,
        )  # fmt: skip
        self._pump = asyncio.create_task(self._forward(console), name=f"dev.output.{self.name}")
        log.debug("dev.child_started", extra={"child": self.name, "pid": self.proc.pid})

    async def _forward(self, console: Console) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        reader = self.proc.stdout
        while True:
            try:
                raw = await reader.readline()
            except ValueError:  # a line longer than the limit: forward what is buffered
                raw = await reader.read(_LINE_LIMIT)
            if not raw:
                return
            console.child_line(self.name, raw.decode("utf-8", "replace").rstrip("\r\n"))

    async def wait(self) -> int:
        """Wait for the child to exit and its output to drain; its return code."""
        assert self.proc is not None
        code = await self.proc.wait()
        if self._pump is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._pump), timeout=2.0)
        return code

    def signal_group(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the child's process group while the child has not been reaped.

        (Once reaped, its pid, which is also the group id, may belong to someone else.)
        """
        if self.proc is None or self.proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, sig)

    async def stop(self, timeout_s: float) -> int | None:
        """SIGTERM the group, wait at most ``timeout_s``, then SIGKILL. The return code."""
        if self.proc is None:
            return None
        if self.running:
            self.signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout=timeout_s)
            except TimeoutError:
                log.warning("dev.child_killed", extra={"child": self.name, "after_s": timeout_s})
                self.signal_group(signal.SIGKILL)
        code = await self.wait()
        if self._pump is not None and not self._pump.done():
            self._pump.cancel()
        return code


def describe_exit(code: int) -> str:
    """``exit code 3`` or ``killed by SIGKILL`` for a return code."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"
