"""The worker process's life in-process: start-up refusals, regions, a dying loop."""

from __future__ import annotations

import asyncio
import logging

import pytest

from conveyor.dispatch import FairnessLedger
from conveyor.runtime import Supervisor, list_processes
from conveyor.settings import Settings
from conveyor.workers import execution
from tests.worker._support import eventually, make_settings
from tests.worker.conftest import seeder


async def test_out_of_date_schema_refuses_to_start(
    fresh_pg_url: str, redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(redis_prefix, fresh_pg_url)  # never migrated
    with caplog.at_level(logging.ERROR):
        assert await asyncio.wait_for(execution.serve(settings), 20) == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and "conveyor migrate" in errors[0]


async def test_consumes_every_region_with_one_budget(wsettings: Settings) -> None:
    settings = wsettings.model_copy(
        update={
            "execution_regions": ("us", "eu"),
            "execution_worker_concurrency": 3,
            "heartbeat_interval_ms": 200,
        }
    )
    supervisor = Supervisor("worker")
    task = asyncio.create_task(execution.serve(settings, supervisor))
    try:
        async with seeder(settings) as s:
            t = await s.tenant()
            wf = await s.workflow(t, [{"id": "n", "type": "noop"}])
            ids = await s.executions(t, wf, [None] * 5, region="us")
            ids += await s.executions(t, wf, [None] * 5, region="eu")
            await s.wait_status(ids, within=20)

            async def beating() -> bool:
                live = await list_processes(s.queues, role="worker")
                return bool(live) and live[0]["jobsDone"] == 10

            await eventually(beating, 5, "heartbeat")
            (doc,) = await list_processes(s.queues, role="worker")
        assert doc["regions"] == ["us", "eu"] and doc["concurrency"] == 3
        assert doc["queues"] == ["workflow.execute.us", "workflow.execute.eu"]
        assert doc["jobsDone"] == 10 and doc["jobsFailed"] == 0
        assert set(doc["queueDepths"]) == {"workflow.execute.us", "workflow.execute.eu"}
    finally:
        supervisor.stop("test done")
        assert await asyncio.wait_for(task, 20) == 0


async def test_a_dying_loop_stops_the_process_non_zero(
    wsettings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken(self: FairnessLedger) -> None:
        await asyncio.sleep(0.2)
        raise RuntimeError("fairness loop exploded")

    monkeypatch.setattr(FairnessLedger, "run", broken)
    with caplog.at_level(logging.ERROR):
        assert await asyncio.wait_for(execution.serve(wsettings), 20) == 1
    assert any(
        "fairness loop exploded" in r.getMessage() + str(getattr(r, "error", ""))
        for r in caplog.records
    )
