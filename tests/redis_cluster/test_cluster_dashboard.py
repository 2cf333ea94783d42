"""Bull Board (``deploy/bullboard/server.mjs``) on a Redis Cluster: with
``QUEUE_REDIS_CLUSTER_NODES`` it connects with an ioredis ``Cluster`` and shows the regional
queues under their hash-tagged names, with the jobs Conveyor enqueued there."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from pathlib import Path

import httpx
import pytest

from conveyor.dispatch import ExecutionDispatcher
from conveyor.queue import QueueFactory, WorkflowExecute
from conveyor.settings import Settings
from tests.helpers import env_for, free_port, wait_for
from tests.interop.node import node_binary
from tests.queue.conftest import make_settings
from tests.redis_cluster._cluster import redis_cluster

pytestmark = pytest.mark.slow

BULLBOARD = Path(__file__).resolve().parents[2] / "deploy" / "bullboard"


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1.0).status_code == 200
    except httpx.HTTPError:
        return False


async def _enqueue(settings: Settings, per_region: dict[str, int]) -> None:
    async with QueueFactory(settings) as qf:
        dispatcher = ExecutionDispatcher(qf, settings)
        try:
            for region, n in per_region.items():
                for _ in range(n):
                    await dispatcher.enqueue(WorkflowExecute(
                        execution_id=uuid.uuid4().hex, tenant_id="t", workflow_id="w",
                        region=region))  # fmt: skip
        finally:
            await dispatcher.aclose()


def test_bull_board_lists_the_cluster_queues(redis_prefix: str, tmp_path: Path) -> None:
    node = node_binary()
    if not (BULLBOARD / "node_modules" / "@bull-board").is_dir():
        subprocess.run(["npm", "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                       cwd=BULLBOARD, check=True, capture_output=True, timeout=300)  # fmt: skip
    with redis_cluster() as cluster:
        settings = make_settings(redis_prefix, EXECUTION_REGIONS="us,eu", **cluster.env())
        asyncio.run(_enqueue(settings, {"us": 2, "eu": 1}))
        port = free_port()
        env = env_for(QUEUE_REDIS_CLUSTER_NODES=cluster.setting, QUEUE_PREFIX=redis_prefix,
                      EXECUTION_REGIONS="us,eu", BULLBOARD_PORT=str(port))  # fmt: skip
        log_path = tmp_path / "bullboard.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen([node, "server.mjs"], cwd=BULLBOARD, env=env, stdout=log,
                                    stderr=subprocess.STDOUT)  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            try:
                wait_for(lambda: _answers(f"{url}/healthz"), timeout=20)
            except AssertionError:
                raise AssertionError(f"Bull Board did not start: {log_path.read_text()}") from None
            queues = httpx.get(f"{url}/api/queues", timeout=10).json()["queues"]
            listed = {q["name"]: q for q in queues}
            assert set(listed) == {"{workflow.execute.us}", "{workflow.execute.eu}"}, listed
            waiting = {
                name: sum(q["counts"].get(s, 0) for s in ("waiting", "prioritized"))
                for name, q in listed.items()
            }
            assert waiting == {"{workflow.execute.us}": 2, "{workflow.execute.eu}": 1}, listed
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
