"""``conveyor worker``: the execution worker process.

Start-up, in order: settings (given), the database schema (``SchemaOutOfDate`` -> "run
`conveyor migrate`", exit 1), ``assert_queue_is_ready`` (one clear line, exit 1 within seconds),
then one BullMQ worker per ``workflow.execute.<region>`` of ``EXECUTION_REGIONS``, all sharing
one process-wide budget of ``EXECUTION_WORKER_CONCURRENCY`` slots, the per-process tenant cap
and the fleet-wide tenant limits (Redis leases and start-rate bucket).

Supervised loops: each region's BullMQ worker, the heartbeat, the fairness ledger, the parked-job
promoters, the tenant limits' reload, the lease renewal and sweep, and the metrics publisher. If
one dies the process logs why and exits 1.

Shutdown on SIGTERM/SIGINT: stop fetching; active jobs get ``SHUTDOWN_GRACE_MS`` to finish;
jobs cut off after that are handed back to the queue (not failed) for another worker; parked
jobs are promoted for the other workers; metrics and fairness counters are flushed; the
heartbeat key is removed; exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import time
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

from conveyor.dispatch import ExecutionDispatcher, FairnessLedger, TenantLimiter, payload_for
from conveyor.engine import Engine
from conveyor.errors import ConveyorError
from conveyor.queue import (
    JobContext,
    JobDeferred,
    Queue,
    QueueEvent,
    QueueFactory,
    Worker,
    WorkflowExecute,
    execution_queue_name,
)
from conveyor.runtime import (
    Heartbeat,
    MetricsPublisher,
    Supervisor,
    freeze_startup_heap,
    heartbeat_loop,
    serve_checked,
)
from conveyor.settings import Settings
from conveyor.workers.limits import ConcurrencyLimits, TenantLimitsBook
from conveyor.workers.runner import ExecutionRunner

if TYPE_CHECKING:
    from conveyor.store import Execution, Store

log = logging.getLogger("conveyor.workers.execution")  # also when run with -m

MAX_STALLED_COUNT = 2
"""A job may be recovered from a crashed worker twice before BullMQ fails it."""
_CLOSE_MARGIN_S = 5.0
_COUNTED = frozenset(("succeeded", "failed", "cancelled", "waiting", "lease_lost"))
"""Job results counted per tenant (runs that executed something; as the runner's metrics)."""


class ExecutionWorker:
    """The running process: everything that exists once start-up checks have passed."""

    def __init__(
        self, settings: Settings, engine: Engine, queues: QueueFactory, supervisor: Supervisor
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.queues = queues
        self.supervisor = supervisor
        self.queue_names = [execution_queue_name(r) for r in settings.execution_regions]
        self.workers: list[Worker] = []
        self.started = False
        self.stalled = 0

    def queue(self, name: str) -> Queue:
        return self.queues.create_queue(name)

    def _build(self) -> None:
        s = self.settings
        self.limits = ConcurrencyLimits(
            s.execution_worker_concurrency, s.tenant_concurrency_per_process
        )
        self.ledger = FairnessLedger(self.queues, s, self.queue_names)
        self.metrics = MetricsPublisher(self.queues)
        self.book = TenantLimitsBook(s, self.engine.store.limits.all)
        self.fleet = TenantLimiter(
            self.queues.redis,
            s.queue_prefix,
            lease_ttl_ms=s.execution_lock_duration_ms,
            cluster=s.uses_cluster,
        )
        self.runner = ExecutionRunner(
            self.engine,
            self.limits,
            self.ledger,
            self.queue,
            metrics=self.metrics,
            fleet=self.fleet,
            book=self.book,
        )
        self.engine.on_step = self.metrics.observe_step
        self.dispatcher = ExecutionDispatcher(self.queues, s)
        self.engine.enqueue = self._enqueue
        self.heartbeat = Heartbeat(self.queues, role="worker", settings=s, info_fn=self.info)
        self.workers = [
            self.queues.create_worker(
                name,
                self.process,
                concurrency=s.execution_worker_concurrency,
                lock_duration_ms=s.execution_lock_duration_ms,
                stalled_interval_ms=s.execution_stalled_interval_ms,
                max_stalled_count=MAX_STALLED_COUNT,
            )
            for name in self.queue_names
        ]
        for worker in self.workers:
            worker.on("stalled", self._on_stalled)

    async def _enqueue(self, execution: Execution, reason: str, job_id: str) -> None:
        """The engine's: a sub-workflow's child, or the parent its end woke (bounded)."""
        payload = payload_for(execution, reason=reason)
        await asyncio.wait_for(self.dispatcher.enqueue(payload, job_id=job_id), timeout=3.0)

    async def process(self, payload: WorkflowExecute, ctx: JobContext) -> dict[str, Any]:
        """The runner's processor, counting finished runs per tenant
        (``conveyor_tenant_executions_finished_total``, bounded by the publisher)."""
        try:
            result = await self.runner.process(payload, ctx)
        except (JobDeferred, asyncio.CancelledError):
            raise
        except Exception:
            self.metrics.count_tenant_execution(payload.tenant_id, "error")
            raise
        status = str(result.get("status"))
        if status in _COUNTED:
            self.metrics.count_tenant_execution(payload.tenant_id, status)
        return result

    def _on_stalled(self, event: QueueEvent) -> None:
        """This worker's stalled-job check took back a job whose lock had expired (its worker
        crashed, froze or lost Redis): the job runs again, resuming after its last completed
        step. Logged and counted (``conveyor_jobs_stalled_total``)."""
        self.stalled += 1
        self.metrics.count_stalled(event.queue)
        log.warning("worker.job_stalled", extra={"queue": event.queue, "jobId": event.job_id})

    async def info(self) -> dict[str, Any]:
        """The worker's part of its heartbeat document."""
        c = self.runner.counters
        return {
            "started": self.started,
            "queueDriver": self.queues.driver,
            "queues": self.queue_names,
            "concurrency": self.limits.concurrency,
            "tenantConcurrency": self.settings.tenant_concurrency,
            "tenantConcurrencyPerProcess": self.limits.tenant_concurrency,
            "tenantStartRate": self.settings.execution_tenant_start_rate,
            "tenantLimitOverrides": self.book.overrides,
            "activeJobs": self.limits.active,
            "activeByTenant": self.limits.active_by_tenant(),
            "parkedJobs": self.limits.parked_count,
            "leasesHeld": len(self.fleet.held),
            "fleetSlotsWarm": self.runner.warm_slots,
            "fleetSlotsReused": c.slots_reused,
            "jobsDone": c.done,
            "jobsFailed": c.failed,
            "jobsParked": c.parked,
            "jobsParkedFleet": c.parked_fleet,
            "jobsParkedRate": c.parked_rate,
            "jobsDeferred": c.deferred,
            "jobsStalled": self.stalled,
            "queueDepths": await self._depths(),
        }

    async def _depths(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for name in self.queue_names:
            try:
                counts = await self.queue(name).get_job_counts(
                    "waiting", "prioritized", "active", "delayed"
                )
            except (ConveyorError, OSError):
                continue
            waiting = counts.get("waiting", 0) + counts.get("prioritized", 0)
            active, delayed = counts.get("active", 0), counts.get("delayed", 0)
            out[name] = {
                "waiting": waiting,
                "active": active,
                "delayed": delayed,
                "total": waiting + active + delayed,
            }
        return out

    async def serve(self) -> int:
        """Run until a signal or a loop death; drain; 0 on a clean stop, 1 otherwise."""
        self._build()
        sup = self.supervisor
        with contextlib.suppress(Exception):  # the first load; the loop retries on failure
            await asyncio.wait_for(self.book.refresh(), timeout=5.0)
        for name, worker in zip(self.queue_names, self.workers, strict=True):
            sup.spawn(f"consume.{name}", worker.run())
        sup.spawn("heartbeat", heartbeat_loop(self.heartbeat))
        sup.spawn("fairness", self.ledger.run())
        sup.spawn("promoter", self.runner.run_promoter())
        sup.spawn("limits", self.book.run())
        sup.spawn("leases", self.runner.run_fleet())
        sup.spawn("fleet_promoter", self.runner.run_fleet_promoter())
        sup.spawn("releases", self.runner.run_releases())
        sup.spawn("metrics", self.metrics.run())
        self.started = True
        # Everything loaded so far (modules, settings, pools) lives as long as the process:
        # keep it out of the collector's scans so full collections do not stall the loop.
        freeze_startup_heap()
        log.info(
            "worker.started",
            extra={
                "queues": self.queue_names,
                "concurrency": self.limits.concurrency,
                "tenantConcurrency": self.settings.tenant_concurrency,
                "tenantConcurrencyPerProcess": self.limits.tenant_concurrency,
                "id": self.heartbeat.process_id,
            },
        )
        with contextlib.suppress(Exception):
            await self.heartbeat.beat()
        await sup.wait()
        await self.drain()
        if sup.failure is not None:
            log.error("worker.exit_failed", extra={"error": repr(sup.failure)})
            return 1
        return 0

    async def drain(self) -> None:
        """Two-phase drain: stop fetching and wait the grace period, then hand work back."""
        grace = self.settings.shutdown_grace_s
        started = time.monotonic()
        log.info("worker.draining", extra={"activeJobs": self.limits.active, "graceS": grace})
        self.runner.draining = True
        closes = [w.close(timeout_s=grace) for w in self.workers]
        with contextlib.suppress(Exception):
            await asyncio.wait_for(
                asyncio.gather(*closes, return_exceptions=True), timeout=grace + _CLOSE_MARGIN_S
            )
        handed = await self.runner.hand_back_parked()
        with contextlib.suppress(Exception):  # the fleet slots of the runs that just ended
            await asyncio.wait_for(self.runner.flush_releases(), timeout=2.0)
        with contextlib.suppress(Exception):  # and the parked jobs they popped, fleet-wide
            await asyncio.wait_for(self.runner.promote_popped(), timeout=2.0)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.ledger.flush(), timeout=2.0)
        await self.supervisor.cancel_all(5.0)  # metrics.run flushes on cancel
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.heartbeat.remove(), timeout=2.0)
        with contextlib.suppress(Exception):
            await self.dispatcher.aclose()
        c = self.runner.counters
        log.info(
            "worker.stopped",
            extra={
                "drainS": round(time.monotonic() - started, 3),
                "activeLeft": self.limits.active,
                "parkedHandedBack": handed,
                "jobsDone": c.done,
                "jobsFailed": c.failed,
                "fleetSlotsReused": c.slots_reused,
            },
        )


async def serve(settings: Settings, supervisor: Supervisor | None = None) -> int:
    """Check, start, serve, drain. Returns the process exit code.

    ``supervisor`` lets an embedding caller (tests, ``conveyor dev``) stop the worker with
    ``supervisor.stop()``; SIGTERM/SIGINT stop it either way.
    """
    sup = supervisor or Supervisor("worker")

    async def start(stack: AsyncExitStack, store: Store, queues: QueueFactory) -> int:
        engine = await stack.enter_async_context(
            Engine(store, settings, lease_ttl_s=settings.execution_lock_duration_ms / 1000)
        )
        return await ExecutionWorker(settings, engine, queues, sup).serve()

    return await serve_checked(settings, "worker", sup, start, secrets=True)


def _run_loop(settings: Settings) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        return asyncio.run(serve(settings))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(serve(settings))


def run(args: argparse.Namespace, settings: Settings) -> int:
    """``conveyor worker``."""
    return _run_loop(settings)


if __name__ == "__main__":
    from conveyor.runtime import entry

    entry(run, "worker")
