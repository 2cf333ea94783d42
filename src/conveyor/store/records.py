"""What the services return: small immutable dataclasses (no ORM objects, no lazy loading).

Timestamps are timezone-aware UTC. JSON columns come back as plain Python values.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, Generic, Self, TypeVar

__all__ = [
    "EXECUTION_COLUMNS",
    "STEP_RUN_COLUMNS",
    "TICK_OUTCOMES",
    "ApiKey",
    "Execution",
    "FiredTick",
    "IssuedApiKey",
    "Page",
    "Schedule",
    "ScheduleTick",
    "StepRun",
    "Tenant",
    "Timer",
    "Workflow",
    "WorkflowVersion",
]

T = TypeVar("T")


class _Record:
    __slots__ = ()

    @classmethod
    def from_mapping(cls, row: Mapping[Any, Any], **extra: Any) -> Self:
        names = _field_names(cls)
        values = {name: row[name] for name in names if name in row}
        values.update(extra)
        return cls(**values)


_FIELDS: dict[type, tuple[str, ...]] = {}


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELDS.get(cls)
    if names is None:
        names = _FIELDS[cls] = tuple(f.name for f in fields(cls))
    return names


@dataclass(frozen=True, slots=True)
class Tenant(_Record):
    id: str
    name: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class ApiKey(_Record):
    """An API key's public part; the secret is never stored, only its SHA-256."""

    id: str
    tenant_id: str
    name: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


@dataclass(frozen=True, slots=True)
class IssuedApiKey:
    """A newly issued key: ``token`` is shown once and cannot be recovered later."""

    key: ApiKey
    token: str


@dataclass(frozen=True, slots=True)
class Workflow(_Record):
    id: str
    tenant_id: str
    name: str
    region: str
    current_version: int
    enabled: bool
    created_at: datetime
    updated_at: datetime
    deleted_at: datetime | None
    definition: dict[str, Any] | None = None
    """The current version's definition document (``None`` in lists)."""
    has_webhook_secret: bool = False
    webhook_secret: str | None = None
    """Set only in the answer of ``create`` / ``rotate_webhook_secret``: shown once."""


@dataclass(frozen=True, slots=True)
class WorkflowVersion(_Record):
    workflow_id: str
    tenant_id: str
    version: int
    definition: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True, slots=True)
class StepRun(_Record):
    """One executed step: its final attempt's input/output/error and the number of attempts."""

    execution_id: str
    seq: int
    step_id: str
    step_type: str
    status: str
    attempts: int
    input: Any
    output: Any
    output_truncated: bool
    error: Any
    started_at: datetime
    finished_at: datetime
    reused_from: str | None = None
    """The execution whose step run (same ``seq``) this one is a copy of, not run again (a
    retry from the failed step); ``None`` for a step that ran."""

    @property
    def duration_ms(self) -> float:
        return (self.finished_at - self.started_at).total_seconds() * 1000.0


