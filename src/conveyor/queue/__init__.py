"""Conveyor's queue module (the seed's ``server/queue/index.ts``).

Prefer one :class:`QueueFactory` per process::

    async with QueueFactory(settings) as qf:
        await qf.assert_queue_is_ready()
        queue = qf.create_queue(execution_queue_name("us"))
        await queue.add(WorkflowExecute(...))

The module-level functions with the seed's names (``create_queue``, ``create_worker``,
``create_queue_events``, ``assert_queue_is_ready``, ``health_probe``) use one default factory per
settings object; ``await close_default_factories()`` closes them at shutdown.
"""

from __future__ import annotations

from typing import Any

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
from conveyor.settings import Settings

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
    "assert_queue_is_ready",
    "close_default_factories",
    "create_queue",
    "create_queue_events",
    "create_worker",
    "default_factory",
    "execution_queue_name",
    "health_probe",
    "payload_spec",
    "register_payload",
    "register_queue_telemetry",
    "unregister_payload",
]

_defaults: dict[int, tuple[Settings, QueueFactory]] = {}


def default_factory(settings: Settings) -> QueueFactory:
    """The process's shared factory for ``settings`` (created on first use, no I/O)."""
    entry = _defaults.get(id(settings))
    if entry is None or entry[0] is not settings:
        entry = _defaults[id(settings)] = (settings, QueueFactory(settings))
    return entry[1]


async def close_default_factories() -> None:
    """Close every factory the module-level functions created."""
    entries = list(_defaults.values())
    _defaults.clear()
    for _, factory in entries:
        await factory.aclose()


def create_queue(name: str, *, settings: Settings) -> Queue:
    return default_factory(settings).create_queue(name)


def create_worker(name: str, processor: Processor, *, settings: Settings, **options: Any) -> Worker:
    return default_factory(settings).create_worker(name, processor, **options)


def create_queue_events(name: str, *, settings: Settings) -> QueueEvents:
    return default_factory(settings).create_queue_events(name)


async def assert_queue_is_ready(*, settings: Settings) -> None:
    async with QueueFactory(settings) as factory:
        await factory.assert_queue_is_ready()


async def health_probe(*, settings: Settings, timeout_s: float = 2.0) -> dict[str, Any]:
    async with QueueFactory(settings) as factory:
        return await factory.health(timeout_s)
