"""The engine's hot path: claim an execution, persist a step, park on a timer.

:class:`RunStore` is the interface the engine uses (as ``store.runs``); the records here are
what crosses it. There are two implementations, chosen once when the :class:`~conveyor.store.Store`
opens:

* :class:`~conveyor.store.sql.SqlRunStore` — SQLAlchemy Core, one transaction per write
  (SQLite; any backend);
* :class:`~conveyor.store.pg.PgRunStore` — raw asyncpg prepared statements on Postgres,
  one round trip per claim and one per step (the step run insert, the execution update and a
  timer insert are one statement with data-modifying CTEs); claims and writes of concurrent
  runs made in the same loop turn share one statement and one commit (group commit), each
  row fenced by its own lease.

Fencing: :meth:`RunStore.claim` increments ``lease`` with a compare-and-set (only a queued
execution, a running one whose lease expired, or a waiting one whose wake time passed can be
claimed) and returns the new number; every later write says ``WHERE lease = :mine`` and raises
:class:`~conveyor.errors.LeaseLost` when no row matched. A write never overrides a
``cancelled`` status: it returns ``cancelled`` and the engine stops (step boundary).

Unleased runs: a run of pure steps only (``transform``, ``condition``, ``noop``: deterministic,
no side effects) needs no lease while it runs. :meth:`RunStore.peek` reads a queued execution
without writing; its first (and only) write claims it in the same statement, by compare-and-set
on what the peek read (still ``queued``, the same ``lease``), and increments the lease as a
claim does. A runner that lost that race (a claim or a cancel came in between) wrote nothing
and is told ``LeaseLost``; its steps are harmless to run again. One write per execution
instead of two (a claim's update costs the database ~35 µs of CPU and a commit).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

__all__ = [
    "Claim",
    "ExecutionWrite",
    "RunStore",
    "StepWrite",
    "TimerWrite",
    "Unclaimed",
    "unleased_claim",
]


@dataclass(slots=True)
class Claim:
    """An execution this runner holds, with what the engine needs to run it."""

    execution_id: str
    tenant_id: str
    workflow_id: str
    workflow_version: int
    region: str
    input: Any
    next_step: int
    steps_run: int
    lease: int
    attempts: int
    queued_at: datetime
    started_at: datetime
    step_attempt: int = 0
    """Tries of the step at the cursor already made (a run resuming from a retry wait)."""
    step_errors: list[Any] | None = None
    """Their errors, ``[{"attempt": n, ...}]``."""
    step_started_at: datetime | None = None
    """When the step's first try started."""
    parent_execution_id: str | None = None
    """The parent execution of a sub-workflow (told when this one ends)."""
    depth: int = 0
    """Nesting depth of sub-workflows (0 at the top)."""
    parent_seq: int | None = None
    """The parent's step run that started this one (its end is told to that step)."""
    branch: str | None = None
    """The step list a child of a ``parallel`` / ``foreach`` step runs."""
    first_run: bool = False
    """Set by the engine: this claim started the execution (``started_at`` is its instant) —
    also for one that starts with steps behind it (a retry from the failed step)."""
    unleased: bool = False
    """Read by :meth:`RunStore.peek`, not claimed: ``lease``, ``attempts`` and ``started_at``
    are what the claim would have set, and the first write sets them — only if the row is
    still queued under the lease read (``lease - 1``); else ``LeaseLost``."""


def unleased_claim(read: Claim, now: datetime) -> Claim:
    """A peeked execution's row (``read``) as the claim its first write makes of it: the next
    lease, one more attempt, started now unless it had started before."""
    read.lease += 1
    read.attempts += 1
    read.started_at = read.started_at or now
    read.unleased = True
    return read


@dataclass(frozen=True, slots=True)
class Unclaimed:
    """Why a claim did not succeed (``status`` is ``None`` when the execution is missing)."""

    status: str | None
    lease_expires_at: datetime | None = None
    wake_at: datetime | None = None


@dataclass(slots=True)
class StepWrite:
    """One finished step (its last attempt), as stored in ``step_runs``."""

    seq: int
    step_id: str
    step_type: str
    status: str
    attempts: int
    input: Any
    input_json: str | None
    output: Any
    output_json: str | None
    output_truncated: bool
    error: Any
    error_json: str | None
    started_at: datetime
    finished_at: datetime


@dataclass(slots=True)
class ExecutionWrite:
    """The execution's new state after a step (or without one)."""

    status: str
    next_step: int
    steps_run: int
    now: datetime
    lease_expires_at: datetime | None
    output: Any = None
    output_json: str | None = None
    error: Any = None
    error_json: str | None = None
    finished_at: datetime | None = None
    wake_at: datetime | None = None
    step_attempt: int = 0
    """Non-zero: the execution parks for the next try of the step at the cursor (a retry
    wait), after this many tries; ``step_errors`` / ``step_started_at`` go with it."""
    step_errors: Any = None
    step_errors_json: str | None = None
    step_started_at: datetime | None = None


@dataclass(slots=True)
class TimerWrite:
    """A durable timer that wakes the execution (written only if it is really parked).

    One row per ``(execution, seq)``: a retry wait of a step that already waited once reuses
    its row (new id, due time, ``pending`` again)."""

    id: str
    workflow_id: str
    region: str
    seq: int
    due_at: datetime


class RunStore(Protocol):
    def session(self) -> AbstractAsyncContextManager[RunStore]:
        """A view of this store for one run (may hold a connection between calls)."""
        ...

    async def idle(self) -> None:
        """Give back anything a session holds (before a step waits on I/O)."""
        ...

    async def claim(
        self, execution_id: str, now: datetime, lease_until: datetime
    ) -> Claim | None: ...

    async def peek(self, execution_id: str, now: datetime) -> Claim | None:
        """A queued execution read without claiming it (an unleased :class:`Claim`: its first
        write claims it); ``None`` when it is not queued (or missing): claim it instead."""
        ...

    async def unclaimed(self, execution_id: str) -> Unclaimed: ...

    async def completed_outputs(self, tenant_id: str, execution_id: str) -> dict[str, Any]: ...

    async def write(
        self,
        claim: Claim,
        execution: ExecutionWrite,
        steps: Sequence[StepWrite],
        timer: TimerWrite | None = None,
    ) -> str:
        """Persist atomically — the execution's new state, the step runs it records (none,
        one, or a run of pure steps with the durable step after them, in ``seq`` order) and
        the timer; return the execution's status afterwards (``cancelled`` if it was
        cancelled meanwhile). Raises LeaseLost if ``claim.lease`` is no longer current (an
        unleased claim: if the execution is no longer queued under the lease it read)."""
        ...

    async def renew(self, claim: Claim, lease_until: datetime) -> None: ...

    async def release(self, claim: Claim, now: datetime) -> None: ...

    async def written(self, claim: Claim, seq: int) -> str | None:
        """If the write of step ``seq`` (a write's last step) under ``claim``'s lease is in the database (an earlier
        :meth:`write` committed although its answer was lost), the execution's status now;
        else ``None``."""
        ...
