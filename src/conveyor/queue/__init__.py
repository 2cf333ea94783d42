"""Conveyor's queues: the one place that builds BullMQ queues, workers and event streams.

One :class:`QueueFactory` per process builds them all with the same connection settings
(socket timeouts, keepalive, bounded retries), key prefix, telemetry and job defaults::

    async with QueueFactory(settings) as qf:
        await qf.assert_queue_is_ready()
        queue = qf.create_queue(execution_queue_name("us"))
        await queue.add(WorkflowExecute(...))

Each queue name maps to a typed payload (:mod:`~conveyor.queue.payloads`): what is enqueued is
validated, what a worker receives is the typed object, and a job whose data does not validate
fails without retry. Drivers: :mod:`conveyor.queue.bullmq` (Redis, the default; plain BullMQ
queues that Node.js producers and BullMQ dashboards share) and :mod:`conveyor.queue.inmemory`
(``QUEUE_DRIVER=inmemory``, for isolated unit tests only; not durable, never ready).
"""

from __future__ import annotations

from conveyor.queue._base import (
    JOB_COUNT_STATES,
    TELEMETRY_EVENTS,
    AddOptions,
    Detach,
    EventHandler,
    JobContext,
    JobDeferred,
    MetricsHandler,
    Processor,
    Queue,
    QueueEvent,
    QueueEvents,
    ScriptCall,
    Worker,
)
from conveyor.queue._factory import QueueFactory
from conveyor.queue.connection import bull_name, is_missing_script
from conveyor.queue.payloads import (
    EXECUTION_QUEUE,
    Payload,
    PayloadSpec,
    WorkflowExecute,
    execution_queue_name,
    payload_spec,
    register_payload,
    unregister_payload,
)
from conveyor.queue.telemetry import register_queue_telemetry

__all__ = [
    "EXECUTION_QUEUE",
    "JOB_COUNT_STATES",
    "TELEMETRY_EVENTS",
    "AddOptions",
    "Detach",
    "EventHandler",
    "JobContext",
    "JobDeferred",
    "MetricsHandler",
    "Payload",
    "PayloadSpec",
    "Processor",
    "Queue",
    "QueueEvent",
    "QueueEvents",
    "QueueFactory",
    "ScriptCall",
    "Worker",
    "WorkflowExecute",
    "bull_name",
    "execution_queue_name",
    "is_missing_script",
    "payload_spec",
    "register_payload",
    "register_queue_telemetry",
    "unregister_payload",
]
