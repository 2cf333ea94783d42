"""The queue interface every driver implements, and the types a processor sees.

Drivers (``bullmq`` on Redis, ``inmemory`` for isolated unit tests) implement the three
Protocols below; code outside :mod:`conveyor.queue` only ever sees these names.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypedDict

from pydantic import BaseModel

from conveyor.settings import Settings

JOB_COUNT_STATES: tuple[str, ...] = (
    "waiting",
    "active",
    "delayed",
    "prioritized",
    "completed",
    "failed",
    "paused",
)
"""The states :meth:`Queue.get_job_counts` reports when called without arguments."""

TELEMETRY_EVENTS: tuple[str, ...] = ("completed", "failed", "stalled", "waiting", "error")
"""The events :func:`register_queue_telemetry` wires (BullMQ's names for them)."""


@dataclass(frozen=True, slots=True)
class QueueEvent:
    """One queue event, as delivered to handlers registered with ``on()``."""

    name: str
    """``completed``, ``failed``, ``stalled``, ``waiting``, ``error``, ``active``, ``delayed``, ..."""
    queue: str
    """The queue's name, e.g. ``workflow.execute.us``."""
    job_id: str | None = None
    """The job the event is about (``None`` for ``error`` and ``drained``)."""
    data: Mapping[str, Any] = field(default_factory=dict)
    """The event's fields as BullMQ publishes them: ``returnvalue``, ``failedReason``, ``prev``..."""
    error: BaseException | None = None
    """For ``error`` events: what went wrong."""


EventHandler = Callable[[QueueEvent], object]
"""A listener. It may return an awaitable, which is then run as a tracked task."""

MetricsHandler = Callable[[dict[str, int]], object]
"""Receives the job counts every ``QUEUE_METRICS_INTERVAL_MS``; may return an awaitable."""

Detach = Callable[[], None]
"""Removes every listener and timer a telemetry registration added."""


class JobDeferred(Exception):
    """Raised by a processor to put its job back to ``delayed`` for ``delay_ms``.

    The job is neither completed nor failed and no attempt is used up. With a ``reason``, the
    job's data says why, for whoever reads it in a BullMQ dashboard: ``parked: <reason>``
    (``parked=True``: held back by a limit until a slot frees) or ``deferred: <reason>``.
    """

    def __init__(self, delay_ms: int, reason: str | None = None, *, parked: bool = False) -> None:
        if delay_ms < 0:
            raise ValueError("delay_ms must be >= 0")
        self.delay_ms = int(delay_ms)
        self.reason = reason
        self.parked = parked
        super().__init__(reason or f"deferred by {self.delay_ms} ms")

    @property
    def note(self) -> dict[str, str]:
        """What the job's data gains (empty without a reason)."""
        if not self.reason:
            return {}
        return {"parked" if self.parked else "deferred": self.reason}


def parked_before(data: Any) -> bool:
    """The job's data says a limit parked it before (the note of a parked ``JobDeferred``)."""
    return isinstance(data, dict) and "parked" in data


class JobContext:
    """What a processor knows about the job it runs (besides the typed payload)."""

    __slots__ = (
        "_renewed_at",
        "attempts_made",
        "id",
        "lock_lost",
        "name",
        "parked",
        "queue_name",
        "timestamp_ms",
    )

    def __init__(
        self,
        id: str,
        name: str,
        queue_name: str,
        attempts_made: int,
        timestamp_ms: int,
        *,
        parked: bool = False,
    ) -> None:
        self.id = id
        """The job id (for an execution: the execution id)."""
        self.name = name
        """The BullMQ job name (informational; routing is by queue)."""
        self.queue_name = queue_name
        """The queue the job came from, e.g. ``workflow.execute.us``."""
        self.attempts_made = attempts_made
        """Failed attempts before this one (0 on the first run; deferrals do not count)."""
        self.timestamp_ms = timestamp_ms
        """When the job was created, ms since the epoch."""
        self.parked = parked
        """The job was parked by a limit before (its data says ``parked: …``)."""
        self.lock_lost = asyncio.Event()
        """Set when the worker could not renew this job's lock: another worker may run it now."""
        self._renewed_at = time.monotonic()

    def __repr__(self) -> str:
        return f"JobContext(id={self.id!r}, queue={self.queue_name!r}, attempts_made={self.attempts_made})"


Processor = Callable[[Any, JobContext], Awaitable[Any]]
"""``async def process(payload: <the queue's model>, ctx: JobContext) -> JSON-able result``."""


class AddOptions(TypedDict, total=False):
    """Per-job options accepted by :meth:`Queue.add` and :meth:`Queue.add_bulk`."""

    job_id: str | None
    """Deterministic job id; adding an id that exists is a harmless no-op."""
    priority: int
    """0 (default, served first) or 1 (highest) .. 2_097_152 (lowest)."""
    delay_ms: int
    """Run no earlier than this many milliseconds from now."""


@dataclass(frozen=True)
class ScriptCall:
    """A Lua script to run just before an add, as data: its source, keys and arguments. The
    driver runs it on its own connection, in the add's transaction (:meth:`Queue.add_after`)."""

    source: str
    keys: Sequence[str]
    args: Sequence[Any]


class Queue(Protocol):
    """A producer handle on one queue."""

    @property
    def name(self) -> str: ...

    @property
    def settings(self) -> Settings: ...

    async def add(
        self,
        payload: BaseModel | Mapping[str, Any],
        *,
        job_id: str | None = None,
        priority: int = 0,
        delay_ms: int = 0,
    ) -> str:
        """Validate ``payload`` against the queue's model and enqueue it; return the job id."""
        ...

    async def add_bulk(
        self, items: Sequence[tuple[BaseModel | Mapping[str, Any], Mapping[str, Any]]]
    ) -> list[str]:
        """Add many jobs in one round trip; each item is ``(payload, AddOptions-like dict)``."""
        ...

    async def add_after(
        self,
        call: ScriptCall,
        payload: BaseModel | Mapping[str, Any],
        *,
        job_id: str,
        priority: int = 0,
    ) -> tuple[Any, str]:
        """Run ``call`` and then add the job, atomically and in one round trip (one
        ``MULTI``/``EXEC``). Returns the script's result and the job id."""
        ...

    async def change_priority(self, job_id: str, priority: int) -> None:
        """Re-rank a job that is still waiting; no-op for a job already started or gone."""
        ...

    async def get_job_counts(self, *states: str) -> dict[str, int]: ...

    async def get_job_state(self, job_id: str) -> str | None: ...

    async def promote(self, job_id: str) -> bool: ...

    async def remove(self, job_id: str) -> bool: ...

    async def is_paused(self) -> bool:
        """Whether the queue is paused (BullMQ's ``paused`` flag in the queue's meta hash, which
        any BullMQ client or dashboard may set): workers take no new jobs from it."""
        ...

    async def pause(self) -> None:
        """Pause the queue for every worker (jobs in progress finish; waiting jobs stay)."""
        ...

    async def resume(self) -> None:
        """Undo :meth:`pause`: workers take jobs again."""
        ...

    async def close(self) -> None: ...

    def on(self, event: str, handler: EventHandler) -> None:
        """Local events of this handle: ``waiting`` for each job added through it."""
        ...

    def off(self, event: str, handler: EventHandler) -> None: ...


class Worker(Protocol):
    """A consumer of one queue. ``run()`` until ``close()``; ``run()`` raises if the loop dies."""

    @property
    def name(self) -> str: ...

    @property
    def active_count(self) -> int: ...

    async def run(self) -> None: ...

    async def close(self, timeout_s: float | None = None) -> None: ...

    def on(self, event: str, handler: EventHandler) -> None: ...

    def off(self, event: str, handler: EventHandler) -> None: ...


class QueueEvents(Protocol):
    """The global event stream of one queue (every producer's and worker's events)."""

    @property
    def name(self) -> str: ...

    def start(self) -> None:
        """Start consuming in a background task owned by this object (idempotent)."""
        ...

    async def run(self) -> None:
        """Consume until ``close()``; reconnects by itself after Redis errors."""
        ...

    async def close(self) -> None: ...

    def on(self, event: str, handler: EventHandler) -> None: ...

    def off(self, event: str, handler: EventHandler) -> None: ...
