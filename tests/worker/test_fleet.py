"""``conveyor worker --processes N``: the supervisor and its worker processes, all real.

The fleet runs as ``python -m conveyor.cli worker --processes N`` against the real Redis and
Postgres; steps call a local HTTP server run by the test. The supervisor's children are found
through ``/proc`` (their parent pid) and through their heartbeats.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from conveyor.runtime import list_processes
from conveyor.settings import Settings
from conveyor.workers.fleet import Backoff, Fleet, parse_processes
from tests.helpers import env_for
from tests.worker._support import WorkerProc, eventually, http_recorder, worker_env
from tests.worker.conftest import Seeder, seeder

pytestmark = pytest.mark.slow

FAST_RECOVERY = {"EXECUTION_LOCK_DURATION_MS": "2000", "EXECUTION_STALLED_INTERVAL_MS": "1000"}


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    return worker_env(
        settings.queue_prefix,
        settings.database_url,
        HTTP_ALLOWLIST="127.0.0.1",
        HEARTBEAT_INTERVAL_MS="300",
        **extra,
    )


@contextmanager
def fleet_process(env: dict[str, str], tmp_path: Path, *args: str) -> Iterator[WorkerProc]:
    """``python -m conveyor.cli worker *args``; the supervisor and any child left are killed
    at the end."""
    log_path = tmp_path / f"fleet-{uuid.uuid4().hex[:6]}.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "conveyor.cli", "worker", *args],
            env=env_for(**env),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    wp = WorkerProc(proc, log_path)
    seen: set[int] = set()
    try:
        yield wp
    finally:
        seen.update(children_of(proc.pid))
        wp.kill()
        for pid in seen | set(_started_pids(wp)):
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def _records(wp: WorkerProc, msg: str) -> list[dict[str, Any]]:
    out = []
    for line in wp.output().splitlines():
        if line.startswith("{") and f'"{msg}' in line:
            doc = json.loads(line)
            if str(doc.get("msg", "")).startswith(msg):
                out.append(doc)
    return out


def _started_pids(wp: WorkerProc) -> list[int]:
    return [int(d["pid"]) for d in _records(wp, "fleet.child_started")]


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of ``pid`` from ``/proc``; None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def children_of(parent: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and stat[1] == parent and stat[0] != "Z":
                found.add(int(entry))
    return found


async def _workers(s: Seeder) -> list[dict[str, Any]]:
    return await list_processes(s.queues, role="worker")


async def _wait_workers(s: Seeder, supervisor: int, n: int, within: float = 40.0) -> set[int]:
    """Until ``n`` live worker heartbeats come from children of ``supervisor``; their pids."""

    async def ready() -> bool:
        kids = children_of(supervisor)
        return sum(1 for w in await _workers(s) if w["pid"] in kids and w["started"]) == n

    await eventually(ready, within, f"{n} worker processes")
    return {int(w["pid"]) for w in await _workers(s)} & children_of(supervisor)


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (["--processes", "0"], {}, "--processes=0"),
        (["--processes", "-3"], {}, "--processes=-3"),
        (["--processes", "many"], {}, "--processes=many"),
        ([], {"EXECUTION_WORKER_PROCESSES": "0"}, "EXECUTION_WORKER_PROCESSES=0"),
    ],
)
def test_bad_process_count_exits_2_with_one_line(
    args: list[str], env: dict[str, str], named: str
) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "conveyor.cli", "worker", *args],
        env=env_for(DATABASE_URL="sqlite:///:memory:", **env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], proc.stderr


async def test_children_start_and_share_the_work(wsettings: Settings, tmp_path: Path) -> None:
    with http_recorder() as rec:
        async with seeder(wsettings) as s:
            t = await s.tenant()
            wf = await s.workflow(t, [{"id": "c", "type": "http", "url": rec.url("/slow", ms=50)}])
            with fleet_process(_env(wsettings), tmp_path, "--processes", "2") as fleet:
                pids = await _wait_workers(s, fleet.proc.pid, 2)
                ids = await s.executions(t, wf, [None] * 60)
                await s.wait_status(ids, within=40)

                async def both_worked() -> bool:
                    done = {w["pid"]: w["jobsDone"] for w in await _workers(s)}
                    return all(done.get(p, 0) > 0 for p in pids)

                await eventually(both_worked, 10, "both children ran executions")
                fleet.signal(signal.SIGTERM)
                assert fleet.wait(timeout=30) == 0, fleet.output()[-3000:]
            assert not any(alive(p) for p in pids)
            assert len(_started_pids(fleet)) == 2  # nobody was restarted
    assert rec.count("/slow") == 60


async def test_killed_child_is_restarted_and_nothing_is_lost(
    wsettings: Settings, tmp_path: Path
) -> None:
    with http_recorder() as rec:
        async with seeder(wsettings) as s:
            t = await s.tenant()
            wf = await s.workflow(t, [{"id": "c", "type": "http", "url": rec.url("/slow", ms=150)}])
            env = _env(wsettings, **FAST_RECOVERY)
            with fleet_process(env, tmp_path, "--processes", "2") as fleet:
                first = await _wait_workers(s, fleet.proc.pid, 2)
                ids = await s.executions(t, wf, [None] * 40)
                await eventually(lambda: _async(rec.count("/slow") >= 6), 30, "work under way")
                victim = min(first)
                os.kill(victim, signal.SIGKILL)  # mid-execution: it holds two jobs
                await s.wait_status(ids, within=60)
                after = await _wait_workers(s, fleet.proc.pid, 2)
                fleet.signal(signal.SIGTERM)
                assert fleet.wait(timeout=30) == 0, fleet.output()[-3000:]
            exited = _records(fleet, "fleet.child_exited")
    assert victim not in after and len(after - first) == 1  # a new child took its place
    assert [(d["pid"], d["exit"]) for d in exited] == [(victim, "signal SIGKILL")]
    assert exited[0]["restartInS"] == 0.5
    assert len(_started_pids(fleet)) == 3
    assert rec.count("/slow") >= 40  # every execution called it (the killed ones twice)


async def _async(value: bool) -> bool:
    return value


async def test_sigterm_drains_in_flight_executions(wsettings: Settings, tmp_path: Path) -> None:
    with http_recorder() as rec:
        async with seeder(wsettings) as s:
            t = await s.tenant()
            slow = [{"id": "s", "type": "http", "url": rec.url("/slow", ms=1500)}]
            wf = await s.workflow(t, slow)
            # the tenant cap holds across the fleet: let one tenant fill both processes
            env = _env(wsettings, SHUTDOWN_GRACE_MS="10000", EXECUTION_TENANT_CONCURRENCY="4")
            with fleet_process(env, tmp_path, "--processes", "2") as fleet:
                pids = await _wait_workers(s, fleet.proc.pid, 2)
                ids = await s.executions(t, wf, [None] * 4)  # 2 processes x concurrency 2
                await eventually(lambda: _async(rec.count("/slow") == 4), 30, "4 in flight")
                assert not rec.finished()
                fleet.signal(signal.SIGTERM)
                assert fleet.wait(timeout=30) == 0, fleet.output()[-3000:]
            assert set((await s.statuses(ids)).values()) == {"succeeded"}
            assert not any(alive(p) for p in pids)
    assert rec.count("/slow") == 4 and len(rec.finished()) == 4  # finished, none ran twice


async def test_children_exit_when_the_supervisor_is_killed(
    wsettings: Settings, tmp_path: Path
) -> None:
    async with seeder(wsettings) as s:
        with fleet_process(_env(wsettings), tmp_path, "--processes", "2") as fleet:
            pids = await _wait_workers(s, fleet.proc.pid, 2)
            fleet.proc.kill()  # SIGKILL: no chance to stop its children
            fleet.proc.wait(timeout=10)
            await eventually(lambda: _async(not any(alive(p) for p in pids)), 20, "children gone")
            out = fleet.output()
    assert out.count("worker.stopped") == 2  # each drained as on SIGTERM


def test_child_configuration_error_stops_the_fleet_with_2(wsettings: Settings) -> None:
    started = time.monotonic()
    fleet = Fleet(wsettings, 3, argv=[sys.executable, "-c", "raise SystemExit(2)"])
    assert fleet.run() == 2
    assert time.monotonic() - started < 15
    assert fleet.starts == 3  # no restart after a configuration error


def test_a_child_failing_at_start_up_is_restarted_with_backoff(
    wsettings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    now = [0.0]
    fleet: Fleet

    def sleep(seconds: float) -> None:  # the fleet's clock runs 20x faster than the wall's
        time.sleep(seconds / 20)
        now[0] += seconds
        if now[0] > 60:
            fleet.stop("test over")

    fleet = Fleet(
        wsettings, 1, argv=[sys.executable, "-S", "-c", "raise SystemExit(1)"],
        clock=lambda: now[0], sleep=sleep,
    )  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="conveyor.workers.fleet"):
        assert fleet.run() == 0
    delays = [r.__dict__["restartInS"] for r in caplog.records if r.msg == "fleet.child_exited"]
    assert delays[:6] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0], delays
    assert fleet.starts <= 8  # spinning would have started it hundreds of times


def test_a_child_that_cannot_be_started_is_retried_later(wsettings: Settings) -> None:
    now = [0.0]
    fleet: Fleet

    def sleep(seconds: float) -> None:
        now[0] += seconds
        if now[0] > 5:
            fleet.stop("test over")

    fleet = Fleet(wsettings, 1, argv=["/nonexistent/conveyor-python"], clock=lambda: now[0],
                  sleep=sleep)  # fmt: skip
    assert fleet.run() == 0  # it does not crash the supervisor
    assert fleet.slots[0].backoff.failures == 4  # tried at 0, 0.5, 1.5 and 3.5 s


def test_the_flag_wins_over_the_setting(wsettings: Settings) -> None:
    two = wsettings.model_copy(update={"execution_worker_processes": 2})
    assert parse_processes(None, two) == 2
    assert parse_processes(" 3 ", two) == 3
    assert parse_processes("1.5", two) == (
        "invalid --processes=1.5: give a whole number of worker processes, at least 1"
    )


def test_backoff_resets_after_a_stable_run() -> None:
    b = Backoff(initial_s=0.5, max_s=4.0, stable_s=10.0)
    assert [b.next_delay(1.0) for _ in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert b.next_delay(60.0) == 0.5  # lived long enough: a fresh crash, not a crash loop
    assert b.next_delay(0.2) == 1.0
