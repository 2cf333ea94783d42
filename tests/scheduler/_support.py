"""Helpers for the scheduler / timer dispatcher tests: databases, fixtures, child processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from conveyor.settings import Settings, load_settings

NOOP_WORKFLOW: dict[str, Any] = {"name": "tick", "steps": [{"id": "n", "type": "noop"}]}


def settings_for(env: Mapping[str, str]) -> Settings:
    return load_settings(dict(env))


async def migrate(env: Mapping[str, str]) -> None:
    from conveyor.store import migrate as store_migrate

    await store_migrate(settings_for(env))


async def seed_schedule(
    env: Mapping[str, str],
    cron: str,
    *,
    timezone: str = "UTC",
    misfire_policy: str | None = None,
    workflow: Mapping[str, Any] | None = None,
) -> tuple[str, str]:
    """Create a tenant, a workflow and a schedule; returns ``(tenant_id, schedule_id)``."""
    from conveyor.store import Store

    async with Store(settings_for(env), pool_size=1) as store:
        tenant = await store.tenants.create("t")
        wf = await store.workflows.create(tenant.id, dict(workflow or NOOP_WORKFLOW))
        sched = await store.schedules.create(
            tenant.id, wf.id, cron, timezone, misfire_policy=misfire_policy
        )
        return tenant.id, sched.id


async def ticks_of(env: Mapping[str, str], schedule_id: str) -> list[Any]:
    """The recorded ticks ``(fire_time, created_at, execution_id)`` of a schedule, in order."""
    from sqlalchemy import select

    from conveyor.store import Store
    from conveyor.store.schema import schedule_ticks as t

    async with Store(settings_for(env), pool_size=1) as store, store.engine.connect() as conn:
        rows = (
            await conn.execute(
                select(t.c.fire_time, t.c.created_at, t.c.execution_id)
                .where(t.c.schedule_id == schedule_id)
                .order_by(t.c.fire_time)
            )
        ).all()
    return [tuple(r) for r in rows]


async def executions_of(env: Mapping[str, str], schedule_id: str) -> list[str]:
    from sqlalchemy import select

    from conveyor.store import Store
    from conveyor.store.schema import executions as e

    async with Store(settings_for(env), pool_size=1) as store, store.engine.connect() as conn:
        rows = (await conn.execute(select(e.c.id).where(e.c.schedule_id == schedule_id))).all()
    return [r.id for r in rows]


def processes_of(prefix: str, role: str) -> list[dict[str, Any]]:
    """The live heartbeat documents of ``role`` (read straight from Redis)."""
    import json

    import redis

    from tests.conftest import REDIS_HOST, REDIS_PORT

    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:conveyor:process:*", count=1000))
        docs = [json.loads(v) for v in client.mget(keys) if v] if keys else []
    finally:
        client.close()
    return [d for d in docs if d.get("role") == role]


def leader_of(prefix: str) -> dict[str, Any] | None:
    leaders = [d for d in processes_of(prefix, "scheduler") if d.get("lockHeld")]
    return leaders[0] if len(leaders) == 1 else None


class Proc:
    """A Conveyor process started by a test (``python -m``), its log in a temp file."""

    def __init__(self, module: str, env: Mapping[str, str], name: str, logdir: Path) -> None:
        self.module = module
        self.name = name
        self.log_path = logdir / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", module], env=dict(env), stdout=self._log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def terminate(self, timeout: float = 15.0) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise

    def stop(self) -> None:
        try:
            self.kill()
        finally:
            self._log.close()


@contextmanager
def processes() -> Iterator[Callable[..., Proc]]:
    """``start(module, env, name)``; every process started is killed at the end."""
    started: list[Proc] = []
    with tempfile.TemporaryDirectory(prefix="conveyor-sched-") as tmp:

        def start(module: str, env: Mapping[str, str], name: str) -> Proc:
            proc = Proc(module, env, name, Path(tmp))
            started.append(proc)
            return proc

        try:
            yield start
        except BaseException:
            for p in started:
                sys.stderr.write(f"--- {p.name} ---\n{p.log()[-4000:]}\n")
            raise
        finally:
            for p in started:
                p.stop()


def wait_until(predicate: Callable[[], Any], timeout: float, interval: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


async def async_wait_until(predicate: Callable[[], Any], within: float,
                           interval: float = 0.05) -> Any:  # fmt: skip
    """Poll ``predicate`` (sync, or returning a coroutine) until truthy; fail after ``within``."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(interval)


