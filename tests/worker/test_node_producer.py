"""A Node.js BullMQ producer's invalid job fails without retry; the worker keeps running."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from pathlib import Path

import pytest

from conveyor.settings import Settings
from tests.conftest import REDIS_PORT
from tests.interop.node import HERE, node_binary
from tests.worker._support import eventually, wait_started, worker_env, worker_process
from tests.worker.conftest import seeder

pytestmark = pytest.mark.slow

INTEROP = HERE


@pytest.fixture(scope="module")
def node() -> str:
    return node_binary()


async def test_invalid_node_job_fails_without_retry_worker_survives(
    node: str, wsettings: Settings, tmp_path: Path
) -> None:
    env = worker_env(wsettings.queue_prefix, wsettings.database_url)
    async with seeder(wsettings) as s:
        with worker_process(env, tmp_path) as wp:
            await asyncio.to_thread(wait_started, wp)
            await asyncio.to_thread(
                subprocess.run,
                [
                    node,
                    "worker_invalid_job.mjs",
                    str(REDIS_PORT),
                    wsettings.queue_prefix,
                    "bad-job-1",
                ],
                cwd=INTEROP,
                check=True,
                capture_output=True,
                timeout=30,
            )
            queue = s.queues.create_queue("workflow.execute.us")
            job_key = f"{wsettings.queue_prefix}:workflow.execute.us:bad-job-1"

            async def failed() -> bool:
                return await queue.get_job_state("bad-job-1") == "failed"

            await eventually(failed, 20, "the invalid job fails")
            job = await s.queues.redis.hgetall(job_key)
            assert job["atm"] == "1"  # one attempt of three: no retry
            assert "tenantId" in job["failedReason"]
            # ... and the worker keeps running: a valid execution still gets done
            t = await s.tenant()
            wf = await s.workflow(t, [{"id": "n", "type": "noop"}])
            ids = await s.executions(t, wf, [None])
            await s.wait_status(ids, within=20)
            assert wp.proc.poll() is None
            wp.signal(signal.SIGTERM)
            assert wp.wait(timeout=15) == 0
