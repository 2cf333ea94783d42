"""Dispatch: how executions get onto the execution queues, fairly across tenants.

* :class:`ExecutionDispatcher` — the one way any process (API, scheduler, timer dispatcher,
  reconciler) enqueues an execution: one queue handle per region, fair priorities, concurrent
  enqueues batched (:class:`EnqueueBatcher`).
* :func:`payload_for` — the ``workflow.execute`` job of an execution or a fired timer.
* :class:`FairnessLedger` — the worker's half of fairness (counts consumed when a job starts,
  drift clamped).
* :mod:`conveyor.dispatch.limits` — tenant limits for the whole fleet (concurrency leases, start
  rate) in Redis: :class:`TenantLimiter`, :func:`effective_limits`.
* :mod:`conveyor.dispatch.keys` — every Redis key name and Lua script Conveyor writes.
"""

from conveyor.dispatch import keys, limits
from conveyor.dispatch._batching import EnqueueBatcher
from conveyor.dispatch._dispatcher import (
    GUESS_TTL_S,
    MAX_PRIORITY,
    ExecutionDispatcher,
    payload_for,
    priority_for,
)
from conveyor.dispatch._fairness import FairnessLedger
from conveyor.dispatch.limits import EffectiveLimits, TenantLimiter, Verdict, effective_limits
from conveyor.queue import execution_queue_name

__all__ = [
    "GUESS_TTL_S",
    "MAX_PRIORITY",
    "EffectiveLimits",
    "EnqueueBatcher",
    "ExecutionDispatcher",
    "FairnessLedger",
    "TenantLimiter",
    "Verdict",
    "effective_limits",
    "execution_queue_name",
    "keys",
    "limits",
    "payload_for",
    "priority_for",
]
