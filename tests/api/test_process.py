"""``conveyor api`` as a real process: start-up checks and graceful SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.api._support import restartable_redis
from tests.api.conftest import ADMIN
from tests.helpers import env_for, free_port, wait_for

pytestmark = pytest.mark.slow


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, *args], env=env, stdout=out,
                                stderr=subprocess.STDOUT)  # fmt: skip


def _ready(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/api/health/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def test_sigterm_drains_and_exits_0(api_env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    env = env_for(**api_env, API_PORT=str(port), LOG_FORMAT="json")
    proc = _spawn(["-m", "conveyor.cli", "api"], env, tmp_path / "api.log")
    try:
        wait_for(lambda: _ready(port) or proc.poll() is not None, timeout=30)
        assert proc.poll() is None, (tmp_path / "api.log").read_text()
        r = httpx.get(f"http://127.0.0.1:{port}/api/admin/workers/status", headers=ADMIN)
        procs = r.json()["data"]["processes"]
        assert [p["role"] for p in procs] == ["api"], "the API publishes its own heartbeat"
        # a body over the limit is refused by the real server too (Content-Length precheck)
        r = httpx.post(f"http://127.0.0.1:{port}/api/admin/tenants", content=b"x" * 2_000_000,
                       headers={**ADMIN, "Content-Type": "application/json"})  # fmt: skip
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0, (tmp_path / "api.log").read_text()
        log = (tmp_path / "api.log").read_text()
        assert "api.stopped" in log
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_out_of_date_schema_refuses_to_start(api_env: dict[str, str], tmp_path: Path) -> None:
    env = env_for(**{**api_env, "DATABASE_URL": f"sqlite:///{tmp_path}/empty.db",
                     "API_PORT": str(free_port())})  # fmt: skip
    proc = _spawn(["-m", "conveyor.api"], env, tmp_path / "api.log")
    try:
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    out = (tmp_path / "api.log").read_text()
    assert code != 0
    assert "conveyor migrate" in out
    assert "Traceback" not in out


def test_sigterm_lets_an_in_flight_request_finish(api_env: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    with restartable_redis() as redis_srv:
        env = env_for(**{**api_env, "API_PORT": str(port), "QUEUE_REDIS_PORT": str(redis_srv.port)})
        proc = _spawn(["-m", "conveyor.cli", "api"], env, tmp_path / "api.log")
        try:
            wait_for(lambda: _ready(port) or proc.poll() is not None, timeout=30)
            assert redis_srv.proc is not None
            os.kill(redis_srv.proc.pid, signal.SIGSTOP)  # health now takes ~1 s (probe timeout)
            result: dict[str, int] = {}

            def slow_request() -> None:
                result["status"] = httpx.get(f"http://127.0.0.1:{port}/api/health",
                                             timeout=10).status_code  # fmt: skip

            thread = threading.Thread(target=slow_request)
            thread.start()
            time.sleep(0.3)
            proc.send_signal(signal.SIGTERM)
            thread.join(10)
            assert result.get("status") == 200, "the in-flight request was answered"
            os.kill(redis_srv.proc.pid, signal.SIGCONT)
            assert proc.wait(timeout=20) == 0, (tmp_path / "api.log").read_text()[-3000:]
        finally:
            if redis_srv.proc is not None:
                os.kill(redis_srv.proc.pid, signal.SIGCONT)
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
