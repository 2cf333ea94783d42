"""Dispatch: how executions get onto the execution queues, fairly across tenants.

* :class:`ExecutionDispatcher` — the one way any process (API, scheduler, timer dispatcher,
  reconciler) enqueues an execution: one queue handle per region, fair priorities, concurrent
  enqueues batched (:class:`EnqueueBatcher`).
* :func:`payload_for` — the ``workflow.execute`` job of an execution or a fired timer.
* :class:`FairnessLedger` — the worker's half of fairness (counts consumed when a job starts,
  drift clamped).
* :mod:`conveyor.dispatch.keys` — every Redis key name and Lua script Conveyor writes.
"""

from conveyor.dispatch import keys
from conveyor.dispatch._batching import EnqueueBatcher
from conveyor.dispatch._dispatcher import (
    GUESS_TTL_S,
    MAX_PRIORITY,
    ExecutionDispatcher,
    payload_for,
    priority_for,
)
from conveyor.dispatch._fairness import FairnessLedger
from conveyor.queue import execution_queue_name

__all__ = [
    "GUESS_TTL_S",
    "MAX_PRIORITY",
    "EnqueueBatcher",
    "ExecutionDispatcher",
    "FairnessLedger",
    "execution_queue_name",
    "keys",
    "payload_for",
    "priority_for",
]
