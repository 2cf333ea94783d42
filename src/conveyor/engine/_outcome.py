"""What one :meth:`Engine.run` call did."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

__all__ = ["OutcomeKind", "RunOutcome"]


class OutcomeKind(StrEnum):
    SUCCEEDED = "succeeded"
    """This run finished the execution successfully."""
    FAILED = "failed"
    """A step failed for good (retries exhausted or a permanent error): execution failed."""
    CANCELLED = "cancelled"
    """The execution was cancelled; this run stopped at a step boundary."""
    WAITING = "waiting"
    """A ``delay`` step parked the execution on a timer (``wake_at``); no slot is held."""
    BUSY = "busy"
    """Another runner holds a live lease; worth trying again after ``retry_after_s``."""
    NOT_DUE = "not_due"
    """The execution waits on a timer that is not due yet (``wake_at``)."""
    SKIPPED = "skipped"
    """The execution had already finished (a duplicate delivery): nothing to do."""
    MISSING = "missing"
    """No such execution."""
    LEASE_LOST = "lease_lost"
    """Another runner took the execution over mid-run; this run's writes were fenced off."""
    ABANDONED = "abandoned"
    """The caller asked to stop (``abandon`` event): the step in progress was cancelled,
    nothing of it was written, and the lease was released for the next runner."""


@dataclass(frozen=True, slots=True)
class RunOutcome:
    execution_id: str
    kind: OutcomeKind
    status: str | None
    """The execution's status as this run last saw it (``None`` if missing)."""
    steps_run: int = 0
    """Steps this run executed and recorded."""
    retry_after_s: float | None = None
    """For BUSY / NOT_DUE: when another attempt makes sense."""
    wake_at: datetime | None = None
    """For WAITING / NOT_DUE: when the timer is due."""
    timer_id: str | None = None
    """For WAITING: the timer that resumes the execution."""
    tenant_id: str | None = None
    queue_latency_ms: float | None = None
    """Queued → first start, on the run that started the execution."""
    parent_untold: bool = False
    """A sub-workflow that ended (in this run, or before: SKIPPED) could not tell its parent
    (the database failed): deliver the job again later, which tells it."""

    @property
    def finished(self) -> bool:
        """The execution reached a terminal status in this run."""
        return self.kind in (OutcomeKind.SUCCEEDED, OutcomeKind.FAILED, OutcomeKind.CANCELLED)

    @property
    def retry_later(self) -> bool:
        """The job should be delivered again later (another runner may have died, or a
        parent is still to be told)."""
        return self.kind is OutcomeKind.BUSY or self.parent_untold
