"""The execution processor: limits, fairness, the engine, lock loss, outcomes, metrics.

One :class:`ExecutionRunner` serves every region's BullMQ worker of the process.

* A job first takes a slot of the process-wide budget, then one of its tenant's in this process
  (``EXECUTION_TENANT_CONCURRENCY_PER_PROCESS``), then the fleet's (a lease of the tenant's
  ``EXECUTION_TENANT_CONCURRENCY`` across all workers, and a start token of its start rate,
  :mod:`conveyor.dispatch.limits`). Refused by any of them, the job is parked (``JobDeferred``:
  back to delayed, no slot held, no attempt used) and promoted when a slot frees, or, for the
  rate, delayed until its reserved start time. See :mod:`conveyor.workers.limits`.
* The engine gets ``JobContext.lock_lost`` as its ``abandon`` event: if the job's lock cannot be
  renewed, the step in progress is abandoned (nothing of it is written, the lease is released;
  a stale runner's writes are fenced off by the lease) and the job is deferred, never failed.
* Cut off by the end of the shutdown grace period, a job is handed back (delayed, due now) for
  another worker, not failed; the engine releases its lease on cancellation.
* The database is the source of truth: an execution already terminal is "done" (the job
  completes); an execution failed by its workflow completes the job too (the job's work, running
  the execution, was done); the job fails only when it can never be run (unknown execution).
  Database outages defer the job instead of failing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from redis.exceptions import RedisClusterException, RedisError

from conveyor import tracing
from conveyor.engine import OutcomeKind, RunOutcome
from conveyor.errors import DatabaseUnavailable, PayloadInvalid
from conveyor.logs import EXECUTION_ID
from conveyor.queue import JobDeferred
from conveyor.workers.limits import ConcurrencyLimits, TenantLimitsBook, fallback_delay_ms

if TYPE_CHECKING:
    from conveyor.dispatch import FairnessLedger, TenantLimiter
    from conveyor.queue import JobContext, Queue
    from conveyor.queue.payloads import WorkflowExecute
    from conveyor.runtime import MetricsPublisher

log = logging.getLogger(__name__)

LOCK_LOST_DEFER_MS = 1_000
"""A job whose lock was lost goes back to delayed for this long (if we still hold it)."""
DB_DOWN_DEFER_MS = 5_000
"""A job that met a database outage is retried after this long."""
LEASE_BUSY_DEFER_MS = 2_000
"""A job whose execution is leased by another runner is retried after this long (at least)."""
NOT_DUE_DEFER_MAX_S = 300.0
"""An execution whose timer is due within this long is retried then; later ones are left to
the timer dispatcher."""
LIMITS_DOWN_DEFER_MS = 1_000
"""A job whose tenant limits could not be checked (Redis error) is retried after this long."""
_PROMOTE_RETRIES = 40
_FLEET_POPS = 8
"""Most extra pops after promotions that found their job gone, per freed slot."""
_REDIS_ERRORS = (RedisError, RedisClusterException, OSError)
"""What an unreachable Redis (or a cluster in the middle of a failover) raises."""
RELEASE_LINGER_S = 0.002
"""Leases released within this long are given back together (one pipeline)."""
WARM_SLOT_S = 0.025
"""An ended run's fleet slot stays with its process this long before it is given back, when the
tenant has no start rate: the tenant's next run here takes it over with no Redis round trip
(see :meth:`ExecutionRunner._fleet_admit`). The cap is never exceeded."""
WARM_SLOT_MAX_AGE_S = 1.0
"""A slot is passed from run to run for this long at most after it was taken; then the next run's
acquire hands it to the tenant's parked jobs first (the run is parked behind them unless the
leases and they leave a slot; the script pops them for promotion), else swaps it for a lease of
the run's own (one script: the tenant's count never holds both)."""
_RAN = frozenset(("succeeded", "failed", "cancelled", "waiting", "lease_lost", "error"))
"""Outcomes of runs that really executed something (observed in the metrics)."""


class EngineLike(Protocol):
    def run(
        self,
        execution_id: str,
        *,
        abandon: asyncio.Event | None = None,
        workflow: tuple[str, str] | None = None,
    ) -> Awaitable[RunOutcome]: ...


@dataclass(slots=True)
class _Slot:
    """The fleet slot a run holds: its lease in Redis."""

    lease: str
    """The lease's member (named apart for each acquire: job id, this process, a number)."""
    cap: int
    """The cap it was taken under; 0: not to be passed on (a start rate; found expired)."""
    since: float
    """When it was taken (``time.monotonic()``)."""


