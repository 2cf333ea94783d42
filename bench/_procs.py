"""Conveyor processes started by a benchmark (``python -m <module>``), and who leads.

Every process is started with the run's environment, its output in ``<logdir>/<name>-<n>.log``;
:meth:`Procs.stop_all` stops them (SIGTERM, then SIGKILL after a grace).
"""

from __future__ import annotations

import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg


@dataclass
class Procs:
    """The processes of one run; every one is stopped (then killed) at the end."""

    env: dict[str, str]
    logdir: Path
    procs: dict[int, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, module: str, **extra: str) -> int:
        name = module.rsplit(".", 1)[-1]
        log = open(self.logdir / f"{name}-{len(self.procs)}.log", "wb")  # noqa: SIM115
        proc = subprocess.Popen(
            [sys.executable, "-m", module], env={**self.env, **extra}, stdout=log,
            stderr=subprocess.STDOUT,
        )  # fmt: skip
        self.procs[proc.pid] = proc
        return proc.pid

    def alive(self, pid: int) -> bool:
        return self.procs[pid].poll() is None

    def any_exited(self) -> bool:
        return any(p.poll() is not None for p in self.procs.values())

    def kill(self, pid: int) -> None:
        self.procs[pid].send_signal(signal.SIGKILL)
        self.procs[pid].wait(timeout=10)

    def stop_all(self, grace_s: float = 15.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


async def pg_leader_pid(admin: asyncpg.Connection, db: str) -> int | None:
    """The pid of the scheduler holding the Postgres advisory lock in ``db`` (its holder id,
    ``scheduler-<host>-<pid>-<rand>``, is in the session's ``application_name``)."""
    holder = await admin.fetchval(
        "SELECT a.application_name FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid"
        " WHERE l.locktype = 'advisory' AND l.granted AND a.datname = $1"
        " AND a.application_name LIKE 'conveyor:scheduler:%' LIMIT 1",
        db,
    )
    return holder_pid(holder)


def holder_pid(holder: str | None) -> int | None:
    return int(holder.rsplit("-", 2)[-2]) if holder else None
