"""Conveyor as a BullMQ dashboard (Bull Board, or any Node.js BullMQ client) sees it.

Real processes throughout: a ``conveyor worker`` subprocess, the API in-process, Node's ``bullmq``
(the client Bull Board uses) acting on the same Redis prefix. A queue paused from Node shows as
paused everywhere we report on queues; Node's ``getWorkers()`` finds our worker; a job held back
by the tenant cap or completed by an execution suspended on a timer says so in its own words.
"""

from __future__ import annotations

import asyncio
import base64
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from conveyor.cli.tables import render
from conveyor.queue import execution_queue_name
from tests.api.conftest import ADMIN, Api
from tests.conftest import REDIS_PORT
from tests.helpers import env_for, free_port, wait_for
from tests.interop.node import node_binary, run_node
from tests.worker._support import (
    Recorder,
    WorkerProc,
    http_recorder,
    wait_started,
    worker_env,
    worker_process,
)

pytestmark = pytest.mark.slow

QUEUE = execution_queue_name("us")
DELAY = {"name": "sleepy", "steps": [{"id": "nap", "type": "delay", "seconds": 30}]}


@pytest.fixture(scope="module")
def node() -> str:
    return node_binary()


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    with http_recorder() as rec:
        yield rec


@pytest.fixture
def worker(api_env: dict[str, str], tmp_path: Path) -> Iterator[WorkerProc]:
    """A ``conveyor worker`` for region ``us`` on the API's Redis prefix and database (a tenant
    runs one execution at a time; ``http`` steps may call this machine)."""
    env = worker_env(
        api_env["QUEUE_PREFIX"],
        api_env["DATABASE_URL"],
        EXECUTION_REGIONS="us",
        EXECUTION_TENANT_CONCURRENCY="1",
        EXECUTION_WORKER_CONCURRENCY="4",
        HTTP_ALLOWLIST="127.0.0.1",
    )
    with worker_process(env, tmp_path) as wp:
        wait_started(wp)
        yield wp


async def _node(node: str, prefix: str, action: str, *args: str) -> Any:
    return await run_node(node, "admin.mjs", str(REDIS_PORT), prefix, QUEUE, action, *args)


async def _trigger(api: Api, auth: dict[str, str], wf: str) -> str:
    r = await api.client.post(f"/api/workflows/{wf}/executions", headers=auth, json={})
    assert r.status_code == 202, r.text
    return str(r.json()["data"]["id"])


async def _status_of(api: Api, auth: dict[str, str], execution_id: str) -> str:
    r = await api.client.get(f"/api/executions/{execution_id}", headers=auth)
    return str(r.json()["data"]["status"])


async def _until(api: Api, auth: dict[str, str], execution_id: str, status: str) -> None:
    deadline = time.monotonic() + 15
    while (seen := await _status_of(api, auth, execution_id)) != status:
        assert time.monotonic() < deadline, f"{execution_id} is {seen}, not {status}"
        await asyncio.sleep(0.05)


async def _reports(api: Api) -> dict[str, Any]:
    """What each of our views says about the ``us`` queue right now."""
    doc = (await api.client.get("/api/admin/workers/status", headers=ADMIN)).json()
    ready = (await api.client.get("/api/health/ready")).json()["data"]
    metrics = (await api.client.get("/metrics")).text
    return {
        "depth": doc["data"]["executionWorker"]["metrics"]["queueDepths"][QUEUE],
        "region": next(r for r in doc["data"]["regions"] if r["queue"] == QUEUE)["status"],
        "ready": next(q for q in ready["queues"] if q["queue"] == QUEUE)["status"],
        "metric": f'conveyor_queue_paused{{queue="{QUEUE}"}} 1.0' in metrics,
        "held_metric": f'conveyor_queue_jobs{{queue="{QUEUE}",state="paused"}} 1.0' in metrics,
        "cli": render(doc),
    }


async def test_a_queue_paused_by_a_bullmq_client_shows_as_paused_everywhere(
    api: Api, api_env: dict[str, str], worker: WorkerProc, node: str
) -> None:
    prefix = api_env["QUEUE_PREFIX"]
    auth = await api.tenant()
    wf = await api.workflow(auth)
    await _until(api, auth, await _trigger(api, auth, wf), "succeeded")  # consumption works
    before = await _reports(api)
    assert before["depth"]["isPaused"] is False and before["region"] == "consumed"
    assert before["ready"] == "consumed" and not before["metric"]

    assert await _node(node, prefix, "pause") == {"paused": True}
    held = await _trigger(api, auth, wf)  # accepted, but nobody may take it
    await asyncio.sleep(1.5)
    assert await _status_of(api, auth, held) == "queued"
    paused = await _reports(api)
    assert paused["depth"]["isPaused"] is True and paused["depth"]["paused"] == 1
    assert paused["region"] == "paused" and paused["ready"] == "paused"
    assert paused["metric"] and paused["held_metric"]
    assert "us (PAUSED)" in paused["cli"] and "paused" in paused["cli"].split("QUEUES")[1]

    assert await _node(node, prefix, "resume") == {"paused": False}
    await _until(api, auth, held, "succeeded")
    after = await _reports(api)
    assert after["depth"]["isPaused"] is False and after["region"] == "consumed"
    assert not after["metric"]


