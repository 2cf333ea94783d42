"""``conveyor status`` end to end: a real ``conveyor api`` on the shared Redis, a fresh SQLite DB."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conveyor.cli import status
from conveyor.settings import load_settings
from tests.conftest import REDIS_HOST, REDIS_PORT
from tests.devx._proc import CliProcess
from tests.helpers import env_for, free_port, wait_for

pytestmark = pytest.mark.slow


def _status(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "conveyor.cli", "status", *args],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    status.add_arguments(parser)
    return parser.parse_args(argv)


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/health", timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def api_env(tmp_path: Path, redis_prefix: str) -> Iterator[dict[str, str]]:
    """``conveyor api`` running against the shared Redis (unique prefix) and a fresh SQLite file."""
    env = env_for(
        QUEUE_REDIS_HOST=REDIS_HOST, QUEUE_REDIS_PORT=str(REDIS_PORT), QUEUE_PREFIX=redis_prefix,
        DATABASE_URL=f"sqlite:///{tmp_path / 'conveyor.db'}", ADMIN_TOKEN=f"adm-{uuid.uuid4().hex}",
        API_HOST="127.0.0.1", API_PORT=str(free_port()), SHUTDOWN_GRACE_MS="2000",
    )  # fmt: skip
    migrate = subprocess.run(
        [sys.executable, "-m", "conveyor.cli", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert migrate.returncode == 0, migrate.stdout + migrate.stderr
    api = CliProcess(["api"], env)
    try:
        url = f"http://127.0.0.1:{env['API_PORT']}"
        try:
            wait_for(lambda: _ready(url), timeout=30)
        except AssertionError:
            raise AssertionError(f"the API did not start:\n{api.tail()}") from None
        yield env
    finally:
        api.proc.terminate()
        try:
            api.wait(timeout=15)
        finally:
            api.kill_tree()


async def _enqueue(env: dict[str, str]) -> None:
    from conveyor.dispatch import execution_queue_name
    from conveyor.queue import QueueFactory
    from conveyor.queue.payloads import WorkflowExecute
    from conveyor.settings import load_settings

    async with QueueFactory(load_settings(env)) as queues:
        queue = queues.create_queue(execution_queue_name("us"))
        payload = WorkflowExecute(
            execution_id=uuid.uuid4().hex, tenant_id="t1", workflow_id="w1", region="us"
        )
        await queue.add(payload, job_id=payload.execution_id)


def test_status_renders_the_depth_of_a_waiting_job(api_env: dict[str, str]) -> None:
    asyncio.run(_enqueue(api_env))

    result = _status(api_env)
    assert result.returncode == 0, result.stderr
    row = next(
        line for line in result.stdout.splitlines() if line.startswith("workflow.execute.us")
    )
    cells = row.split()
    assert cells[:4] == ["workflow.execute.us", "us", "1", "0"], (
        result.stdout
    )  # waiting 1, active 0
    assert "queue driver bullmq" in result.stdout and "redis ready" in result.stdout
    # GET /api/admin/storage below the status: tables, Redis, the queue's kept jobs
    assert "STORAGE  database sqlite" in result.stdout, result.stdout
    assert any(line.split()[:1] == ["executions"] for line in result.stdout.splitlines())
    assert "retention 14d00h" in result.stdout

    # --json, in-process (the same `run` the CLI calls; saves an interpreter start-up).
    out = io.StringIO()
    assert status.run(_parse("--json"), load_settings(api_env), out=out) == 0
    depths = json.loads(out.getvalue())["data"]["executionWorker"]["metrics"]["queueDepths"]
    assert depths["workflow.execute.us"]["waiting"] == 1

    # A refused token (given as a flag, which wins over ADMIN_TOKEN): exit 1, one clear line.
    refused = _status(
        api_env, "--url", f"http://127.0.0.1:{api_env['API_PORT']}", "--token", "wrong"
    )
    assert refused.returncode == 1
    assert "refused the admin token (HTTP 401)" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_status_unreachable_api_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    settings = load_settings(env_for(API_PORT=str(free_port()), ADMIN_TOKEN="x"))
    assert status.run(_parse(), settings) == 1
    assert "cannot reach the Conveyor API at http://127.0.0.1:" in capsys.readouterr().err


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "conveyor.cli", *args],
        env=env, capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def test_pause_and_resume_a_region_from_the_command_line(api_env: dict[str, str]) -> None:
    asyncio.run(_enqueue(api_env))
    paused = _cli(api_env, "pause", "us")
    assert paused.returncode == 0, paused.stderr
    assert paused.stdout.strip() == "workflow.execute.us: paused"
    shown = _status(api_env)
    row = next(line for line in shown.stdout.splitlines() if line.startswith("workflow.execute.us"))
    assert "us (PAUSED)" in row, shown.stdout
    out = io.StringIO()
    assert status.run(_parse("--json"), load_settings(api_env), out=out) == 0
    depth = json.loads(out.getvalue())["data"]["executionWorker"]["metrics"]["queueDepths"]
    assert depth["workflow.execute.us"]["isPaused"] is True
    assert depth["workflow.execute.us"]["paused"] == 1  # the waiting job it holds back

    resumed = _cli(api_env, "resume", "us")
    assert resumed.returncode == 0 and resumed.stdout.strip() == "workflow.execute.us: consuming"
    assert "(PAUSED)" not in _status(api_env).stdout

    unknown = _cli(api_env, "pause", "mars")
    assert unknown.returncode == 1 and "unknown region 'mars'" in unknown.stderr
    assert "Traceback" not in unknown.stderr
    no_token = _cli({k: v for k, v in api_env.items() if k != "ADMIN_TOKEN"}, "resume", "us")
    assert no_token.returncode == 1
    assert (
        no_token.stderr.strip()
        == "conveyor resume: no admin token: set ADMIN_TOKEN or pass --token"
    )
