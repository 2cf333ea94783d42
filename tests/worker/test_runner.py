"""The execution processor in-process (real Postgres and Redis, no BullMQ loop): how engine
outcomes become the job's fate, lock loss, redelivery of finished executions."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from conveyor.dispatch import FairnessLedger
from conveyor.engine import Engine, OutcomeKind, RunOutcome
from conveyor.errors import PayloadInvalid
from conveyor.queue import JobContext, JobDeferred, WorkflowExecute
from conveyor.settings import Settings
from conveyor.workers.limits import ConcurrencyLimits
from conveyor.workers.runner import ExecutionRunner
from tests.worker._support import Gate, eventually, http_recorder
from tests.worker.conftest import Seeder, seeder

QUEUE = "workflow.execute.us"


@asynccontextmanager
async def runner_for(settings: Settings) -> AsyncIterator[tuple[ExecutionRunner, Seeder]]:
    async with seeder(settings) as s, Engine(s.store, settings, lease_ttl_s=5) as engine:
        limits = ConcurrencyLimits(4, 4)
        ledger = FairnessLedger(s.queues, settings, [QUEUE])
        yield ExecutionRunner(engine, limits, ledger, s.queues.create_queue), s


def job(execution_id: str, tenant: str) -> tuple[WorkflowExecute, JobContext]:
    payload = WorkflowExecute(
        execution_id=execution_id,
        tenant_id=tenant,
        workflow_id="wf",
        region="us",
        enqueued_at=int(time.time() * 1000),
    )
    return payload, JobContext(execution_id, "workflow.execute", QUEUE, 0, payload.enqueued_at or 0)


@pytest.fixture
def allow_local(wsettings: Settings) -> Settings:
    return wsettings.model_copy(update={"http_allowlist": ("127.0.0.1",)})


async def test_redelivered_finished_execution_completes_without_rerunning(
    allow_local: Settings,
) -> None:
    with http_recorder() as rec:
        async with runner_for(allow_local) as (runner, s):
            t = await s.tenant()
            wf = await s.workflow(t, [{"id": "call", "type": "http", "url": rec.url("/once")}])
            (ex,) = await s.executions(t, wf, [None], dispatch=False)
            first = await runner.process(*job(ex, t))
            # BullMQ lost the completion (e.g. Redis dropped): the job is delivered again.
            again = await runner.process(*job(ex, t))
            assert (await s.statuses([ex]))[ex] == "succeeded"
    assert first == {"executionId": ex, "status": "succeeded"}
    assert again == {  # the database state wins, and the job says so plainly
        "executionId": ex,
        "status": "skipped",
        "says": "nothing to do: the execution had already finished",
    }
    assert rec.count("/once") == 1
    assert runner.counters.done == 2 and runner.counters.failed == 0


async def test_unknown_execution_fails_without_retry(wsettings: Settings) -> None:
    async with runner_for(wsettings) as (runner, s):
        with pytest.raises(PayloadInvalid):
            await runner.process(*job("no-such-execution", await s.tenant()))
    assert runner.limits.active == 0


async def test_lock_lost_abandons_the_step_and_defers(allow_local: Settings) -> None:
    with http_recorder() as rec:
        async with runner_for(allow_local) as (runner, s):
            t = await s.tenant()
            steps = [
                {"id": "a", "type": "noop"},
                {"id": "b", "type": "http", "url": rec.url("/block", max_s=5)},
            ]
            (ex,) = await s.executions(t, await s.workflow(t, steps), [None], dispatch=False)
            payload, ctx = job(ex, t)
            task = asyncio.create_task(runner.process(payload, ctx))

            async def blocked() -> bool:
                return rec.count("/block") > 0

            await eventually(blocked, 10, "step b starts")
            ctx.lock_lost.set()  # the queue could not renew the job's lock
            with pytest.raises(JobDeferred):
                await asyncio.wait_for(task, 10)
            steps_run = await s.store.executions.step_runs(t, ex)
            # nothing of "b" was written, nor of the pure "a" (recorded with b's write)
            assert [r.step_id for r in steps_run] == []
            rec.release.set()
            # the lease was released: the next delivery starts at once (a runs again)
            result = await runner.process(*job(ex, t))
            steps_run = await s.store.executions.step_runs(t, ex)
    assert result["status"] == "succeeded"
    assert [r.step_id for r in steps_run] == ["a", "b"]
    assert runner.counters.lock_lost == 1


async def test_busy_execution_is_deferred_not_failed(wsettings: Settings) -> None:
    async with runner_for(wsettings) as (runner, s):
        t = await s.tenant()
        (ex,) = await s.executions(
            t, await s.workflow(t, [{"id": "n", "type": "noop"}]), [None], dispatch=False
        )
        now = time.time()
        from datetime import UTC, datetime, timedelta

        claimed = await s.store.runs.claim(
            ex, datetime.now(UTC), datetime.now(UTC) + timedelta(seconds=3)
        )
        assert claimed is not None  # another runner (say, a crashed worker) holds the lease
        with pytest.raises(JobDeferred) as deferred:
            await runner.process(*job(ex, t))
        # back in the queue: pending again for the fairness count (its next start counts)
        assert runner._ledger._pending[QUEUE].get(t, 0) == 0
    assert 2000 <= deferred.value.delay_ms <= 3500
    assert runner.counters.failed == 0 and time.time() - now < 3


async def test_tenant_at_cap_is_parked_and_promoted_in_order(wsettings: Settings) -> None:
    async with runner_for(wsettings) as (runner, s):
        runner.limits = ConcurrencyLimits(4, 1)
        t = await s.tenant()
        ids = await s.executions(
            t, await s.workflow(t, [{"id": "n", "type": "noop"}]), [None] * 3, dispatch=False
        )
        gate = Gate(runner)
        first = asyncio.create_task(runner.process(*job(ids[0], t)))
        await asyncio.sleep(0.05)
        for parked in ids[1:]:
            with pytest.raises(JobDeferred) as deferred:
                await runner.process(*job(parked, t))
            assert deferred.value.delay_ms >= 5000  # fallback only
        assert runner.limits.parked_count == 2 and runner.limits.active == 1
        promoter = asyncio.create_task(runner.run_promoter())
        try:
            gate.open.set()
            assert (await first)["status"] == "succeeded"
            # ids[1] is handed to the promoter (it is not a delayed BullMQ job here, so the
            # promotion is skipped and the next parked one is tried), oldest first
            await asyncio.sleep(0.2)
            assert runner.limits.parked_count == 0
        finally:
            promoter.cancel()


async def test_a_sub_workflow_whose_parent_was_not_told_is_deferred_not_completed(
    wsettings: Settings,
) -> None:
    """An execution that ended but could not tell its parent (the database failed between
    the two) is delivered again — which tells it — instead of completing its job: a completed
    job is never delivered again, and the parent would wait for good."""
    async with runner_for(wsettings) as (runner, _s):
        for kind, status in ((OutcomeKind.SUCCEEDED, "succeeded"), (OutcomeKind.SKIPPED, "failed")):
            untold = RunOutcome("ex", kind, status, parent_untold=True)
            with pytest.raises(JobDeferred) as deferred:
                runner._settle("ex", untold)
            assert "parent" in str(deferred.value.reason)
            told = RunOutcome("ex", kind, status)
            assert runner._settle("ex", told) is told


async def test_a_job_waiting_for_a_slot_when_the_worker_stops_is_handed_back(
    wsettings: Settings,
) -> None:
    """The worker stops (``draining``): a job still waiting for one of the process's slots
    when the grace period ends (cancelled) is handed back to the queue (deferred, due now),
    not left active until its lock expires; and a job that gets a slot while the worker stops
    is handed back rather than started."""
    async with seeder(wsettings) as s, Engine(s.store, wsettings, lease_ttl_s=5) as engine:
        ledger = FairnessLedger(s.queues, wsettings, [QUEUE])
        runner = ExecutionRunner(engine, ConcurrencyLimits(1, 1), ledger, s.queues.create_queue)
        t = await s.tenant()
        wf = await s.workflow(t, [{"id": "n", "type": "noop"}])
        first, waiting, late = await s.executions(t, wf, [None] * 3, dispatch=False)
        gate = Gate(runner)
        running = asyncio.create_task(runner.process(*job(first, t)))
        queued = asyncio.create_task(runner.process(*job(waiting, t)))
        await asyncio.sleep(0.05)
        assert not queued.done()  # waits for the one slot
        runner.draining = True
        queued.cancel()  # the grace period ended
        with pytest.raises(JobDeferred, match="shutting down") as handed:
            await queued
        assert handed.value.delay_ms == 0
        gate.open.set()
        assert (await running)["status"] == "succeeded"
        with pytest.raises(JobDeferred, match="shutting down"):
            await runner.process(*job(late, t))