def base_env(settings_env: Mapping[str, str], database_url: str, **extra: str) -> dict[str, str]:
    env = dict(settings_env)
    env.update(
        DATABASE_URL=database_url,
        HEARTBEAT_INTERVAL_MS="300",
        SCHEDULER_POLL_INTERVAL_MS="200",
        SCHEDULER_LOCK_TTL_MS="1500",
        RECONCILE_INTERVAL_MS="1000",
        RECONCILE_MIN_AGE_MS="1000",
        TIMER_POLL_INTERVAL_MS="100",
        TIMER_LOOKAHEAD_MS="1000",
        LOG_FORMAT="json",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([str(Path(__file__).resolve().parents[2]), os.environ.get("PYTHONPATH", "")]),
    )  # fmt: skip
    env.update(extra)
    return env


async def seed_timers(env: Mapping[str, str], dues: list[Any]) -> list[tuple[str, Any]]:
    """Waiting executions, each with one pending timer due at ``dues[i]``; ``(timer_id, due)``."""
    from conveyor.store import Store, new_id
    from conveyor.store.schema import executions, timers

    async with Store(settings_for(env), pool_size=1) as store:
        tenant = await store.tenants.create("t")
        wf = await store.workflows.create(tenant.id, dict(NOOP_WORKFLOW))
        now = min(dues)
        exec_rows, timer_rows = [], []
        for due in dues:
            eid, tid = new_id(), new_id()
            exec_rows.append(dict(
                id=eid, tenant_id=tenant.id, workflow_id=wf.id, workflow_version=1,
                status="waiting", region="us", triggered_by="api", wake_at=due, next_step=1,
                created_at=now, queued_at=now, updated_at=now))  # fmt: skip
            timer_rows.append(dict(
                id=tid, tenant_id=tenant.id, execution_id=eid, workflow_id=wf.id, region="us",
                seq=0, due_at=due, status="pending", created_at=now))  # fmt: skip
        async with store.engine.begin() as conn:
            for i in range(0, len(dues), 500):
                await conn.execute(executions.insert(), exec_rows[i : i + 500])
                await conn.execute(timers.insert(), timer_rows[i : i + 500])
    return [(r["id"], r["due_at"]) for r in timer_rows]


async def timer_states(env: Mapping[str, str]) -> dict[str, tuple[str, Any]]:
    from sqlalchemy import select

    from conveyor.store import Store
    from conveyor.store.schema import timers

    async with Store(settings_for(env), pool_size=1) as store, store.engine.connect() as conn:
        rows = (await conn.execute(select(timers.c.id, timers.c.status, timers.c.fired_at))).all()
    return {r.id: (r.status, r.fired_at) for r in rows}


class HttpHits:
    """A local HTTP server recording ``GET`` paths with their arrival time."""

    def __init__(self) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        hits = self.hits = []  # type: list[tuple[str, float]]

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hits.append((self.path, time.time()))
                body = b'{"ok": true}'
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> HttpHits:
        self.thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self.server.shutdown()
        self.server.server_close()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def at(self, path: str) -> list[float]:
        return [t for p, t in self.hits if p == path]


async def create_and_enqueue(env: Mapping[str, str], tenant_id: str, workflow_id: str,
                             count: int = 1) -> list[str]:  # fmt: skip
    """Trigger executions as the API does: commit ``queued``, then enqueue via the dispatcher."""
    from conveyor.dispatch import ExecutionDispatcher
    from conveyor.queue import QueueFactory, WorkflowExecute
    from conveyor.store import Store

    settings = settings_for(env)
    ids = []
    async with Store(settings, pool_size=1) as store, QueueFactory(settings) as queues:
        dispatcher = ExecutionDispatcher(queues, settings)
        for _ in range(count):
            e, _created = await store.executions.create(tenant_id, workflow_id)
            await dispatcher.enqueue(WorkflowExecute(
                execution_id=e.id, tenant_id=e.tenant_id, workflow_id=e.workflow_id,
                region=e.region, workflow_version=e.workflow_version, reason="trigger"))  # fmt: skip
            ids.append(e.id)
    return ids


async def statuses(env: Mapping[str, str], ids: list[str]) -> dict[str, str]:
    from conveyor.store import Store

    async with Store(settings_for(env), pool_size=1) as store:
        return await store.executions.status_of(ids)


async def seed_workflow(env: Mapping[str, str], definition: Mapping[str, Any]) -> tuple[str, str]:
    from conveyor.store import Store

    async with Store(settings_for(env), pool_size=1) as store:
        tenant = await store.tenants.create("t")
        wf = await store.workflows.create(tenant.id, dict(definition))
    return tenant.id, wf.id
