"""Putting executions on the queue: the ONE way to do it, with tenant fairness applied.

Every producer of ``workflow.execute.<region>`` jobs (the API trigger, the scheduler, the timer
dispatcher, the reconciler) goes through :class:`ExecutionDispatcher`, so every job carries a
BullMQ priority derived from its tenant's backlog:

* :func:`conveyor.dispatch.keys.fair` is a hash ``tenant -> pending jobs`` (approximate).
* Enqueueing increments the tenant's counter and adds the job with ``priority = n`` (lower runs
  sooner), so the k-th pending job of every tenant gets priority k: round-robin across tenants,
  FIFO within one (BullMQ breaks ties in insertion order).
* The execution worker decrements the counter when a job *starts* (batched, clamped at 0) and
  periodically clamps every counter to the queue's real backlog (see
  :class:`~conveyor.dispatch.FairnessLedger`). ``docs/fairness.md`` has the design and limits.

The increment and the duplicate check run in one Lua script: a job id that already exists (the
same execution dispatched twice) is neither counted nor added again. :meth:`enqueue` sends that
script and the add in one ``MULTI`` (one round trip), the add with a guessed priority that is
corrected (``changePriority``, in the background: the caller does not wait for it) when the
count differs — see :meth:`ExecutionDispatcher._guess`.

Concurrent :meth:`~ExecutionDispatcher.enqueue` calls share their Redis round trips through an
:class:`~conveyor.dispatch.EnqueueBatcher` (each still returns only once its own job was added),
so the API, the scheduler, the timer dispatcher and the reconciler all batch alike.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisClusterException, RedisError

from conveyor import tracing
from conveyor.dispatch import keys
from conveyor.dispatch._batching import EnqueueBatcher
from conveyor.errors import QueueUnavailable
from conveyor.queue import ScriptCall, WorkflowExecute, execution_queue_name
from conveyor.queue.scripts import call_script
from conveyor.store import Execution, Timer

if TYPE_CHECKING:
    from conveyor.queue import Queue, QueueFactory
    from conveyor.settings import Settings

log = logging.getLogger(__name__)

MAX_PRIORITY = 2**21 - 1
"""BullMQ's largest priority; deeper backlogs share it (FIFO among themselves)."""

GUESS_TTL_S = 1.0
"""A tenant's last count is a guess for its next one for this long (the worker's ledger
decrements counts within ~50 ms, so older counts are mostly stale)."""

_SEEN_MAX = 10_000


def payload_for(source: Execution | Timer, *, reason: str) -> WorkflowExecute:
    """The ``workflow.execute`` job of an execution (or of the execution a timer resumes)."""
    if isinstance(source, Timer):
        return WorkflowExecute(
            execution_id=source.execution_id,
            tenant_id=source.tenant_id,
            workflow_id=source.workflow_id,
            region=source.region,
            reason=reason,
        )
    return WorkflowExecute(
        execution_id=source.id,
        tenant_id=source.tenant_id,
        workflow_id=source.workflow_id,
        region=source.region,
        workflow_version=source.workflow_version,
        reason=reason,
    )


def priority_for(pending: int) -> int:
    """The BullMQ priority of a tenant's ``pending``-th job (1 = next)."""
    return max(1, min(pending, MAX_PRIORITY))


def now_ms() -> int:
    return int(time.time() * 1000)