@dataclass(frozen=True, slots=True)
class Execution(_Record):
    id: str
    tenant_id: str
    workflow_id: str
    workflow_version: int
    status: str
    region: str
    triggered_by: str
    input: Any
    output: Any
    error: Any
    next_step: int
    """Index of the next step to run (steps before it are done)."""
    steps_run: int
    attempts: int
    """Deliveries that ran work: claims of a queued or abandoned execution (more than 1 after
    a crash or lost lock); resuming after a delay step is not one."""
    lease: int
    lease_expires_at: datetime | None
    wake_at: datetime | None
    idempotency_key: str | None
    schedule_id: str | None
    retry_of: str | None
    created_at: datetime
    queued_at: datetime
    enqueued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime
    scheduled_for: datetime | None = None
    """The tick instant (UTC) a schedule's execution fires for; ``None`` unless scheduled."""
    step_attempt: int = 0
    """Tries of the step at the cursor already made: non-zero while the execution waits
    (``waiting``) for that step's next try (a durable retry backoff)."""
    step_errors: Any = None
    """Those tries' errors (``[{"attempt": n, ...}]``) while it waits for the next try."""
    parent_execution_id: str | None = None
    """The execution whose ``workflow`` step created this one (a sub-workflow)."""
    parent_seq: int | None = None
    """That step run's seq in the parent."""
    depth: int = 0
    """Nesting depth: 0 at the top, the parent's + 1 for a sub-workflow."""
    branch: str | None = None
    """The step list a ``parallel`` branch or ``foreach`` item runs (``None``: the workflow)."""
    parent_index: int | None = None
    """A branch's or item's index in its parent's ``parallel`` / ``foreach`` step."""
    steps: tuple[StepRun, ...] = ()
    """Filled by ``ExecutionService.get(..., with_steps=True)``."""

    @property
    def terminal(self) -> bool:
        return self.status in ("succeeded", "failed", "cancelled")

    def job_payload(
        self, *, reason: str | None = None, enqueued_at_ms: int | None = None
    ) -> dict[str, Any]:
        """The ``workflow.execute.<region>`` job payload (camelCase JSON) for this execution."""
        return {
            "executionId": self.id,
            "tenantId": self.tenant_id,
            "workflowId": self.workflow_id,
            "region": self.region,
            "workflowVersion": self.workflow_version,
            "enqueuedAt": enqueued_at_ms,
            "reason": reason,
        }


EXECUTION_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(Execution) if f.name != "steps")
"""The ``executions`` columns of an :class:`Execution`, in field order: a row selected with
these columns in this order is ``Execution(*row)`` (no per-column lookups by name)."""
STEP_RUN_COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(StepRun))
"""The ``step_runs`` columns of a :class:`StepRun`, in field order (``StepRun(*row)``)."""


@dataclass(frozen=True, slots=True)
class Page(Generic[T]):
    """One page of a list, newest first; pass ``next_cursor`` back for the next page."""

    items: list[T]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class Schedule(_Record):
    id: str
    tenant_id: str
    workflow_id: str
    name: str | None
    cron: str
    timezone: str
    enabled: bool
    input: Any
    misfire_policy: str | None
    """``fire_once`` / ``skip``; ``None`` = the scheduler's default (SCHEDULER_MISFIRE_POLICY)."""
    next_fire_at: datetime | None
    last_fired_at: datetime | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Timer(_Record):
    id: str
    tenant_id: str
    execution_id: str
    workflow_id: str
    region: str
    seq: int
    due_at: datetime
    status: str
    """``pending``, ``fired`` or ``cancelled``."""
    claimed_by: str | None
    claimed_until: datetime | None
    fired_at: datetime | None
    created_at: datetime

    @property
    def job_id(self) -> str:
        """The deterministic queue job id of this timer's firing."""
        return f"timer:{self.id}"

    def job_payload(self, *, enqueued_at_ms: int | None = None) -> dict[str, Any]:
        return {
            "executionId": self.execution_id,
            "tenantId": self.tenant_id,
            "workflowId": self.workflow_id,
            "region": self.region,
            "workflowVersion": None,
            "enqueuedAt": enqueued_at_ms,
            "reason": "timer",
        }


@dataclass(frozen=True, slots=True)
class FiredTick:
    """A schedule tick recorded (exactly once) together with the execution it created."""

    schedule_id: str
    fire_time: datetime
    execution: Execution | None
    """``None`` when the workflow is disabled or deleted (the tick is still recorded)."""


TICK_OUTCOMES = ("fired", "collapsed", "skipped", "cancelled", "disabled")
"""What became of a recorded tick: ``fired`` (its execution was created), ``collapsed`` (missed;
folded into a later tick by ``fire_once``), ``skipped`` (missed; policy ``skip``), ``cancelled``
(materialised ahead, then the schedule was edited, disabled or deleted before its instant),
``disabled`` (the workflow was disabled or deleted: no execution)."""


@dataclass(frozen=True, slots=True)
class ScheduleTick:
    """One recorded tick of a schedule, as the API lists it."""

    fire_time: datetime
    outcome: str
    """One of :data:`TICK_OUTCOMES`."""
    execution_id: str | None
    created_at: datetime
    """When the tick was recorded (materialised): up to the look-ahead before ``fire_time``."""
