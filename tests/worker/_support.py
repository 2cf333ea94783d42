"""Helpers for the worker tests: settings, payloads, a recording HTTP server, subprocesses."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlparse

from conveyor.queue import WorkflowExecute
from conveyor.settings import Settings, load_settings
from tests.conftest import REDIS_HOST, REDIS_PORT

if TYPE_CHECKING:
    from conveyor.workers.runner import ExecutionRunner


def worker_env(prefix: str, database_url: str, **extra: str) -> dict[str, str]:
    """Environment of a Conveyor process under test (never the developer's settings)."""
    env = {
        "QUEUE_REDIS_HOST": REDIS_HOST,
        "QUEUE_REDIS_PORT": str(REDIS_PORT),
        "QUEUE_PREFIX": prefix,
        "DATABASE_URL": database_url,
        "QUEUE_REDIS_CONNECT_TIMEOUT_MS": "1000",
        "QUEUE_REDIS_SOCKET_TIMEOUT_MS": "3000",
        "SHUTDOWN_GRACE_MS": "5000",
        "HEARTBEAT_INTERVAL_MS": "1000",
        "LOG_FORMAT": "json",
    }
    env.update(extra)
    return env


def make_settings(prefix: str, database_url: str = "sqlite:///:memory:", **extra: str) -> Settings:
    return load_settings(worker_env(prefix, database_url, **extra))


def payload(tenant: str, execution_id: str | None = None, region: str = "us") -> WorkflowExecute:
    return WorkflowExecute(
        execution_id=execution_id or f"ex-{uuid.uuid4().hex}",
        tenant_id=tenant,
        workflow_id="wf-1",
        region=region,
    )


@dataclass
class Hit:
    path: str
    query: dict[str, str]
    start: float
    end: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    """The request headers (names lower-case)."""


@dataclass
class Recorder:
    """What the test's HTTP server saw; ``/slow?ms=N`` sleeps N ms, ``/block`` until released."""

    hits: list[Hit] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    release: threading.Event = field(default_factory=threading.Event)
    port: int = 0

    def url(self, path: str, **query: Any) -> str:
        qs = "&".join(f"{k}={v}" for k, v in query.items())
        return f"http://127.0.0.1:{self.port}{path}" + (f"?{qs}" if qs else "")

    def paths(self) -> list[str]:
        with self.lock:
            return [h.path for h in self.hits]

    def count(self, path: str) -> int:
        return self.paths().count(path)

    def finished(self) -> list[Hit]:
        with self.lock:
            return [h for h in self.hits if h.end]


@contextmanager
def http_recorder() -> Iterator[Recorder]:
    rec = Recorder()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            url = urlparse(self.path)
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            headers = {name.lower(): value for name, value in self.headers.items()}
            hit = Hit(url.path, query, time.monotonic(), headers=headers)
            with rec.lock:
                rec.hits.append(hit)
            if url.path == "/slow":
                time.sleep(int(query.get("ms", "200")) / 1000)
            elif url.path == "/block":
                rec.release.wait(timeout=float(query.get("max_s", "20")))
            body = json.dumps({"ok": True, "path": url.path}).encode()
            hit.end = time.monotonic()
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the caller gave up (a cancelled or killed step)

        def log_message(self, *_: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    rec.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield rec
    finally:
        rec.release.set()
        server.shutdown()
        server.server_close()


@dataclass
class WorkerProc:
    proc: subprocess.Popen[bytes]
    log_path: Path

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: signal.Signals) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


@contextmanager
def worker_process(
    env: dict[str, str], tmp_path: Path, name: str = "worker"
) -> Iterator[WorkerProc]:
    """``python -m conveyor.workers.execution`` with ``env``; always killed afterwards."""
    from tests.helpers import env_for

    log_path = tmp_path / f"{name}-{uuid.uuid4().hex[:6]}.log"
    out = open(log_path, "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [sys.executable, "-m", "conveyor.workers.execution"],
        env=env_for(**env),
        stdout=out,
        stderr=subprocess.STDOUT,
        cwd=os.getcwd(),
    )
    wp = WorkerProc(proc, log_path)
    try:
        yield wp
    finally:
        wp.kill()
        out.close()


def wait_started(wp: WorkerProc, timeout: float = 20.0) -> None:
    """Wait for the worker's ``worker.started`` log line."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if "worker.started" in wp.output():
            return
        if wp.proc.poll() is not None:
            raise AssertionError(f"worker exited {wp.proc.returncode}:\n{wp.output()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"worker did not start within {timeout}s:\n{wp.output()[-3000:]}")


async def eventually(predicate: Callable[[], Awaitable[object]], within: float, what: str) -> None:
    """Await ``predicate()`` until it is truthy; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {within}s")
        await asyncio.sleep(0.05)


class Gate:
    """Holds the runs of a runner's engine until opened."""

    def __init__(self, runner: ExecutionRunner) -> None:
        self.open = asyncio.Event()
        engine = runner._engine
        gate = self.open

        class Held:
            async def run(
                self,
                execution_id: str,
                *,
                abandon: asyncio.Event | None = None,
                workflow: tuple[str, str] | None = None,
            ) -> Any:
                await gate.wait()
                return await engine.run(execution_id, abandon=abandon, workflow=workflow)

        runner._engine = Held()
