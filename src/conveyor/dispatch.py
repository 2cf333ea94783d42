"""Putting executions on the queue: the ONE way to do it, with tenant fairness applied.

Every producer of ``workflow.execute.<region>`` jobs (the API trigger, the scheduler, the timer
dispatcher, the reconciler) goes through :class:`ExecutionDispatcher`, so every job carries a
BullMQ priority derived from its tenant's backlog:

* ``{prefix}:conveyor:fair:<queue>`` is a hash ``tenant -> pending jobs`` (approximate).
* Enqueueing increments the tenant's counter and adds the job with ``priority = n`` (lower runs
  sooner), so the k-th pending job of every tenant gets priority k: round-robin across tenants,
  FIFO within one (BullMQ breaks ties in insertion order).
* The execution worker decrements the counter when a job *starts* (batched, clamped at 0) and
  periodically clamps every counter to the queue's real backlog (see
  :mod:`conveyor.workers._fairness`). ``docs/fairness.md`` has the design and its limits.

The increment and the duplicate check run in one Lua script: a job id that already exists (the
same execution dispatched twice) is neither counted nor added again. :meth:`enqueue` sends that
script and the add in one ``MULTI`` (one round trip), the add with a guessed priority that is
corrected (``changePriority``) when the count differs — see :meth:`ExecutionDispatcher._guess`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from conveyor.errors import QueueUnavailable
from conveyor.queue._base import ScriptCall

if TYPE_CHECKING:
    from conveyor.queue import Queue, QueueFactory
    from conveyor.queue.payloads import WorkflowExecute
    from conveyor.settings import Settings

log = logging.getLogger(__name__)

MAX_PRIORITY = 2**21 - 1
"""BullMQ's largest priority; deeper backlogs share it (FIFO among themselves)."""

GUESS_TTL_S = 1.0
"""A tenant's last count is a guess for its next one for this long (the worker's ledger
decrements counts within ~50 ms, so older counts are mostly stale)."""

_SEEN_MAX = 10_000

FAIR_TTL_MS = 24 * 3600 * 1000
"""The fairness hash expires after a day without enqueues (garbage collection only)."""

# KEYS[1] fairness hash, KEYS[2..n+1] BullMQ job hashes; ARGV[1] ttl ms, ARGV[2..n+1] tenants.
# Returns, per job, the tenant's new pending count, or 0 when the job id already exists.
_COUNT_SCRIPT = """
local out = {}
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    out[i - 1] = 0
  else
    out[i - 1] = redis.call('HINCRBY', KEYS[1], ARGV[i], 1)
  end
end
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return out
"""

# KEYS[1] fairness hash; ARGV: tenant, count, tenant, count, ... Undo or consume counts.
_DECREMENT_SCRIPT = """
for i = 1, #ARGV, 2 do
  local v = redis.call('HINCRBY', KEYS[1], ARGV[i], -tonumber(ARGV[i + 1]))
  if v <= 0 then redis.call('HDEL', KEYS[1], ARGV[i]) end
end
return 0
"""


def execution_queue_name(region: str) -> str:
    """``workflow.execute.<region>`` (same as :func:`conveyor.queue.execution_queue_name`)."""
    return f"workflow.execute.{region}"


def fair_key(queues: QueueFactory, queue_name: str) -> str:
    """The fairness hash of one execution queue."""
    return queues.key("fair", queue_name)


def priority_for(pending: int) -> int:
    """The BullMQ priority of a tenant's ``pending``-th job (1 = next)."""
    return max(1, min(pending, MAX_PRIORITY))


def now_ms() -> int:
    return int(time.time() * 1000)


class ExecutionDispatcher:
    """Enqueues ``workflow.execute.<region>`` jobs with fairness priorities.

    Cheap to build (no I/O); one per process is enough. Queues are created on first use.
    """

    def __init__(self, queues: QueueFactory, settings: Settings) -> None:
        self._queues = queues
        self._settings = settings
        self._by_name: dict[str, Queue] = {}
        self._count_script: Any = None
        self._seen: dict[tuple[str, str], tuple[int, float]] = {}
        """``(queue, tenant) -> (last count, when)``: where :meth:`_guess` starts from."""
        self._decrement_script: Any = None

    def _queue(self, region: str) -> Queue:
        name = execution_queue_name(region)
        queue = self._by_name.get(name)
        if queue is None:
            queue = self._by_name[name] = self._queues.create_queue(name)
        return queue

    def _job_key(self, queue_name: str, job_id: str) -> str:
        return f"{self._settings.queue_prefix}:{queue_name}:{job_id}"

    def _count_call(self, queue_name: str, items: Sequence[tuple[str, str]]) -> ScriptCall:
        """The count script's call for ``(tenant, job_id)`` items (see :data:`_COUNT_SCRIPT`)."""
        if self._count_script is None:
            self._count_script = self._queues.redis.register_script(_COUNT_SCRIPT)
        keys = [fair_key(self._queues, queue_name)]
        keys += [self._job_key(queue_name, job_id) for _tenant, job_id in items]
        args: list[Any] = [FAIR_TTL_MS, *(tenant for tenant, _job_id in items)]
        return ScriptCall(self._count_script, keys, args)

    async def _count(self, queue_name: str, items: Sequence[tuple[str, str]]) -> list[int]:
        """Count ``(tenant, job_id)`` items as pending; 0 for job ids that already exist."""
        call = self._count_call(queue_name, items)
        try:
            result = await call.script(keys=call.keys, args=call.args)
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(f"cannot enqueue on {queue_name}: {exc}") from exc
        return [int(n) for n in result]

    async def _uncount(self, queue_name: str, tenants: Sequence[str]) -> None:
        """Best-effort undo of :meth:`_count` after a failed add (the clamp bounds any miss)."""
        per: dict[str, int] = {}
        for tenant in tenants:
            per[tenant] = per.get(tenant, 0) + 1
        if self._decrement_script is None:
            self._decrement_script = self._queues.redis.register_script(_DECREMENT_SCRIPT)
        args: list[Any] = [x for tenant, n in per.items() for x in (tenant, n)]
        try:
            await self._decrement_script(keys=[fair_key(self._queues, queue_name)], args=args)
        except (RedisError, OSError):
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
        Raises :class:`~conveyor.errors.QueueUnavailable` fast when Redis is down.
        """
        job_id = job_id or payload.execution_id
        queue = self._queue(payload.region)
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
            await queue.change_priority(job_id, priority_for(pending))
        return job_id

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

    async def enqueue_many(self, payloads: Sequence[WorkflowExecute]) -> list[str]:
        """Put many executions on their queues (one script call and one bulk add per region).

        Returns the job ids (the execution ids) in input order, duplicates included.
        """
        by_region: dict[str, dict[str, WorkflowExecute]] = {}
        for payload in payloads:
            by_region.setdefault(payload.region, {}).setdefault(payload.execution_id, payload)
        for region, unique in by_region.items():
            queue = self._queue(region)
            items = list(unique.values())
            counts = await self._count(queue.name, [(p.tenant_id, p.execution_id) for p in items])
            fresh = [(p, n) for p, n in zip(items, counts, strict=True) if n > 0]
            if not fresh:
                continue
            batch: list[tuple[Any, dict[str, Any]]] = [
                (self._stamp(p), {"job_id": p.execution_id, "priority": priority_for(n)})
                for p, n in fresh
            ]
            try:
                await queue.add_bulk(batch)
            except BaseException:
                await self._uncount(queue.name, [p.tenant_id for p, _n in fresh])
                raise
        return [p.execution_id for p in payloads]