@dataclass(slots=True)
class _Ended:
    """A fleet slot to give back: the slot of a run that ended here (``slot`` None: none, only
    fill the tenant's free slots)."""

    tenant: str
    slot: _Slot | None
    due: float
    """When it is given back (``time.monotonic()``) unless a run of its tenant takes it over."""

    @property
    def warm(self) -> bool:
        return self.slot is not None and self.slot.cap > 0


@dataclass
class Counters:
    done: int = 0
    failed: int = 0
    parked: int = 0
    deferred: int = 0
    lock_lost: int = 0
    parked_fleet: int = 0
    parked_rate: int = 0
    leases_lost: int = 0
    slots_reused: int = 0
    """Runs that took over a warm fleet slot of an ended run here (no acquire sent)."""


_SAYS = {
    OutcomeKind.SKIPPED: "nothing to do: the execution had already finished",
    OutcomeKind.LEASE_LOST: "another runner took the execution over; it continues there",
    OutcomeKind.NOT_DUE: "execution waits on a timer or an event; the timer dispatcher or the "
    "event resumes it",
}


def job_result(outcome: RunOutcome) -> dict[str, Any]:
    """The job's return value: the outcome in words a BullMQ dashboard reader understands.

    A job *completes* whenever this run is over, also when the execution is not: an execution
    suspended on a ``delay`` step completes its job (``status: waiting``) and is resumed later
    by a new job (``timer:<id>``) the timer dispatcher adds when the timer is due.
    """
    result: dict[str, Any] = {"executionId": outcome.execution_id, "status": outcome.kind.value}
    if outcome.kind is OutcomeKind.WAITING and outcome.timer_id is None:
        # a wait step (parked again, or without a timeout): an event or its deadline resumes it
        due = "" if outcome.wake_at is None else f" or its timeout at {outcome.wake_at.isoformat()}"
        result["suspended"] = f"waiting for an event{due}; resumed by job event:<event>:<id>"
    elif outcome.kind is OutcomeKind.WAITING:
        due = outcome.wake_at.isoformat() if outcome.wake_at is not None else "unknown"
        result["suspended"] = (
            f"timer {outcome.timer_id} due {due}; resumed by job timer:{outcome.timer_id}"
        )
    elif outcome.kind in _SAYS:
        result["says"] = _SAYS[outcome.kind]
    return result


def _defer_ms(seconds: float | None, floor_ms: int) -> int:
    """A deferral a little after ``seconds`` (at least ``floor_ms``, at least 50 ms)."""
    ms = int((seconds or 0.0) * 1000) + 50
    return max(ms, floor_ms, 50)


