"""Test helpers shared by every tier: free ports, throwaway redis-servers, waiting."""

from __future__ import annotations

import gc
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], object], timeout: float = 10.0, interval: float = 0.05
) -> object:
    """Poll ``predicate`` until it returns a truthy value; fail the test after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


@dataclass
class RedisServer:
    """A throwaway ``redis-server`` started by a test; stopped by PID, never FLUSHALLed."""

    port: int
    args: list[str]
    dir: Path
    proc: subprocess.Popen[bytes] | None = None
    extra_env: dict[str, str] = field(default_factory=dict)

    def start(self, timeout: float = 10.0) -> RedisServer:
        log = open(self.dir / "redis.log", "ab")  # noqa: SIM115 - closed with the process
        self.proc = subprocess.Popen(
            [
                REDIS_SERVER,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.dir),
                "--save",
                "",
                "--appendonly",
                "no",
                *self.args,
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()  # the child has its own descriptor; keeping ours open leaks a ResourceWarning
        wait_for(lambda: self._ready(), timeout=timeout)
        return self

    def _ready(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(
                f"redis-server exited: {(self.dir / 'redis.log').read_text()[-2000:]}"
            )
        return port_open(self.port) if "--port" not in self.args or "0" not in self.args else True

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@contextmanager
def redis_server(*args: str, port: int | None = None) -> Iterator[RedisServer]:
    """Start a throwaway redis-server on a free port with extra ``args``; stop it afterwards."""
    with tempfile.TemporaryDirectory(prefix="conveyor-redis-") as tmp:
        server = RedisServer(port=port or free_port(), args=list(args), dir=Path(tmp))
        server.start()
        try:
            yield server
        finally:
            server.stop()


def self_signed_cert(directory: Path) -> tuple[Path, Path]:
    """``(cert, key)``: a self-signed certificate for 127.0.0.1/localhost (openssl CLI); the
    certificate is its own CA."""
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=localhost",
            "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        check=True, capture_output=True, timeout=30,
    )  # fmt: skip
    return cert, key


def env_for(**overrides: str) -> dict[str, str]:
    """``os.environ`` without any Conveyor setting that leaks from the developer's shell."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(
            ("QUEUE_", "EXECUTION_", "DATABASE_URL", "ADMIN_TOKEN", "API_", "SECRETS_KEY")
        )
    }
    env.update(overrides)
    return env


@contextmanager
def process(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``python <argv>`` with its output in ``log``; SIGTERM (then SIGKILL) at the end."""
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, *argv], env=env, stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def wait_api_ready(client: httpx.Client, api: subprocess.Popen[bytes], log: Path) -> None:
    """Until ``/api/health/ready`` answers 200; fails with the API's log if it exited."""

    def ready() -> bool:
        assert api.poll() is None, log.read_text()[-3000:]
        try:
            return client.get("/api/health/ready").status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(ready, timeout=30, interval=0.2)


def tenant_auth(client: httpx.Client, name: str, admin: dict[str, str]) -> dict[str, Any]:
    """A new tenant and an API key of it, as request headers."""
    tenant = client.post("/api/admin/tenants", json={"name": name}, headers=admin)
    key = client.post(f"/api/admin/tenants/{tenant.json()['data']['id']}/api-keys",
                      headers=admin).json()["data"]["key"]  # fmt: skip
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def collect_connections_to_killed_servers() -> Iterator[None]:
    """For tests that SIGKILL a Redis server mid-test (autouse it in their ``conftest.py``).
    Connections to the killed server that a client's pool dropped at the failover (seen: three
    ``redis.asyncio`` connections to a killed Sentinel master) are freed only by the cycle
    collector, after the test's loop closed. Collected here, at the end of the test that killed
    the server, their ``ResourceWarning`` is expected; left to a later collection, it would fail
    whatever unrelated test the collector happens to run in (seen once with two test
    processes)."""
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