async def test_pause_and_resume_through_the_admin_api(
    api: Api, api_env: dict[str, str], node: str
) -> None:
    prefix = api_env["QUEUE_PREFIX"]
    r = await api.client.post("/api/admin/queues/us/pause", headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["data"] == {"queue": QUEUE, "region": "us", "paused": True}
    assert await _node(node, prefix, "is-paused") == {"paused": True}  # BullMQ's own flag
    again = await api.client.post("/api/admin/queues/us/pause", headers=ADMIN)
    assert again.status_code == 200  # idempotent
    r = await api.client.post("/api/admin/queues/us/resume", headers=ADMIN)
    assert r.json()["data"]["paused"] is False
    assert await _node(node, prefix, "is-paused") == {"paused": False}

    unknown = await api.client.post("/api/admin/queues/mars/pause", headers=ADMIN)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    assert "mars" in unknown.json()["error"]["message"]
    bad = await api.client.post("/api/admin/queues/US!/pause", headers=ADMIN)
    assert bad.status_code == 422 and bad.json()["success"] is False
    anonymous = await api.client.post("/api/admin/queues/us/pause")
    assert anonymous.status_code == 401


async def test_node_get_workers_lists_a_running_conveyor_worker(
    api_env: dict[str, str], worker: WorkerProc, node: str
) -> None:
    seen = await _node(node, api_env["QUEUE_PREFIX"], "workers")
    queue64 = base64.b64encode(QUEUE.encode()).decode()
    assert seen["count"] == 1, seen  # one worker process, listed once
    assert seen["names"][0].startswith(f"{api_env['QUEUE_PREFIX']}:{queue64}:w:"), seen


async def test_jobs_say_why_they_wait(
    api: Api, api_env: dict[str, str], worker: WorkerProc, recorder: Recorder, node: str
) -> None:
    """Read as a dashboard reads them (Node ``bullmq``): a job whose execution is suspended on
    a timer completed with a return value naming the timer; a job held back by the tenant cap
    is delayed, and its data says why."""
    prefix = api_env["QUEUE_PREFIX"]
    auth = await api.tenant()
    sleepy = await api.workflow(auth, DELAY)
    suspended = await _trigger(api, auth, sleepy)
    await _until(api, auth, suspended, "waiting")
    job = await _node(node, prefix, "job", suspended)
    assert job["state"] == "completed" and job["returnvalue"]["status"] == "waiting"
    assert job["returnvalue"]["suspended"].startswith("timer ")
    assert "resumed by job timer:" in job["returnvalue"]["suspended"]

    blocked = {
        "name": "blocked",
        "steps": [{"id": "call", "type": "http", "url": recorder.url("/block")}],
    }
    wf = await api.workflow(auth, blocked)
    running = await _trigger(api, auth, wf)
    await _until(api, auth, running, "running")
    held = await _trigger(api, auth, wf)
    deadline = time.monotonic() + 10
    while "parked" not in (job := await _node(node, prefix, "job", held))["data"]:
        assert time.monotonic() < deadline, f"the second execution was not parked: {job}"
        await asyncio.sleep(0.1)
    assert job["state"] == "delayed"
    assert job["data"]["parked"].startswith("tenant limit (1 of 1 running across all workers)"), (
        job["data"]
    )
    assert job["data"]["executionId"] == held  # the payload itself is untouched
    recorder.release.set()
    await _until(api, auth, held, "succeeded")


BULLBOARD = Path(__file__).resolve().parents[2] / "deploy" / "bullboard"


@pytest.fixture
def bull_board(api_env: dict[str, str], node: str, tmp_path: Path) -> Iterator[str]:
    """The compose profile's Bull Board (``deploy/bullboard/server.mjs``) on a free port."""
    if not (BULLBOARD / "node_modules" / "@bull-board").is_dir():
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=BULLBOARD, check=True, capture_output=True, timeout=300,
        )  # fmt: skip
    port = free_port()
    env = env_for(
        QUEUE_REDIS_HOST="127.0.0.1", QUEUE_REDIS_PORT=str(REDIS_PORT),
        QUEUE_PREFIX=api_env["QUEUE_PREFIX"], EXECUTION_REGIONS="us,eu",
        BULLBOARD_PORT=str(port),
    )  # fmt: skip
    log_path = tmp_path / "bullboard.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [node, "server.mjs"], cwd=BULLBOARD, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        url = f"http://127.0.0.1:{port}"
        try:
            try:
                wait_for(lambda: _answers(f"{url}/healthz"), timeout=20)
            except AssertionError:
                raise AssertionError(f"Bull Board did not start: {log_path.read_text()}") from None
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


async def test_bull_board_sees_our_worker_and_its_pause_reaches_us(
    api: Api, worker: WorkerProc, bull_board: str
) -> None:
    async with httpx.AsyncClient(base_url=bull_board, timeout=10) as board:
        listed = {q["name"]: q for q in (await board.get("/api/queues")).json()["queues"]}
        assert set(listed) == {QUEUE, execution_queue_name("eu")}
        assert listed[QUEUE]["hasWorkers"] is True, listed[QUEUE]
        assert listed[execution_queue_name("eu")]["hasWorkers"] is False

        assert (await board.put(f"/api/queues/{QUEUE}/pause")).is_success
        seen = await _reports(api)
        assert seen["depth"]["isPaused"] is True and seen["region"] == "paused"
        assert (await board.put(f"/api/queues/{QUEUE}/resume")).is_success
        assert (await _reports(api))["region"] == "consumed"

        r = await api.client.post("/api/admin/queues/us/pause", headers=ADMIN)
        assert r.status_code == 200
        listed = {q["name"]: q for q in (await board.get("/api/queues")).json()["queues"]}
        assert listed[QUEUE]["isPaused"] is True
        await api.client.post("/api/admin/queues/us/resume", headers=ADMIN)