class ExecutionRunner:
    """The processor of ``workflow.execute.<region>`` jobs (one per process)."""

    def __init__(
        self,
        engine: EngineLike,
        limits: ConcurrencyLimits,
        ledger: FairnessLedger,
        queue_for: Callable[[str], Queue],
        metrics: MetricsPublisher | None = None,
        fleet: TenantLimiter | None = None,
        book: TenantLimitsBook | None = None,
    ) -> None:
        self._engine = engine
        self.limits = limits
        self.fleet = fleet
        """The fleet-wide limits (``None``: only this process's own, e.g. in-process tests)."""
        self.book = book
        self._ledger = ledger
        self._queue_for = queue_for
        self._metrics = metrics
        self.counters = Counters()
        self.draining = False
        """Set when the process stops: a job cancelled now is handed back, not failed."""
        self._promotions: asyncio.Queue[tuple[str, str, str]] = asyncio.Queue()
        self._fleet_promotions: asyncio.Queue[tuple[str, str, str]] = asyncio.Queue()
        self._releases: list[_Ended] = []
        """Fleet leases to give back, sent together every :data:`RELEASE_LINGER_S` once due."""
        self._slots: dict[int, _Slot] = {}
        """The fleet slot each running job holds, by its run's context (``id(ctx)``: the same
        job id may run twice here at once — a job whose lock was lost, fetched again before its
        first run was abandoned — and each run gives back its own slot); a warm slot taken over
        keeps its lease."""
        self._lease_tag = f"{uuid.uuid4().hex[:8]}."
        self._lease_seq = 0
        self._releases_ready = asyncio.Event()
        self._release_soon = asyncio.Event()
        """Set when a release that is not a warm slot is queued (the loop waits no longer)."""

    # --- the processor ----------------------------------------------------------------------
    async def process(self, payload: WorkflowExecute, ctx: JobContext) -> dict[str, Any]:
        """Run one job; its log lines carry the execution id, and with tracing on it is one
        consumer span continuing the trace of the job's ``traceparent`` (a new trace without)."""
        token = EXECUTION_ID.set(payload.execution_id)
        try:
            if tracing.enabled:
                return await self._process_traced(payload, ctx)
            return await self._process(payload, ctx)
        finally:
            EXECUTION_ID.reset(token)

    async def _process_traced(self, payload: WorkflowExecute, ctx: JobContext) -> dict[str, Any]:
        attributes = {
            "messaging.system": "bullmq",
            "messaging.operation.type": "process",
            "messaging.destination.name": ctx.queue_name,
            "messaging.message.id": ctx.id,
            "conveyor.execution_id": payload.execution_id,
            "conveyor.tenant_id": payload.tenant_id,
            "conveyor.workflow_id": payload.workflow_id,
            "conveyor.job.attempts_made": ctx.attempts_made,
        }
        with tracing.start_span(
            f"process {ctx.queue_name}",
            attributes,
            kind=tracing.SpanKind.CONSUMER,
            context=tracing.extract(payload.traceparent),
            set_status_on_exception=False,
        ) as span:
            try:
                result = await self._process(payload, ctx)
            except JobDeferred as exc:  # not an error: the job runs again later
                span.set_attribute("conveyor.job.deferred", str(exc))
                raise
            except BaseException as exc:
                span.record_exception(exc)
                tracing.mark_error(type(exc).__name__, span)
                raise
            span.set_attribute("conveyor.outcome", str(result.get("status")))
            return result

    async def _process(self, payload: WorkflowExecute, ctx: JobContext) -> dict[str, Any]:
        limits = self.limits
        try:
            await limits.acquire_slot()
        except asyncio.CancelledError:
            self._hand_back_cancelled()  # waited for a slot until the grace period ended
            raise
        try:
            if self.draining:  # fetched (or waited for a slot) while the worker stops
                raise JobDeferred(0, "worker shutting down")
            tenant = payload.tenant_id
            if not limits.try_start(tenant, ctx.id):
                self.counters.parked += 1
                self._count_parked("concurrency")
                delay_ms = limits.park(tenant, ctx.queue_name, ctx.id)
                reason = (
                    f"tenant limit per process ({limits.running(tenant)} of "
                    f"{limits.tenant_concurrency} running here); starts when one of them finishes"
                )
                raise JobDeferred(delay_ms, reason, parked=True)
            if self.fleet is not None:
                try:
                    await self._fleet_admit(payload, ctx)
                except asyncio.CancelledError:
                    limits.cancel_start(tenant)
                    self._hand_back_cancelled()
                    raise
                except BaseException:
                    limits.cancel_start(tenant)
                    raise
            return await self._started(payload, ctx)
        finally:
            limits.release_slot()

    def _hand_back_cancelled(self) -> None:
        """Cancelled before the run started: while the worker stops (the end of its grace
        period), the job is handed back to the queue (delayed, due now) for another worker —
        raises :class:`JobDeferred` — not left active until its lock expires and a stalled
        check recovers it (counted towards the stalled limit). Otherwise returns (the caller
        re-raises the cancellation)."""
        if not self.draining:
            return
        task = asyncio.current_task()
        if task is not None:
            task.uncancel()
        raise JobDeferred(0, "worker shutting down")

    def _count_parked(self, reason: str) -> None:
        if self._metrics is not None:
            self._metrics.count_parked(reason)

    async def _fleet_admit(self, payload: WorkflowExecute, ctx: JobContext) -> None:
        """Take a fleet-wide slot and start token for the job, or park it (``JobDeferred``)."""
        assert self.fleet is not None
        tenant = payload.tenant_id
        own = self.book.get(tenant) if self.book is not None else None
        if own is None:
            return
        ended = self._take_release(tenant)
        slot = ended.slot if ended is not None else None
        now = time.monotonic()
        hand_off = False
        if (
            slot is not None
            and slot.cap
            and not ctx.parked
            and own.start_rate is None
            and own.concurrency >= slot.cap
        ):
            if now - slot.since < WARM_SLOT_MAX_AGE_S:
                # the slot of a run that ended here passes to this one: the tenant's count in
                # Redis does not change, so the cap holds without asking
                self._slots[id(ctx)] = slot
                self.counters.slots_reused += 1
                return
            # passed on long enough: handed to the tenant's parked jobs first (this run queues
            # behind them unless a slot is left), else swapped for a lease of this run — one
            # script: giving it back and asking apart would hold both leases for a moment, and a
            # fleet whose cap is its total concurrency would park a job for nothing
            hand_off = True
        # a start rate, a lowered cap, a lease found expired, a job parked before (its parked
        # entry is dropped by the script): the acquire script decides, dropping the old lease
        self._lease_seq += 1
        lease = f"{ctx.id}@{self._lease_tag}{self._lease_seq}"
        replaces = slot.lease if slot is not None else None
        try:
            verdict = await self.fleet.acquire(
                tenant,
                ctx.id,
                ctx.queue_name,
                own,
                replaces=replaces,
                lease=lease,
                hand_off=hand_off,
            )
        except BaseException as exc:
            if slot is not None:  # maybe dropped by the script, no longer renewed: give it back
                self._release_later(tenant, _Slot(slot.lease, 0, slot.since))
            # the script may have run and taken the new lease (its reply lost or late): give
            # that back too, or it would hold a slot nobody renews until it expires
            self._release_later(tenant, _Slot(lease, 0, now))
            if not isinstance(exc, _REDIS_ERRORS):
                raise
            log.warning("worker.limits_unavailable", extra={"error": repr(exc)})
            raise JobDeferred(LIMITS_DOWN_DEFER_MS, "tenant limits unavailable") from exc
        if verdict.started:
            cap = 0 if own.start_rate is not None else own.concurrency
            self._slots[id(ctx)] = _Slot(lease, cap, now)
            return
        # the ended run's slot, freed by the script: at the cap, the script popped the parked
        # jobs it makes room for; over the start rate (refused after the cap's part), a release
        # looks for them
        for queue_name, parked_id in verdict.promote:
            self._fleet_promotions.put_nowait((tenant, queue_name, parked_id))
        if replaces is not None and verdict.reason != "concurrency":
            self._release_later(tenant, None)
        self.counters.parked += 1
        self._count_parked(verdict.reason)
        if verdict.reason == "rate":
            self.counters.parked_rate += 1
            raise JobDeferred(
                max(1, verdict.wait_ms),
                f"tenant start rate ({own.start_rate:g}/s, burst {own.start_burst}); "
                "starts at its reserved time",
                parked=True,
            )
        self.counters.parked_fleet += 1
        delay_ms = fallback_delay_ms(verdict.parked, self.limits.avg_duration_s, own.concurrency)
        raise JobDeferred(
            delay_ms,
            f"tenant limit ({own.concurrency} of {own.concurrency} running across all workers); "
            "starts when one of them finishes",
            parked=True,
        )

    async def _started(self, payload: WorkflowExecute, ctx: JobContext) -> dict[str, Any]:
        tenant = payload.tenant_id
        self._ledger.started(ctx.queue_name, tenant)
        started = time.monotonic()
        latency_s = time.time() - payload.enqueued_at / 1000 if payload.enqueued_at else None
        status = "error"
        try:
            outcome = await self._run(payload, ctx)
            status = str(outcome.kind.value)
            self.counters.done += 1
            return job_result(outcome)
        except JobDeferred:
            status = "deferred"
            self.counters.deferred += 1
            self._ledger.unstarted(ctx.queue_name, tenant)  # back in the queue: pending again
            raise
        except asyncio.CancelledError:
            if not self.draining:
                raise
            # Cut off by the end of the shutdown grace period: hand the job back to the queue
            # (delayed, due now) so another worker resumes it; never count it as failed.
            task = asyncio.current_task()
            if task is not None:
                task.uncancel()
            status = "deferred"
            self.counters.deferred += 1
            self._ledger.unstarted(ctx.queue_name, tenant)
            log.warning("execution.handed_back", extra={"executionId": payload.execution_id})
            raise JobDeferred(0, "worker shutting down") from None
        except BaseException:
            self.counters.failed += 1
            raise
        finally:
            duration = time.monotonic() - started
            promote = self.limits.finish(tenant, duration)
            if promote is not None:
                self._promotions.put_nowait((tenant, *promote))
            slot = self._slots.pop(id(ctx), None)
            if slot is not None:
                self._release_later(tenant, slot)
            if self._metrics is not None and status in _RAN:
                self._metrics.observe_execution(duration, status)
                if latency_s is not None:
                    self._metrics.observe_start_latency(max(0.0, latency_s))

    async def _run(self, payload: WorkflowExecute, ctx: JobContext) -> RunOutcome:
        """Run the engine under the job's lock; the outcome the job completes with."""
        execution_id = payload.execution_id
        if ctx.lock_lost.is_set():
            raise JobDeferred(LOCK_LOST_DEFER_MS, "job lock lost")
        try:
            outcome = await self._engine.run(
                execution_id,
                abandon=ctx.lock_lost,
                workflow=(payload.tenant_id, payload.workflow_id),
            )
        except DatabaseUnavailable as exc:
            log.warning(
                "execution.db_unavailable", extra={"executionId": execution_id, "error": str(exc)}
            )
            raise JobDeferred(DB_DOWN_DEFER_MS, "database unavailable") from exc
        return self._settle(execution_id, outcome)

    def _settle(self, execution_id: str, outcome: RunOutcome) -> RunOutcome:
        """Turn an engine outcome into the job's fate: return (complete), defer or fail."""
        kind = outcome.kind
        if kind is OutcomeKind.MISSING:
            raise PayloadInvalid(f"execution {execution_id} does not exist")
        if outcome.parent_untold:
            # A sub-workflow ended but its parent could not be told (the database failed):
            # the next delivery tells it — nothing else would wake a parent without a timeout.
            raise JobDeferred(DB_DOWN_DEFER_MS, "sub-workflow ended; its parent is told next")
        if kind is OutcomeKind.BUSY:
            # Another runner holds a live lease: it finishes the execution, or it died and its
            # lease expires; either way try again then. Never fail the job for this.
            raise JobDeferred(
                _defer_ms(outcome.retry_after_s, LEASE_BUSY_DEFER_MS),
                "execution leased by another runner",
            )
        if kind is OutcomeKind.NOT_DUE:
            wait = outcome.retry_after_s
            if wait is not None and wait <= NOT_DUE_DEFER_MAX_S:
                raise JobDeferred(_defer_ms(wait, 0), "execution timer not due yet")
        elif kind is OutcomeKind.ABANDONED:
            self.counters.lock_lost += 1
            log.warning("execution.lock_lost", extra={"executionId": execution_id})
            raise JobDeferred(LOCK_LOST_DEFER_MS, "job lock lost; step abandoned")
        # SUCCEEDED / FAILED / CANCELLED / WAITING: the database holds the result.
        # SKIPPED: already finished (duplicate delivery). LEASE_LOST: a newer runner has it.
        return outcome

    # --- the fleet's limits --------------------------------------------------------------------
    def _release_later(self, tenant: str, slot: _Slot | None) -> None:
        """Queue a slot to give back (``None``: none, only fill the tenant's free slots). A
        slot with a cap stays warm for :data:`WARM_SLOT_S` first; the others go with the next
        flush."""
        ended = _Ended(tenant, slot, 0.0)
        if ended.warm:
            ended.due = time.monotonic() + WARM_SLOT_S
        else:
            self._release_soon.set()
        self._releases.append(ended)
        self._releases_ready.set()

    def _take_release(self, tenant: str) -> _Ended | None:
        """The latest slot of ``tenant`` waiting to be given back: the next run of the tenant
        in this process takes it over — warm, with no round trip, or in its acquire (no
        spurious park behind our own unsent release, one round trip for both)."""
        releases = self._releases
        for i in range(len(releases) - 1, -1, -1):
            ended = releases[i]
            if ended.tenant == tenant and ended.slot is not None:
                del releases[i]
                return ended
        return None

    @property
    def warm_slots(self) -> int:
        """Fleet slots of ended runs this process keeps for a while (:data:`WARM_SLOT_S`)."""
        return sum(1 for e in self._releases if e.warm)

    def cool(self, leases: list[str]) -> None:
        """Never pass these leases on (their renewal found them expired: this process was
        frozen, the slot may be someone else's by now): those of ended runs are given back
        with the next flush, those of running runs when the run ends."""
        lost = set(leases)
        for ended in self._releases:
            if ended.slot is not None and ended.slot.lease in lost:
                ended.slot.cap = 0
                ended.due = 0.0
                self._release_soon.set()
        for slot in self._slots.values():
            if slot.lease in lost:
                slot.cap = 0

    async def flush_releases(self, *, due_only: bool = False) -> int:
        """Give the fleet slots of ended runs back, all in one pipeline (best effort: an
        unreleased lease expires by itself), and queue the parked jobs they free room for.
        ``due_only``: keep the warm slots whose time has not come (:data:`WARM_SLOT_S`)."""
        if due_only:
            now = time.monotonic()
            batch = [e for e in self._releases if e.due <= now]
            self._releases = [e for e in self._releases if e.due > now]
        else:
            batch, self._releases = self._releases, []
        if not self._releases:
            self._releases_ready.clear()
        if self.fleet is None or not batch:
            return 0
        items = [(e.tenant, e.slot.lease if e.slot is not None else None) for e in batch]
        results = await self.fleet.release_many(items)
        for ended, (_tenant, lease), result in zip(batch, items, results, strict=True):
            if isinstance(result, BaseException):
                log.warning(
                    "worker.limits_release_failed", extra={"lease": lease, "error": repr(result)}
                )
                continue
            for queue_name, parked_id in result:
                self._fleet_promotions.put_nowait((ended.tenant, queue_name, parked_id))
        return len(batch)

    async def run_releases(self) -> None:
        """Send the released leases that are due every :data:`RELEASE_LINGER_S` while there
        are some (a run's end does not wait on Redis; concurrent ends share one round trip;
        warm slots wait :data:`WARM_SLOT_S`). Never ends."""
        while True:
            await self._releases_ready.wait()
            self._release_soon.clear()
            due = min(e.due for e in self._releases) if self._releases else 0.0
            wait = max(RELEASE_LINGER_S, due - time.monotonic())
            if wait > RELEASE_LINGER_S:  # only warm slots: until the first is due, or sooner
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._release_soon.wait(), wait)
            await asyncio.sleep(RELEASE_LINGER_S)
            await self.flush_releases(due_only=True)

    async def run_fleet(self, interval_s: float | None = None) -> None:
        """Renew this process's leases (a third of their TTL apart, like the job locks' half)
        and sweep: slots of crashed workers free when their leases expire, and the oldest
        parked jobs are promoted into them. Sleeps until the earliest lease of a tenant with
        parked jobs expires, or the next renewal. Never ends by itself."""
        fleet = self.fleet
        if fleet is None:
            await asyncio.Event().wait()
            return
        interval = interval_s if interval_s is not None else fleet.lease_ttl_ms / 3000
        next_renew = time.monotonic() + interval
        sleep = 0.0
        while True:
            await asyncio.sleep(max(0.01, sleep))
            try:
                if time.monotonic() >= next_renew:
                    next_renew = time.monotonic() + interval
                    await self.renew_leases()
                popped, wait_ms = await fleet.sweep()
            except _REDIS_ERRORS as exc:
                log.warning("worker.limits_sweep_failed", extra={"error": repr(exc)})
                sleep = 1.0
                continue
            for queue_name, job_id in popped:
                self._fleet_promotions.put_nowait(("", queue_name, job_id))
            sleep = next_renew - time.monotonic()
            if wait_ms is not None:
                sleep = min(sleep, wait_ms / 1000 + 0.005)

    async def renew_leases(self) -> None:
        """Extend the fleet leases this process holds (one script). A lease given back while
        the renewal was on its way is given back again: the renewal puts a lease it does not
        find back (Redis lost it; the run still holds the slot), and one that reached Redis
        after the release — sent again once Redis had its script back, after the release that
        Redis already knew — would otherwise hold one of the tenant's slots until it expired."""
        fleet = self.fleet
        assert fleet is not None
        asked = dict(fleet.held)
        lost = await fleet.renew()
        for lease, tenant in asked.items():
            if lease not in fleet.held:
                self._release_later(tenant, _Slot(lease, 0, 0.0))
        if lost:
            self.cool(lost)
            self.counters.leases_lost += len(lost)
            log.warning("worker.leases_expired", extra={"leases": lost[:20]})

    async def run_fleet_promoter(self) -> None:
        """Promote the parked jobs popped into free fleet slots; when one is no longer parked
        (promoted elsewhere, finished), pop the next. A job Redis could not be asked about
        is tried again (popped, it has no other way back before its fallback delay). Never
        ends by itself."""
        while True:
            item = await self._fleet_promotions.get()
            try:
                await self._promote_popped(*item)
            except _REDIS_ERRORS as exc:
                log.warning("worker.promote_failed", extra={"jobId": item[2], "error": repr(exc)})
                await asyncio.sleep(0.5)
                self._fleet_promotions.put_nowait(item)
            except Exception as exc:
                log.warning("worker.promote_failed", extra={"jobId": item[2], "error": repr(exc)})
                await asyncio.sleep(0.5)

    async def promote_popped(self) -> int:
        """Shutdown, after the last releases (:meth:`flush_releases`): promote the parked jobs
        they popped — of any worker of the fleet — now; the fleet promoter is about to stop,
        and a popped job is no longer parked for anyone else to promote: it would wait its
        fallback delay. Best effort (the caller bounds it); returns how many were promoted."""
        done = 0
        while not self._fleet_promotions.empty():
            tenant, queue_name, job_id = self._fleet_promotions.get_nowait()
            try:
                done += await self._promote_popped(tenant, queue_name, job_id)
            except Exception as exc:
                log.warning("worker.promote_failed", extra={"jobId": job_id, "error": repr(exc)})
        return done

    async def _promote_popped(self, tenant: str, queue_name: str, job_id: str) -> int:
        """Promote a job popped into a free fleet slot, or — when it is no longer parked — the
        next ones popped in its place; how many were promoted."""
        if await self._promote_one(queue_name, job_id):
            return 1
        if not tenant or self.fleet is None:
            return 0
        done = 0
        for _ in range(_FLEET_POPS):
            nxt = await self.fleet.release(tenant, None)
            if not nxt:
                break
            ok = [await self._promote_one(q, j) for q, j in nxt]
            done += sum(ok)
            if all(ok):
                break
        return done

    # --- promoting parked jobs --------------------------------------------------------------
    async def run_promoter(self) -> None:
        """Promote the oldest parked job of a tenant whose slot freed. Never ends by itself."""
        while True:
            tenant, queue_name, job_id = await self._promotions.get()
            try:
                await self._promote(tenant, queue_name, job_id)
            except Exception as exc:
                log.warning("worker.promote_failed", extra={"jobId": job_id, "error": repr(exc)})
                self.limits.unpark_front(tenant, queue_name, job_id)
                await asyncio.sleep(1.0)
                nxt = self.limits.take_parked(tenant)
                if nxt is not None:
                    self._promotions.put_nowait((tenant, *nxt))

    async def _promote(self, tenant: str, queue_name: str, job_id: str) -> None:
        item: tuple[str, str] | None = (queue_name, job_id)
        while item is not None:
            if await self._promote_one(*item):
                return
            item = self.limits.take_parked(tenant)

    async def _promote_one(self, queue_name: str, job_id: str) -> bool:
        """Promote one parked job; False if it is no longer parked (try the next one)."""
        queue = self._queue_for(queue_name)
        for _ in range(_PROMOTE_RETRIES):
            if await queue.promote(job_id):
                log.debug("worker.promoted", extra={"jobId": job_id})
                return True
            state = await queue.get_job_state(job_id)
            if state == "delayed":  # it reached the delayed set since the promote: again now
                continue
            if state != "active":  # "active": still on its way to delayed; try again shortly
                return False
            await asyncio.sleep(0.005)
        return False

    async def hand_back_parked(self, timeout_s: float = 2.0) -> int:
        """Shutdown: promote every parked job so other workers run it now. Returns the count."""
        parked = self.limits.drain_parked()
        done = 0

        async def promote_all() -> None:
            nonlocal done
            for queue_name, job_id in parked:
                if await self._queue_for(queue_name).promote(job_id):
                    done += 1

        with contextlib.suppress(Exception):
            await asyncio.wait_for(promote_all(), timeout=timeout_s)
        return done
