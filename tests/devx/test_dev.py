"""``conveyor dev`` end to end: embedded Redis + SQLite from an empty directory, Ctrl-C, a death."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from conveyor.cli.dev.demo import SAMPLE_INPUT, SAMPLE_WORKFLOW
from tests.conftest import REDIS_HOST, REDIS_PORT
from tests.devx._proc import CliProcess, alive, descendants, wait_gone
from tests.helpers import env_for, free_port, port_open

pytestmark = pytest.mark.slow

READY = r"^Conveyor is running\. Ctrl-C stops everything\.$"
STARTED = re.compile(r"^dev\s*\| started (\w+) \(pid (\d+)\)$")


def _started(dev: CliProcess) -> dict[str, int]:
    return {m[1]: int(m[2]) for line in dev.lines if (m := STARTED.match(line))}


def _data(response: httpx.Response) -> Any:
    assert response.status_code < 300, response.text
    return response.json()["data"]


def _run_sample(api: str, admin_token: str) -> dict[str, Any]:
    """Tenant + key (admin API), the sample workflow, one trigger; the finished execution."""
    with httpx.Client(base_url=api, timeout=10, trust_env=False) as client:
        admin = {"Authorization": f"Bearer {admin_token}"}
        tenant = _data(client.post("/api/admin/tenants", json={"name": "devx"}, headers=admin))
        key = _data(
            client.post(f"/api/admin/tenants/{tenant['id']}/api-keys", json={}, headers=admin)
        )["key"]
        auth = {"Authorization": f"Bearer {key}"}
        workflow = _data(client.post("/api/workflows", json=SAMPLE_WORKFLOW, headers=auth))
        execution = _data(
            client.post(
                f"/api/workflows/{workflow['id']}/executions",
                json={"input": SAMPLE_INPUT},
                headers=auth,
            )
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            execution = _data(client.get(f"/api/executions/{execution['id']}", headers=auth))
            if execution["status"] in ("succeeded", "failed", "cancelled"):
                return dict(execution)
            time.sleep(0.2)
    raise AssertionError(f"execution not finished in 30s: {execution}")


def test_dev_embedded_from_an_empty_directory(tmp_path: Path) -> None:
    api_port, redis_port = free_port(), free_port()
    env = env_for(API_PORT=str(api_port), SHUTDOWN_GRACE_MS="3000")
    dev = CliProcess(["dev", "--redis-port", str(redis_port)], env, cwd=tmp_path)
    try:
        dev.wait_for_line(READY, timeout=60)
        token = dev.wait_for_line(r"^  Admin token  (\S+)", timeout=1)[1]
        pids = _started(dev)
        assert set(pids) == {"redis", "migrate", "api", "worker", "scheduler", "timers"}
        assert port_open(redis_port), "the embedded Redis listens on the configured port"
        assert (tmp_path / ".conveyor" / "conveyor.db").is_file()
        assert (tmp_path / ".conveyor" / "redis" / "appendonly.aof").is_file()
        dev.wait_for_line(r"^\s+TENANT=\$\(curl ", timeout=5)  # how to try it

        execution = _run_sample(f"http://127.0.0.1:{api_port}", token)
        assert execution["status"] == "succeeded", execution

        tree = [p for name, p in pids.items() if name != "migrate"] + descendants(dev.proc.pid)
        dev.proc.send_signal(signal.SIGINT)
        assert dev.wait(timeout=45) == 0, dev.tail()
        assert wait_gone(tree, timeout=5) == [], f"left running: {tree}\n{dev.tail()}"
        assert not port_open(redis_port)
    finally:
        dev.kill_tree()


def test_dev_with_configured_services_stops_when_a_child_dies(
    tmp_path: Path, redis_prefix: str
) -> None:
    api_port = free_port()
    env = env_for(
        QUEUE_REDIS_HOST=REDIS_HOST, QUEUE_REDIS_PORT=str(REDIS_PORT), QUEUE_PREFIX=redis_prefix,
        DATABASE_URL=f"sqlite:///{tmp_path / 'configured.db'}", ADMIN_TOKEN="devx-admin",
        API_PORT=str(api_port), SHUTDOWN_GRACE_MS="3000",
    )  # fmt: skip
    dev = CliProcess(["dev", "--demo"], env, cwd=tmp_path)
    try:
        dev.wait_for_line(READY, timeout=60)
        dev.wait_for_line(r"^Demo tenant \w+ with API key and workflow \w+ are ready", timeout=15)
        pids = _started(dev)
        assert "redis" not in pids, "no embedded Redis when QUEUE_REDIS_HOST is set"
        assert (tmp_path / "configured.db").is_file()
        assert not (tmp_path / ".conveyor" / "conveyor.db").exists()

        tree = [p for name, p in pids.items() if name != "migrate"] + descendants(dev.proc.pid)
        os.kill(pids["worker"], signal.SIGKILL)
        code = dev.wait(timeout=45)
        assert code != 0
        assert "the worker process exited unexpectedly (killed by SIGKILL)" in dev.output
        assert wait_gone(tree, timeout=5) == [], f"left running: {[p for p in tree if alive(p)]}"
    finally:
        dev.kill_tree()
