"""A Redis master lost under load, with real processes: the scenario behind
``tests/redis_ha/test_failover.py`` and ``bench/failover_redis.py``.

A Sentinel group (master, replica, three sentinels, ``down-after-milliseconds`` 1000), then
Conveyor as in production, each process a subprocess configured only by environment
variables that name the sentinels: ``conveyor api``, two ``conveyor worker``, ``conveyor
scheduler`` and ``conveyor timers``. A workflow ``http`` (to a local counting server, allowed by
``HTTP_ALLOWLIST`` on its port) → ``delay`` (a durable timer) → ``transform`` is triggered over
HTTP at a steady rate, and a per-second cron schedule runs a ``noop`` workflow. Mid-load the
master is SIGKILLed; the load goes on through the failover, then stops, and the run waits for
every accepted execution to end.

Figures (:class:`Figures`):

* ``resume_s``: from the kill to the first ``http`` step (a hit on the counting server) of an
  execution accepted after the kill: triggers are consumed again.
* ``failover_s``: from the kill until a majority of sentinels names the new master.
* ``lost``: accepted executions (202 answers, and cron ticks due before the load stopped) that
  did not end ``succeeded``.
* ``duplicated_steps``: ``http`` steps that hit the server more than once for one execution,
  plus step records run more than once (``attempts`` > 1): a completed step never re-runs.
* ``reconciled``: executions the reconciler enqueued again (what the replica had not received).

Before the kill the replica is frozen (SIGSTOP) for half a second: the master's last writes
never reach it, so the failover really loses jobs (added, completed, moved) from Redis.

Every process is stopped by PID at the end, also when the run fails.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import httpx

from tests.helpers import free_port, wait_for
from tests.redis_ha._sentinels import sentinel_group

ROOT = Path(__file__).resolve().parents[2]
ADMIN_TOKEN = "failover-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@dataclass
class Figures:
    resume_s: float | None
    failover_s: float | None
    lost: int
    duplicated_steps: int
    accepted: int
    accepted_after_kill: int
    accepted_unreplicated: int
    """Accepted (and enqueued on the master) while the replica was frozen: lost from Redis."""
    refused: int
    """Trigger requests not answered 202 (the API only refuses when the database fails)."""
    cron_ticks: int
    reconciled: int
    drained_s: float | None
    """From the kill until every accepted execution had ended."""
    rate_per_s: float
    not_succeeded: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Counter(BaseHTTPRequestHandler):
    hits: dict[str, list[float]] = {}
    lock = threading.Lock()

    def do_GET(self) -> None:
        with _Counter.lock:
            _Counter.hits.setdefault(self.path, []).append(time.monotonic())
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


@contextmanager
def counting_server() -> Iterator[int]:
    _Counter.hits = {}
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Counter)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


class Proc:
    """A Conveyor subprocess; its output in a log file; stopped by PID."""

    def __init__(self, argv: list[str], env: Mapping[str, str], name: str, logdir: Path) -> None:
        self.name = name
        self.log_path = logdir / f"{name}.log"
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "conveyor.cli", *argv], env=dict(env), stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, n: int = 3000) -> str:
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@contextmanager
def conveyor_processes(env: Mapping[str, str], logdir: Path) -> Iterator[list[Proc]]:
    """API, two workers, scheduler, timers; all stopped (by PID) at the end."""
    procs: list[Proc] = []
    try:
        for argv, name in (
            (["api"], "api"),
            (["worker"], "worker-1"),
            (["worker"], "worker-2"),
            (["scheduler"], "scheduler"),
            (["timers"], "timers"),
        ):
            procs.append(Proc(argv, env, name, logdir))
        yield procs
    except BaseException:
        for p in procs:
            sys.stderr.write(f"--- {p.name} ---\n{p.tail()}\n")
        raise
    finally:
        for p in procs:
            p.stop()


def _workflow(port: int) -> dict[str, Any]:
    return {
        "name": "failover-load",
        "steps": [
            {"id": "call", "type": "http", "url": f"http://127.0.0.1:{port}/hit/{{{{ input.n }}}}"},
            {"id": "pause", "type": "delay", "seconds": 0.5},
            {"id": "shape", "type": "transform", "expression": "{n: input.n}"},
        ],
    }


class Load:
    """Triggers at ``rate`` per second from a thread; remembers what was accepted, and when."""

    def __init__(self, client: httpx.Client, workflow_id: str, auth: dict[str, str],
                 rate: float) -> None:  # fmt: skip
        self.client = client
        self.url = f"/api/workflows/{workflow_id}/executions"
        self.auth = auth
        self.interval = 1.0 / rate
        self.accepted: dict[int, tuple[str, float]] = {}
        """``n`` → (execution id, monotonic time the request was sent)."""
        self.refused: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        n = 0
        next_at = time.monotonic()
        while not self._stop.is_set():
            n += 1
            sent = time.monotonic()
            try:
                r = self.client.post(self.url, json={"input": {"n": n}}, headers=self.auth)
                if r.status_code == 202:
                    self.accepted[n] = (str(r.json()["data"]["id"]), sent)
                else:
                    self.refused.append(f"{r.status_code} {r.text[:200]}")
            except httpx.HTTPError as exc:
                self.refused.append(repr(exc))
            next_at += self.interval
            self._stop.wait(max(0.0, next_at - time.monotonic()))


async def _statuses(database_url: str) -> tuple[dict[str, str], int, list[tuple[Any, str]]]:
    """Status of every execution, step records run more than once, and cron executions
    ``(scheduled_for, status)``."""
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT id, status FROM executions")
        retried = await conn.fetchval("SELECT count(*) FROM step_runs WHERE attempts > 1")
        cron = await conn.fetch(
            "SELECT scheduled_for, status FROM executions WHERE schedule_id IS NOT NULL"
        )
    finally:
        await conn.close()
    return (
        {r["id"]: r["status"] for r in rows},
        int(retried),
        [(r["scheduled_for"], r["status"]) for r in cron],
    )


def _reconciled(procs: list[Proc]) -> int:
    return sum(p.log_path.read_text(errors="replace").count('"reconcile.enqueued"') for p in procs)


def run(
    database_url: str,
    prefix: str,
    *,
    rate: float = 20.0,
    warmup_s: float = 4.0,
    after_kill_s: float = 12.0,
    replica_frozen_s: float = 0.5,
    drain_within_s: float = 45.0,
    logdir: Path | None = None,
) -> Figures:
    """Run the scenario once (``database_url``: an empty, migrated Postgres database).

    The replica is frozen (SIGSTOP) for ``replica_frozen_s`` before the master is killed, so
    the master's last writes — jobs added, completed, moved — are lost with it, as when a
    master dies with a replication backlog."""
    with ExitStack() as stack:
        if logdir is None:
            logdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="failover-")))
        group = stack.enter_context(sentinel_group(down_after_ms=1000, failover_timeout_ms=3000))
        target = stack.enter_context(counting_server())
        api_port = free_port()
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("QUEUE_", "EXECUTION_", "DATABASE_URL", "ADMIN_TOKEN", "API_"))
        }
        env.update(
            group.env(),
            QUEUE_PREFIX=prefix,
            DATABASE_URL=database_url,
            ADMIN_TOKEN=ADMIN_TOKEN,
            API_PORT=str(api_port),
            HTTP_ALLOWLIST=f"127.0.0.1:{target}",
            EXECUTION_WORKER_CONCURRENCY="8",
            EXECUTION_LOCK_DURATION_MS="5000",
            EXECUTION_STALLED_INTERVAL_MS="2000",
            HEARTBEAT_INTERVAL_MS="500",
            SCHEDULER_POLL_INTERVAL_MS="200",
            SCHEDULER_LOOKAHEAD_MS="2000",
            RECONCILE_INTERVAL_MS="1000",
            RECONCILE_MIN_AGE_MS="2000",
            TIMER_POLL_INTERVAL_MS="100",
            TIMER_LOOKAHEAD_MS="1000",
            SHUTDOWN_GRACE_MS="3000",
            LOG_FORMAT="json",
            PYTHONUNBUFFERED="1",
            PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        )
        procs = stack.enter_context(conveyor_processes(env, logdir))
        client = stack.enter_context(
            httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=10)
        )

        def ready() -> bool:
            for p in procs:
                assert p.alive(), f"{p.name} exited:\n{p.tail()}"
            try:
                r = client.get("/api/health/ready")
            except httpx.HTTPError:
                return False
            consumed = r.status_code == 200 and all(
                q["status"] in ("consumed", "idle") and q["workers"] >= 2
                for q in r.json()["data"]["queues"]
            )
            return consumed

        wait_for(ready, timeout=60, interval=0.2)
        tenant = client.post("/api/admin/tenants", json={"name": "failover"}, headers=ADMIN)
        tenant_id = tenant.json()["data"]["id"]
        key = client.post(f"/api/admin/tenants/{tenant_id}/api-keys", headers=ADMIN)
        auth = {"Authorization": f"Bearer {key.json()['data']['key']}"}
        wf = client.post("/api/workflows", json=_workflow(target), headers=auth)
        assert wf.status_code == 201, wf.text
        noop = client.post(
            "/api/workflows",
            json={"name": "tick", "steps": [{"id": "n", "type": "noop"}]},
            headers=auth,
        )
        schedule = client.post(
            "/api/schedules",
            json={"workflowId": noop.json()["data"]["id"], "cron": "* * * * * *",
                  "timezone": "UTC"},
            headers=auth,
        )  # fmt: skip
        assert schedule.status_code == 201, schedule.text

        load = Load(client, str(wf.json()["data"]["id"]), auth, rate)
        load.start()
        try:
            time.sleep(warmup_s)
            old = group.master.port
            replica = group.replicas[0]
            replica.freeze()  # what the master accepts from now on never reaches the replica
            frozen = time.monotonic()
            try:
                time.sleep(replica_frozen_s)
                group.master.kill()
            finally:
                replica.thaw()
            killed = time.monotonic()
            failover_s: float | None = None
            try:
                group.wait_failover(old, timeout=after_kill_s)
                failover_s = round(time.monotonic() - killed, 3)
            except AssertionError:
                pass
            time.sleep(max(0.0, after_kill_s - (time.monotonic() - killed)))
        finally:
            load.stop()
        load_stopped = datetime.now(UTC)
        accepted = dict(load.accepted)
        ids = {eid for eid, _ in accepted.values()}

        def settled() -> bool:
            statuses, _, cron = asyncio.run(_statuses(database_url))
            pending = [i for i in ids if statuses.get(i) not in ("succeeded", "failed")]
            cron_pending = [s for t, s in cron if t <= load_stopped and s not in _ENDED]
            return not pending and not cron_pending

        drained_s: float | None = None
        try:
            wait_for(settled, timeout=drain_within_s, interval=0.5)
            drained_s = round(time.monotonic() - killed, 3)
        except AssertionError:
            pass
        statuses, retried, cron = asyncio.run(_statuses(database_url))
        not_succeeded: dict[str, int] = {}
        for eid in ids:
            status = statuses.get(eid, "missing")
            if status != "succeeded":
                not_succeeded[status] = not_succeeded.get(status, 0) + 1
        due_cron = [s for t, s in cron if t <= load_stopped]
        for status in due_cron:
            if status != "succeeded":
                not_succeeded[f"cron {status}"] = not_succeeded.get(f"cron {status}", 0) + 1
        with _Counter.lock:
            hits = {path: list(times) for path, times in _Counter.hits.items()}
        duplicated = sum(len(t) - 1 for t in hits.values() if len(t) > 1) + retried
        after = [n for n, (_, sent) in accepted.items() if sent >= killed]
        unreplicated = [n for n, (_, sent) in accepted.items() if frozen <= sent < killed]
        first_hits = [min(hits[f"/hit/{n}"]) for n in after if f"/hit/{n}" in hits]
        resume_s = round(min(first_hits) - killed, 3) if first_hits else None
        return Figures(
            resume_s=resume_s,
            failover_s=failover_s,
            lost=sum(not_succeeded.values()),
            duplicated_steps=duplicated,
            accepted=len(accepted),
            accepted_after_kill=len(after),
            accepted_unreplicated=len(unreplicated),
            refused=len(load.refused),
            cron_ticks=len(due_cron),
            reconciled=_reconciled(procs),
            drained_s=drained_s,
            rate_per_s=rate,
            not_succeeded=not_succeeded,
        )
    raise AssertionError("unreachable")  # ExitStack does not swallow exceptions


_ENDED = ("succeeded", "failed", "cancelled")