class ExecutionDispatcher:
    """Enqueues ``workflow.execute.<region>`` jobs with fairness priorities.

    Cheap to build (no I/O); one per process is enough. Queues are created on first use.
    :meth:`aclose` lets enqueues on their way finish (bounded) at shutdown.
    """

    def __init__(self, queues: QueueFactory, settings: Settings) -> None:
        self._queues = queues
        self._settings = settings
        self._prefix = settings.queue_prefix
        self._cluster = settings.uses_cluster
        self._batcher = EnqueueBatcher(self._enqueue_one, self.enqueue_many)
        self._reranks: set[asyncio.Task[None]] = set()
        """Re-ranks of jobs whose guessed priority was wrong, on their way (see
        :meth:`_enqueue_one`)."""
        self._count_script: Any = None
        self._seen: dict[tuple[str, str], tuple[int, float]] = {}
        """``(queue, tenant) -> (last count, when)``: where :meth:`_guess` starts from."""
        self._decrement_script: Any = None

    def queue(self, region: str) -> Queue:
        """The execution queue of ``region`` (one handle per name, kept by the factory)."""
        return self._queues.create_queue(execution_queue_name(region))

    async def aclose(self, timeout_s: float = 2.0) -> None:
        """Let batched enqueues and re-ranks on their way finish (at most ``timeout_s`` each),
        then cancel them."""
        await self._batcher.close(timeout_s)
        await self.reranked(timeout_s)

    async def reranked(self, timeout_s: float = 2.0) -> None:
        """Wait until the re-ranks on their way are done (at most ``timeout_s``; the late ones
        are cancelled: a job keeps its guessed rank, a fairness detail the ledger's clamp and
        the next counts absorb)."""
        if not self._reranks:
            return
        _done, late = await asyncio.wait(list(self._reranks), timeout=timeout_s)
        for task in late:
            task.cancel()

    def _count_call(self, queue_name: str, items: Sequence[tuple[str, str]]) -> ScriptCall:
        """The count script's call for ``(tenant, job_id)`` items (see ``keys.COUNT_SCRIPT``)."""
        names = [keys.fair(self._prefix, queue_name, cluster=self._cluster)]
        names += [
            keys.job(self._prefix, queue_name, job_id, cluster=self._cluster)
            for _tenant, job_id in items
        ]
        args: list[Any] = [keys.FAIR_TTL_MS, *(tenant for tenant, _job_id in items)]
        return ScriptCall(keys.COUNT_SCRIPT, names, args)

    async def _count(self, queue_name: str, items: Sequence[tuple[str, str]]) -> list[int]:
        """Count ``(tenant, job_id)`` items as pending; 0 for job ids that already exist."""
        call = self._count_call(queue_name, items)
        if self._count_script is None:
            self._count_script = self._queues.redis.register_script(keys.COUNT_SCRIPT)
        script = self._count_script
        try:
            if self._cluster:
                result = await script(keys=call.keys, args=call.args)
            else:
                result = await call_script(
                    self._queues.redis, script.script, script.sha, call.keys, call.args
                )
        except (RedisError, RedisClusterException, OSError) as exc:
            raise QueueUnavailable(f"cannot enqueue on {queue_name}: {exc}") from exc
        return [int(n) for n in result]

    async def _uncount(self, queue_name: str, tenants: Sequence[str]) -> None:
        """Best-effort undo of :meth:`_count` after a failed add (the clamp bounds any miss)."""
        per: dict[str, int] = {}
        for tenant in tenants:
            per[tenant] = per.get(tenant, 0) + 1
        if self._decrement_script is None:
            self._decrement_script = self._queues.redis.register_script(keys.DECREMENT_SCRIPT)
        args: list[Any] = [x for tenant, n in per.items() for x in (tenant, n)]
        try:
            await self._decrement_script(
                keys=[keys.fair(self._prefix, queue_name, cluster=self._cluster)], args=args
            )
        except (RedisError, RedisClusterException, OSError):
            log.warning(
                "dispatch.uncount_failed", extra={"queue": queue_name, "jobs": len(tenants)}
            )

    @staticmethod
    def _stamp(payload: WorkflowExecute) -> WorkflowExecute:
        if payload.enqueued_at is None:
            return payload.model_copy(update={"enqueued_at": now_ms()})
        return payload

    async def enqueue(
        self, payload: WorkflowExecute, *, job_id: str | None = None, delay_ms: int = 0
    ) -> str:
        """Put one execution on its region's queue; returns the job id.

        The job id defaults to the execution id; dispatching the same one twice is harmless.
        Concurrent calls with the default job id and no delay share round trips (batched).
        Raises :class:`~conveyor.errors.QueueUnavailable` fast when Redis is down.

        With tracing on, the enqueue is a producer span (child of the caller's span: the API's
        trigger; a new trace for a cron tick, a timer or a recovery) whose ``traceparent`` the
        job carries to the worker.
        """
        if tracing.enabled and payload.traceparent is None:
            return await self._enqueue_traced(payload, job_id=job_id, delay_ms=delay_ms)
        return await self._send(payload, job_id=job_id, delay_ms=delay_ms)

    async def _send(self, payload: WorkflowExecute, *, job_id: str | None, delay_ms: int) -> str:
        if job_id is None and not delay_ms:
            await self._batcher.enqueue(payload)
            return payload.execution_id
        return await self._enqueue_one(payload, job_id=job_id, delay_ms=delay_ms)

    async def _enqueue_traced(
        self, payload: WorkflowExecute, *, job_id: str | None, delay_ms: int
    ) -> str:
        queue_name = execution_queue_name(payload.region)
        attributes = {
            "messaging.system": "bullmq",
            "messaging.operation.type": "send",
            "messaging.destination.name": queue_name,
            "messaging.message.id": job_id or payload.execution_id,
            "conveyor.execution_id": payload.execution_id,
            "conveyor.tenant_id": payload.tenant_id,
            "conveyor.reason": payload.reason or "",
        }
        with tracing.start_span(f"send {queue_name}", attributes, kind=tracing.SpanKind.PRODUCER):
            traced = payload.model_copy(update={"traceparent": tracing.inject()})
            return await self._send(traced, job_id=job_id, delay_ms=delay_ms)

    async def _enqueue_one(
        self, payload: WorkflowExecute, *, job_id: str | None = None, delay_ms: int = 0
    ) -> str:
        job_id = job_id or payload.execution_id
        queue = self.queue(payload.region)
        tenant = payload.tenant_id
        if delay_ms:  # staged ahead of time: nothing waits on it, keep the exact two steps
            (pending,) = await self._count(queue.name, [(tenant, job_id)])
            if pending == 0:
                log.debug("dispatch.duplicate", extra={"queue": queue.name, "jobId": job_id})
                return job_id
            try:
                return await queue.add(
                    self._stamp(payload),
                    job_id=job_id,
                    priority=priority_for(pending),
                    delay_ms=delay_ms,
                )
            except BaseException:
                await self._uncount(queue.name, [tenant])
                raise
        # One round trip: count and add in one MULTI (atomic: both happen or neither), the
        # add with the priority the count most likely gives; re-rank when it gave another.
        guess = self._guess(queue.name, tenant)
        result, job_id = await queue.add_after(
            self._count_call(queue.name, [(tenant, job_id)]),
            self._stamp(payload),
            job_id=job_id,
            priority=guess,
        )
        pending = int(result[0])
        if pending == 0:  # the job existed: the add was a no-op too
            log.debug("dispatch.duplicate", extra={"queue": queue.name, "jobId": job_id})
            return job_id
        self._remember(queue.name, tenant, pending)
        if priority_for(pending) != guess:
            # The job is added (the caller may go on); only its rank is off. Re-rank it
            # without holding the caller for a second round trip: at a steady rate the guess
            # misses each time the worker's ledger flushes its decrements (every ~50 ms).
            task = asyncio.create_task(
                self._rerank(queue, job_id, priority_for(pending)), name="dispatch.rerank"
            )
            self._reranks.add(task)
            task.add_done_callback(self._reranks.discard)
        return job_id

    @staticmethod
    async def _rerank(queue: Queue, job_id: str, priority: int) -> None:
        try:
            await queue.change_priority(job_id, priority)
        except Exception as exc:  # Redis down: the job runs at its guessed rank
            log.warning("dispatch.rerank_failed", extra={"jobId": job_id, "error": repr(exc)})

    def _remember(self, queue_name: str, tenant: str, pending: int) -> None:
        now = time.monotonic()
        if len(self._seen) >= _SEEN_MAX:  # forget what is too old to guess from anyway
            self._seen = {k: v for k, v in self._seen.items() if now - v[1] <= GUESS_TTL_S}
        self._seen[(queue_name, tenant)] = (pending, now)

    def _guess(self, queue_name: str, tenant: str) -> int:
        """The priority the next count will most likely give ``tenant``: 1 (no backlog) unless
        this process counted it recently, then one more than that count."""
        seen = self._seen.get((queue_name, tenant))
        if seen is None or time.monotonic() - seen[1] > GUESS_TTL_S:
            return 1
        return priority_for(seen[0] + 1)

    async def enqueue_many(
        self, payloads: Sequence[WorkflowExecute], *, delays_ms: Sequence[int] | None = None
    ) -> list[str]:
        """Put many executions on their queues (one script call and one bulk add per region).

        ``delays_ms`` (same length as ``payloads``; ``0`` = now) stages jobs as BullMQ
        *delayed* jobs, runnable that many milliseconds from now (the cron scheduler's ticks
        materialised ahead). Job id = execution id: an id that already exists is neither
        counted nor added again. Returns the job ids in input order, duplicates included.
        """
        if delays_ms is not None and len(delays_ms) != len(payloads):
            raise ValueError("delays_ms must have one delay per payload")
        delay_of: dict[str, int] = {}
        by_region: dict[str, dict[str, WorkflowExecute]] = {}
        for i, payload in enumerate(payloads):
            by_region.setdefault(payload.region, {}).setdefault(payload.execution_id, payload)
            if delays_ms is not None:
                delay_of.setdefault(payload.execution_id, max(0, int(delays_ms[i])))
        for region, unique in by_region.items():
            queue = self.queue(region)
            items = list(unique.values())
            counts = await self._count(queue.name, [(p.tenant_id, p.execution_id) for p in items])
            fresh = [(p, n) for p, n in zip(items, counts, strict=True) if n > 0]
            if not fresh:
                continue
            batch: list[tuple[Any, dict[str, Any]]] = [
                (
                    self._stamp(p),
                    {
                        "job_id": p.execution_id,
                        "priority": priority_for(n),
                        "delay_ms": delay_of.get(p.execution_id, 0),
                    },
                )
                for p, n in fresh
            ]
            try:
                await queue.add_bulk(batch)
            except BaseException:
                await self._uncount(queue.name, [p.tenant_id for p, _n in fresh])
                raise
        return [p.execution_id for p in payloads]
