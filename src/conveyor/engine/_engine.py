"""The engine: run one execution step by step, durably.

``await engine.run(execution_id)``:

1. **Claim** (one statement): compare-and-set the execution's ``lease`` (+1) if it is queued,
   running with an expired lease (its runner died), or waiting with its wake time passed.
   Otherwise answer BUSY / NOT_DUE / SKIPPED / MISSING without touching it.
   **Unleased** (``run(..., workflow=...)`` of a workflow whose last plan here was all pure
   steps, each tried once): no claim — a read of the queued execution, the steps, and ONE
   write that claims and finishes it together (fenced by what it read: still queued, same
   lease). A claim or a cancel in between fences it out, having written nothing; the run
   then claims as above (and finds it running elsewhere, or ended: a cancel wins, no step
   runs recorded). A crash leaves it queued. See :meth:`Engine._run_unleased`.
2. Load the workflow version (cached in process: versions are immutable) and, when resuming,
   the outputs of the steps already done. Completed steps are never run again.
3. For each step from the cursor: run it (retry policy, timeout, lease renewal while a slow
   step runs), then persist the step run and the execution's new cursor/status in ONE
   transaction fenced by ``WHERE lease = :mine`` — committed before the next step starts.
   Except for **pure** steps (``transform``, ``condition``, ``noop``, not the last, not
   failed): deterministic and without side effects, they are harmless to run again after a
   crash, so their step runs are kept in memory and written, in order, in the transaction of
   the next durable step (an ``http`` step's, a ``delay``'s, the end's). A
   stale runner's write matches no row: :class:`~conveyor.errors.LeaseLost`, it stops. An
   output (after the step's ``select``) above ``STEP_OUTPUT_MAX_BYTES``, or not JSON, fails
   the step for good (``output_too_large`` / ``output_not_json``): nothing is truncated.
   The step run's ``input`` is what its last try did, as the runner rendered it
   (``StepResult.rendered_input``, or what it had rendered when it failed or timed out: an
   ``http`` step's request with credentials redacted, a condition's branch, a delay's wake
   time; a ``noop``'s definition). Diagnostic data: above the same limit it is cut, with a
   ``[truncated]`` marker, and never fails the step.
4. A ``delay`` step writes a timer row and parks the execution (``waiting``) in the same
   transaction, and the run returns: no worker slot is held while waiting. When the timer
   fires, the next run continues after the delay step.
4b. A ``wait`` step receives the oldest matching event at once when one is there (sent before
   the execution got here: no lost signal); else it parks the execution (``waiting``, the cursor
   stays on the step, ``wake_at`` = its deadline, a timer for the timeout) with an
   ``event_waits`` row, in one fenced transaction that looks for the event once more. An
   arriving event makes it due; the next run enters the step again and receives the event —
   its consumption is in the step's fenced write, exactly once — or, past the deadline, takes
   ``on_timeout`` (see :mod:`conveyor.store.events`).
4c. A ``workflow`` step creates its child execution (another workflow of the tenant, pinned
   version or latest; ``triggered_by = 'workflow'``) exactly once — its idempotency key is
   derived from the parent's id and the step's seq, so a run after a crash finds the same
   child — then, like a ``wait`` step, parks the execution on the event
   ``conveyor.workflow.<seq>`` (one fenced write that looks for the event once more). When
   the child ends, the engine that ended it (or any later delivery of its job, or a cancel)
   sends that event to the parent, which wakes it; the parent reads the child's status and
   output itself (see :mod:`conveyor.store.children`). Nesting is bounded by
   ``WORKFLOW_MAX_DEPTH``; cancelling a parent cancels its children.
4d. A ``parallel`` or ``foreach`` step runs its branches / items as child executions of the
   same workflow version through the queue (``branch`` names the step list each runs; they
   spread over workers and count against the tenant's limits). Each is created exactly once
   (its idempotency key is derived from the parent's id, the step's seq and its index), a
   foreach keeping at most ``concurrency`` of them unfinished. The parent parks like a
   ``workflow`` step on ``conveyor.workflow.<seq>``; every child's end sends that event and
   wakes it. Woken, it reads the events there, then the children's summary (one statement),
   starts the next items, and parks again consuming exactly the events it read — in the same
   fenced transaction that looks for any other (a child that ended after the read): none is
   lost, and the join (the step's result: the outputs in index order, the first branch of
   ``mode: any``, or the first failure, which cancels the rest) is one fenced write. A run
   that takes over from one that died (``attempts`` > 1) first enqueues the step's children
   still ``queued`` — the dead run may have created them without enqueueing them (a
   ``workflow`` step's child likewise); a job still there is not added twice.
5. A step that fails retryably (its ``retry`` policy: which errors, how many tries, what
   backoff) is tried again. When the wait before the next try is at least
   :data:`~conveyor.workflows.step_models.DURABLE_RETRY_MIN_S` (1 s), it is durable, like a
   ``delay``: one fenced write records the tries made (``executions.step_attempt``), their
   errors (``step_errors``) and when the first started, writes the pending pure steps' runs
   and a timer row, parks the execution ``waiting`` — and the run returns, holding no worker
   slot. When the timer fires, the next run restores that state and makes the next try of
   the same step; its step run, once it succeeds or fails for good, lists every attempt.
   Shorter waits sleep in the worker.
6. A cancelled execution stops at the next durable write (which sees ``cancelled``); one
   waiting for a timer (a delay, a retry, a wait's timeout) is not resumed.
7. When the execution succeeds, its output is the workflow's ``output`` expression's value
   over the evaluation context (``input``, every completed step's output, ``execution``) —
   written with the last step, in the same transaction — or, without one, the last step's
   output. An expression that fails at run time (or a value above ``STEP_OUTPUT_MAX_BYTES``)
   fails the execution: its last step run stays ``succeeded``, the execution's error is
   ``{"type": "ExpressionError", "code": "output_expression_failed", ...}``.
8. An execution created by a retry from the failed step starts with its cursor at that step
   and the step runs before it copied from the original: step 2 restores their outputs, and
   they are not run again.

Statuses: ``queued → running → (waiting ↔ running) → succeeded | failed | cancelled`` (an
unleased run goes from ``queued`` to its end in one commit).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, TypeVar, cast

from conveyor import tracing
from conveyor.engine._outcome import OutcomeKind, RunOutcome
from conveyor.engine._plan import (
    NO_OUTPUT,
    Encoded,
    OutputRejected,
    Plan,
    PlanCache,
    describe_error,
    encode_execution_output,
    encode_input,
    encode_output,
)
from conveyor.errors import (
    Conflict,
    ConveyorError,
    DatabaseUnavailable,
    InputInvalid,
    LeaseLost,
    NotFound,
    PermanentStepError,
    RetryableStepError,
    SecretsUnavailable,
    WorkflowInvalid,
)
from conveyor.settings import Settings
from conveyor.store import (
    Claim,
    EventWait,
    Execution,
    ExecutionWrite,
    RunStore,
    StepWrite,
    Store,
    TimerWrite,
    dumps,
    new_id,
    utcnow,
)
from conveyor.store.children import Fanout, child_event
from conveyor.workflows import (
    ExpressionError,
    ForeachStep,
    ParallelStep,
    RenderedInput,
    SafeHttpClient,
    SecretResolver,
    StepContext,
    StepResult,
    WaitStep,
    WorkflowStep,
    run_pure_step,
    run_step,
)
from conveyor.workflows.definition import RetryPolicy
from conveyor.workflows.expressions import build_context, evaluate, render_template
from conveyor.workflows.step_models import DURABLE_RETRY_MIN_S
from conveyor.workflows.steps import AnyStep, PureStep

log = logging.getLogger(__name__)

__all__ = ["Engine", "StepRunner"]

StepRunner = Callable[[AnyStep, StepContext], Awaitable[StepResult]]
Enqueue = Callable[[Execution, str, str], Awaitable[None]]
"""Put an execution's job on its queue: ``(execution, reason, job id)``."""
T = TypeVar("T")

_NO_RETRY = RetryPolicy()
_RELEASE_TIMEOUT_S = 2.0


class _Abandoned(Exception):
    """The caller's abandon event was set while a step ran."""


class _EventTaken(Exception):
    """Another execution consumed the event a wait step was receiving: look again."""


Persist = Callable[[ExecutionWrite, Sequence[StepWrite]], Awaitable[str]]


@dataclass(slots=True)
class _StepDone:
    """A step's final attempt: a result, or the error that ended it."""

    attempts: int
    started_at: datetime
    finished_at: datetime
    result: StepResult | None = None
    output: Encoded = NO_OUTPUT
    """The result's output as stored (checked against the limit)."""
    error: dict[str, Any] | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    input: Encoded | None = None
    """What the last try did, as stored (cut to the limit); ``None``: the step's definition."""
    retry_at: datetime | None = None
    """Set when the step is not done: its next try waits durably until then."""


@dataclass(frozen=True, slots=True)
class _Tried:
    """One try's outcome: a result, or an error with what kind it was."""

    result: StepResult | None
    error: dict[str, Any] | None = None
    retryable: bool = False
    kind: str | None = None
    """:attr:`conveyor.errors.StepError.kind` (``timeout`` for the step's own timeout)."""
    status: int | None = None
    """The HTTP status of a ``status`` error."""


@dataclass(frozen=True, slots=True)
class _FirstTry:
    """A step's first try, made before :meth:`Engine._attempts` (a pure step's fast path)."""

    tried: _Tried
    rendered: RenderedInput
    """What it had rendered."""
    started: datetime


@dataclass(slots=True)
class _Progress:
    index: int
    seq: int
    ran: int = 0


@dataclass(slots=True)
class _Run:
    """State of one run of one execution."""

    runs: RunStore
    claim: Claim
    plan: Plan
    outputs: dict[str, Any]
    abandon: asyncio.Event | None
    index: int
    seq: int
    ran: int = 0
    last_output: Encoded | None = None
    pending: list[StepWrite] = field(default_factory=list)
    """Pure steps run since the last durable write, recorded with the next one."""
    observed: list[tuple[str, str, float]] = field(default_factory=list)
    """Steps done since the last durable write, for :attr:`Engine.on_step` once it landed (a
    run fenced out or abandoned before it wrote them is not counted: they run again)."""
    resume: tuple[int, list[dict[str, Any]], datetime] | None = None
    """Resuming from a retry wait: the step at the cursor's tries made, their errors, when the
    first started (taken by the first :meth:`Engine._attempts` of this run)."""


class Engine:
    """Runs executions. One per process; ``async with`` opens the shared HTTP client.

    ``step_runner`` replaces :func:`conveyor.workflows.run_step` (tests); ``lease_ttl_s`` is
    how long a claim lasts without renewal (a slow step renews it every third of that; keep it
    at or below the queue's job lock duration); ``clock`` returns aware UTC datetimes.
    """

    on_step: Callable[[str, str, float], None] | None = None
    """Called for each step's last attempt with ``(type, "succeeded"|"failed", seconds)``
    once the write that records it landed (metrics: a run fenced out or abandoned before its
    write counts nothing — its steps run again); must be cheap and must not raise."""
    enqueue: Enqueue | None = None
    """Puts a sub-workflow's child, or a parent its child woke, on the queue at once (the
    worker's dispatcher). Best effort: without it (or when it fails) the reconciler enqueues
    them within its interval."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        step_runner: StepRunner | None = None,
        lease_ttl_s: float = 30.0,
        default_step_timeout_s: float = 300.0,
        clock: Callable[[], datetime] = utcnow,
        http: SafeHttpClient | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.lease_ttl = timedelta(seconds=lease_ttl_s)
        self.renew_every_s = lease_ttl_s / 3.0
        self.default_step_timeout_s = default_step_timeout_s
        self._runner: StepRunner = step_runner or run_step
        self._clock = clock
        self._http = http
        self._owned_http: SafeHttpClient | None = None
        self._plans = PlanCache(settings.workflow_cache_size)
        self._max_output = settings.step_output_max_bytes
        self._unleased: set[tuple[str, str]] = set()
        """(tenant, workflow) whose last plan run here was unleased (``Plan.unleased``): its
        next executions are peeked, not claimed (:meth:`_run_unleased`)."""

    async def __aenter__(self) -> Engine:
        if self._http is None:
            self._owned_http = SafeHttpClient(self.settings)
            self._http = await self._owned_http.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        owned, self._owned_http = self._owned_http, None
        if owned is not None:
            self._http = None
            await owned.__aexit__(exc_type, exc, tb)

    # --- the run ------------------------------------------------------------------------------

    async def run(
        self,
        execution_id: str,
        *,
        abandon: asyncio.Event | None = None,
        workflow: tuple[str, str] | None = None,
    ) -> RunOutcome:
        """Run ``execution_id`` from its cursor until it finishes, parks on a timer, is
        cancelled, or this runner loses its lease. Safe to call any number of times, from any
        number of processes, concurrently: at most one runner makes progress.

        ``abandon``: set it (e.g. when the queue job's lock is lost) to cancel the step in
        progress without writing anything; the lease is released for the next runner.
        ``workflow``: the execution's (tenant, workflow), when the caller knows it (the job's
        payload): a workflow of pure steps only is run unleased (:meth:`_run_unleased`).
        Raises ``DatabaseUnavailable`` / ``StoreError`` when the database fails.
        """
        if workflow is not None and workflow in self._unleased:
            outcome = await self._run_unleased(execution_id, abandon)
            if outcome is not None:
                return outcome
        async with self.store.runs.session() as runs:
            now = self._clock()
            claim = await runs.claim(execution_id, now, now + self.lease_ttl)
            if claim is None:
                return await self._not_claimed(runs, execution_id, now)
            claim.first_run = claim.started_at == now  # the claim set it: never started before
            try:
                outcome = await self._drive(runs, claim, abandon)
                if outcome.finished and claim.parent_execution_id is not None:
                    await runs.idle()
                    if not await self._tell_parent(execution_id, claim, str(outcome.status)):
                        return replace(outcome, parent_untold=True)
                return outcome
            except LeaseLost:
                log.warning(
                    "engine.lease_lost", extra={"execution_id": execution_id, "lease": claim.lease}
                )
                return RunOutcome(
                    execution_id, OutcomeKind.LEASE_LOST, "running", tenant_id=claim.tenant_id
                )
            except _Abandoned:
                await self._release(runs, claim)
                log.info("engine.abandoned", extra={"execution_id": execution_id})
                return RunOutcome(
                    execution_id, OutcomeKind.ABANDONED, "running", tenant_id=claim.tenant_id
                )
            except asyncio.CancelledError:
                await asyncio.shield(self._release_after_cancel(runs, claim))
                raise

    async def _run_unleased(
        self, execution_id: str, abandon: asyncio.Event | None
    ) -> RunOutcome | None:
        """Run a queued execution of pure steps only without claiming it first: one read, the
        steps, and one write that claims and finishes it (or parks it, or fails it) together —
        a statement and a commit fewer than a claim. ``None``: run it the usual way (claim
        first) — it is not queued, its version is not all pure, its workflow cannot be read,
        or another runner claimed (or someone cancelled) it meanwhile: this run wrote nothing,
        and its steps, deterministic, are harmless to run again. (The claimed run's plan then
        takes the workflow out of :attr:`_unleased`, in :meth:`_drive`.)"""
        async with self.store.runs.session() as runs:
            now = self._clock()
            claim = await runs.peek(execution_id, now)
            if claim is None:
                return None
            claim.first_run = claim.started_at == now  # never started before
            try:
                plan = await self._plan(claim)
            except (NotFound, WorkflowInvalid):
                return None
            if not plan.unleased:
                return None
            try:
                outcome = await self._drive(runs, claim, abandon)
            except LeaseLost:
                return None
            except _Abandoned:
                log.info("engine.abandoned", extra={"execution_id": execution_id})
                return RunOutcome(
                    execution_id, OutcomeKind.ABANDONED, "queued", tenant_id=claim.tenant_id
                )
            if outcome.finished and claim.parent_execution_id is not None:
                await runs.idle()
                if not await self._tell_parent(execution_id, claim, str(outcome.status)):
                    return replace(outcome, parent_untold=True)
            return outcome

    async def _tell_parent(
        self, execution_id: str, ended: Claim | None = None, status: str = ""
    ) -> bool:
        """A sub-workflow ended (``ended``: the claim it ended with and its ``status``, when
        this runner ended it): wake its parent. Never raises; ``False`` when the database could
        not be told — the run's outcome then says so (``parent_untold``), and the job is
        delivered again to tell it (answered SKIPPED, which tells it again): nothing else
        would, a parent waiting on a child without a timeout has no timer."""
        try:
            children = self.store.children
            told = await children.notify_parent(execution_id, self._clock(), ended, status)
        except Exception as exc:
            log.warning(
                "engine.tell_parent_failed",
                extra={"execution_id": execution_id, "error": repr(exc)[:300]},
            )
            return False
        if told is not None and told[0].woken and told[1] is not None:
            await self._enqueue(told[1], "child", f"child:{execution_id}")  # else: reconciler
        return True

    async def _enqueue(self, execution: Execution, reason: str, job_id: str) -> None:
        if self.enqueue is None:
            return
        try:
            await self.enqueue(execution, reason, job_id)
        except Exception as exc:  # the reconciler enqueues it
            log.warning(
                "engine.enqueue_deferred",
                extra={"execution_id": execution.id, "error": repr(exc)[:300]},
            )

    async def _not_claimed(self, runs: RunStore, execution_id: str, now: datetime) -> RunOutcome:
        why = await runs.unclaimed(execution_id)
        if why.status is None:
            return RunOutcome(execution_id, OutcomeKind.MISSING, None)
        if why.status == "running" and why.lease_expires_at is not None:
            wait = max((why.lease_expires_at - now).total_seconds(), 0.0)
            return RunOutcome(execution_id, OutcomeKind.BUSY, why.status, retry_after_s=wait)
        if why.status == "waiting" and why.wake_at is None:  # a wait step without a timeout
            return RunOutcome(execution_id, OutcomeKind.NOT_DUE, why.status)
        if why.status == "waiting" and why.wake_at is not None:
            wait = max((why.wake_at - now).total_seconds(), 0.0)
            return RunOutcome(
                execution_id,
                OutcomeKind.NOT_DUE,
                why.status,
                retry_after_s=wait,
                wake_at=why.wake_at,
            )
        if why.status in ("queued", "running", "waiting"):  # changed under us: try again
            return RunOutcome(execution_id, OutcomeKind.BUSY, why.status, retry_after_s=0.0)
        # ended: a redelivery after a crash may be all that is left to tell its parent
        await runs.idle()
        told = await self._tell_parent(execution_id)
        return RunOutcome(execution_id, OutcomeKind.SKIPPED, why.status, parent_untold=not told)

    async def _release_after_cancel(self, runs: RunStore, claim: Claim) -> None:
        # Give the session's connection back first (it may be finishing a cancelled query),
        # then release on a connection of its own.
        try:
            await runs.idle()
        finally:
            await self._release(self.store.runs, claim)

    async def _release(self, runs: RunStore, claim: Claim) -> None:
        """Best effort: let the next runner claim at once (bounded; never raises)."""
        try:
            async with asyncio.timeout(_RELEASE_TIMEOUT_S):
                await runs.release(claim, self._clock())
        except Exception as exc:
            log.warning(
                "engine.release_failed",
                extra={"execution_id": claim.execution_id, "error": repr(exc)},
            )

    async def _plan(self, claim: Claim) -> Plan:
        branch = claim.branch  # a branch / item of a fan-out runs one step list of it
        key = (claim.tenant_id, claim.workflow_id, claim.workflow_version, branch or "")
        plan = self._plans.get(key)
        if plan is None:
            definition = await self.store.workflows.get_definition(*key[:3])
            if branch is not None:
                try:
                    definition = definition.branch(branch)
                except KeyError:
                    raise WorkflowInvalid(
                        f"branch {branch!r} names no step list of workflow {claim.workflow_id!r} "
                        f"version {claim.workflow_version}"
                    ) from None
            plan = Plan.build(definition, branch)
            self._plans.put(key, plan)
        return plan

    async def _drive(
        self, runs: RunStore, claim: Claim, abandon: asyncio.Event | None
    ) -> RunOutcome:
        try:
            plan = await self._plan(claim)
        except (NotFound, WorkflowInvalid) as exc:
            error = {"type": type(exc).__name__, "message": str(exc)}
            return await self._finish(
                runs, claim, _Progress(claim.next_step, claim.steps_run), "failed", error=error
            )
        if claim.branch is None:  # the next execution of this workflow: peek or claim
            workflow = (claim.tenant_id, claim.workflow_id)
            if not plan.unleased:
                self._unleased.discard(workflow)
            elif workflow not in self._unleased:
                if len(self._unleased) >= self._plans.maxsize:
                    self._unleased.clear()
                self._unleased.add(workflow)
        outputs: dict[str, Any] = {}
        if claim.next_step > 0:
            outputs = await runs.completed_outputs(claim.tenant_id, claim.execution_id)
        run = _Run(runs, claim, plan, outputs, abandon, claim.next_step, claim.steps_run)
        if claim.step_attempt > 0:
            started = claim.step_started_at or claim.started_at
            run.resume = (claim.step_attempt, list(claim.step_errors or []), started)
        while True:
            if run.index >= len(plan.steps):
                ended = await self._finish_at_end(run)
                self._observed(run)
                return ended
            if abandon is not None and abandon.is_set():
                raise _Abandoned
            outcome = await (self._traced_step(run) if tracing.enabled else self._step(run))
            if outcome is not None:
                return outcome

    async def _finish_at_end(self, run: _Run) -> RunOutcome:
        """Succeed with the last completed step's output (a run that resumes at the end, after
        a final ``delay``), or the workflow's ``output`` expression's value. That output is
        checked against this runner's limit like any other: one that no longer fits fails the
        execution rather than being cut."""
        at = _Progress(run.index, run.seq, run.ran)
        if run.plan.definition.output is not None:
            value, error = self._evaluated_output(run, run.outputs)
            if error is not None:
                return await self._finish(
                    run.runs, run.claim, at, "failed", error=error, steps=run.pending
                )
            return await self._finish(
                run.runs, run.claim, at, "succeeded", output=value, steps=run.pending
            )
        output = run.last_output
        if output is None and run.outputs:
            step_id, value = next(reversed(run.outputs.items()))
            try:
                output = encode_output(run.plan.by_id(step_id), value, self._max_output)
            except OutputRejected as exc:
                error = {"step": step_id, **describe_error(exc)}
                return await self._finish(
                    run.runs, run.claim, at, "failed", error=error, steps=run.pending
                )
        return await self._finish(
            run.runs, run.claim, at, "succeeded", output=output, steps=run.pending
        )

    def _evaluated_output(
        self, run: _Run, outputs: dict[str, Any]
    ) -> tuple[Encoded, dict[str, Any] | None]:
        """The value of the workflow's ``output`` expression over the evaluation context, as
        stored; or the execution's error when it fails (``output_expression_failed``) or its
        value cannot be stored (``output_too_large`` / ``output_not_json``)."""
        expression = run.plan.definition.output
        assert expression is not None
        claim = run.claim
        context = build_context(
            claim.input,
            outputs,
            execution_id=claim.execution_id,
            workflow_id=claim.workflow_id,
            tenant_id=claim.tenant_id,
        )
        try:
            return encode_execution_output(evaluate(expression, context), self._max_output), None
        except ExpressionError as exc:
            error = {
                "type": "ExpressionError",
                "code": "output_expression_failed",
                "message": f"the workflow's output expression failed: {exc.message}",
                "expression": expression,
            }
        except OutputRejected as exc:
            error = {**describe_error(exc), "expression": expression}
        log.info(
            "engine.output_failed",
            extra={"execution_id": claim.execution_id, "error": error.get("code")},
        )
        return NO_OUTPUT, error

    async def _finish(
        self,
        runs: RunStore,
        claim: Claim,
        at: _Progress,
        status: str,
        *,
        output: Encoded | None = None,
        error: dict[str, Any] | None = None,
        steps: Sequence[StepWrite] = (),
    ) -> RunOutcome:
        now = self._clock()
        write = ExecutionWrite(
            status=status,
            next_step=at.index,
            steps_run=at.seq,
            now=now,
            lease_expires_at=None,
            output=output.value if output else None,
            output_json=output.text if output else None,
            error=error,
            error_json=dumps(error) if error is not None else None,
            finished_at=now,
        )
        final = await runs.write(claim, write, steps)
        return self._outcome(claim, final, at.ran)

    def _outcome(
        self,
        claim: Claim,
        status: str,
        ran: int,
        *,
        wake_at: datetime | None = None,
        timer_id: str | None = None,
    ) -> RunOutcome:
        latency = None
        # the run that started the execution (resuming after a delay is no new attempt, but
        # it has steps behind it; a retry from the failed step starts with steps behind it)
        # (nor is resuming after a retry wait, which may be at the first step)
        if (
            claim.attempts == 1
            and claim.step_attempt == 0
            and (claim.steps_run == 0 or claim.first_run)
        ):
            latency = (claim.started_at - claim.queued_at).total_seconds() * 1000.0
        return RunOutcome(
            claim.execution_id,
            OutcomeKind(status),
            status,
            steps_run=ran,
            wake_at=wake_at if status == "waiting" else None,
            timer_id=timer_id if status == "waiting" else None,
            tenant_id=claim.tenant_id,
            queue_latency_ms=latency,
        )

    async def _traced_step(self, run: _Run) -> RunOutcome | None:
        """:meth:`_step` in a span (tracing on): its ``http`` requests are child spans."""
        step = run.plan.steps[run.index]
        attributes = {"conveyor.step.id": step.id, "conveyor.step.type": step.type,
                      "conveyor.step.seq": run.seq}  # fmt: skip
        with tracing.start_span(f"step {step.type}", attributes):
            return await self._step(run)

    async def _step(self, run: _Run) -> RunOutcome | None:
        """Run the step at the cursor and persist it; an outcome when the run ends here."""
        plan, index = run.plan, run.index
        step = plan.steps[index]
        if isinstance(step, WaitStep):
            return await self._wait(run, step)
        if isinstance(step, WorkflowStep):
            return await self._subflow(run, step)
        if isinstance(step, ParallelStep | ForeachStep):
            return await self._fanout(run, step)
        if plan.pure[index] and run.resume is None and self._runner is run_step:
            first = self._pure_try(run, cast(PureStep, step))
            if isinstance(first, _StepDone):
                done = first
            else:  # it failed: recorded (and retried, by its policy) the regular way
                done = await self._attempts(run, step, first)
        elif plan.local[index] and (step.retry is None or step.retry.attempts == 1):
            done = await self._attempts(run, step)
        else:
            await run.runs.idle()  # hold no connection while the step waits
            done = await self._guarded(run, self._attempts(run, step))
        now = self._clock()
        if done.retry_at is not None:
            return await self._write_retry_wait(run, step, done, now)
        result = done.result
        if self.on_step is not None:
            seconds = (done.finished_at - done.started_at).total_seconds()
            run.observed.append((step.type, "failed" if result is None else "succeeded", seconds))
        if result is None:
            return await self._write_step(run, step, done, "failed", now)
        if result.suspend_until is not None and result.suspend_until > now:
            return await self._write_step(
                run, step, done, "waiting", now, wake_at=result.suspend_until
            )
        next_index = plan.next_index(index, result.next)
        status = "succeeded" if next_index >= len(plan.steps) else "running"
        return await self._write_step(run, step, done, status, now, next_index=next_index)

    async def _write_step(
        self,
        run: _Run,
        step: AnyStep,
        done: _StepDone,
        status: str,
        now: datetime,
        *,
        next_index: int | None = None,
        wake_at: datetime | None = None,
        persist: Persist | None = None,
    ) -> RunOutcome | None:
        claim, index = run.claim, run.index
        output = done.output
        error = done.error
        if error is not None and done.history:
            error = {**error, "attempts": done.history}
        recorded = done.input
        step_write = StepWrite(
            seq=run.seq,
            step_id=step.id,
            step_type=step.type,
            status="failed" if done.result is None else "succeeded",
            attempts=done.attempts,
            input=run.plan.inputs[index] if recorded is None else recorded.value,
            input_json=run.plan.inputs_json[index] if recorded is None else recorded.text,
            output=output.value,
            output_json=output.text,
            output_truncated=False,  # never: an output that does not fit fails its step
            error=error,
            error_json=dumps(error) if error is not None else None,
            started_at=done.started_at,
            finished_at=done.finished_at,
        )
        if status == "running" and run.plan.pure[index]:
            # Deterministic, no side effects: after a crash it simply runs again, so its record
            # waits for the next durable write (an http step's, a delay's, the end's).
            if tracing.enabled:
                _annotate_step_span(step_write.status, status, done.attempts, done.error)
            run.pending.append(step_write)
            run.ran += 1
            self._advance(run, step, output, index + 1 if next_index is None else next_index)
            return None
        terminal = status in ("succeeded", "failed")
        exec_error = None if done.error is None else {"step": step.id, **done.error}
        exec_output = output
        if status == "succeeded" and run.plan.definition.output is not None:
            outputs = {**run.outputs, step.id: output.value}
            exec_output, exec_error = self._evaluated_output(run, outputs)
            if exec_error is not None:
                status = "failed"
        write = ExecutionWrite(
            status=status,
            next_step=index + 1 if next_index is None else next_index,
            steps_run=run.seq + 1,
            now=now,
            lease_expires_at=None if terminal or status == "waiting" else now + self.lease_ttl,
            output=exec_output.value if status == "succeeded" else None,
            output_json=exec_output.text if status == "succeeded" else None,
            error=exec_error,
            error_json=dumps(exec_error) if exec_error is not None else None,
            finished_at=now if terminal else None,
            wake_at=wake_at,
        )
        timer = None
        if wake_at is not None:
            timer = TimerWrite(
                id=new_id(),
                workflow_id=claim.workflow_id,
                region=claim.region,
                seq=run.seq,
                due_at=wake_at,
            )
        if tracing.enabled:
            _annotate_step_span(step_write.status, status, done.attempts, done.error)
        if persist is not None:
            final = await persist(write, [*run.pending, step_write])
        else:
            final = await self._persist(run, write, [*run.pending, step_write], timer)
        run.pending.clear()
        self._observed(run)
        run.ran += 1
        if final != "running":
            timer_id = timer.id if timer is not None else None
            return self._outcome(claim, final, run.ran, wake_at=wake_at, timer_id=timer_id)
        self._advance(run, step, output, write.next_step)
        return None

    def _observed(self, run: _Run) -> None:
        """The steps the write that just landed recorded: to :attr:`on_step` (metrics)."""
        if run.observed and self.on_step is not None:
            for step_type, status, seconds in run.observed:
                self.on_step(step_type, status, seconds)
        run.observed.clear()

    @staticmethod
    def _advance(run: _Run, step: AnyStep, output: Encoded, next_step: int) -> None:
        """The step is done and the run goes on: its output is seen by the next steps."""
        run.outputs[step.id] = output.value
        run.last_output = output
        run.index = next_step
        run.seq += 1

    async def _write_retry_wait(
        self, run: _Run, step: AnyStep, done: _StepDone, now: datetime
    ) -> RunOutcome:
        """Park the execution until the step's next try (one fenced write: the tries made,
        their errors, the pending pure steps' runs, the timer); the run ends here."""
        claim, wake_at = run.claim, done.retry_at
        assert wake_at is not None
        write = ExecutionWrite(
            status="waiting",
            next_step=run.index,
            steps_run=run.seq,
            now=now,
            lease_expires_at=None,
            wake_at=wake_at,
            step_attempt=done.attempts,
            step_errors=done.history,
            step_errors_json=dumps(done.history),
            step_started_at=done.started_at,
        )
        timer = TimerWrite(
            id=new_id(),
            workflow_id=claim.workflow_id,
            region=claim.region,
            seq=run.seq,
            due_at=wake_at,
        )
        final = await self._persist(run, write, run.pending, timer)
        run.pending.clear()
        self._observed(run)
        log.info(
            "engine.step_retry_wait",
            extra={"execution_id": claim.execution_id, "step": step.id,
                   "attempts": done.attempts, "wake_at": wake_at.isoformat(),
                   "error": (done.error or {}).get("type")},
        )  # fmt: skip
        return self._outcome(claim, final, run.ran, wake_at=wake_at, timer_id=timer.id)

    async def _persist(
        self,
        run: _Run,
        write: ExecutionWrite,
        steps: Sequence[StepWrite],
        timer: TimerWrite | None,
    ) -> str:
        """The fenced write of a finished step (with the pure steps run since the last write,
        in order); the execution's status after it.

        The step's side effects already happened: if the database is briefly unavailable, the
        result stays in memory and the write is retried (backoff 0.1 s doubling to 2 s) for up
        to half the lease — which the last renewal guarantees for at least two thirds — instead
        of giving the job up, which would run the step again. A retry first asks whether the
        earlier attempt committed after all (its answer was lost with the connection) — not
        an unleased run's: the lease it writes under is the one the next claim takes, so a
        racer's write would look like its own; it sends the write again, which a committed
        first attempt fences out (``LeaseLost``: the run falls back to claiming and finds the
        execution ended)."""
        claim = run.claim
        deadline = time.monotonic() + self.lease_ttl.total_seconds() / 2
        delay, tries = 0.1, 0
        while True:
            try:
                if tries and steps and not claim.unleased:
                    status = await run.runs.written(claim, steps[-1].seq)
                    if status is not None:
                        return status
                return await run.runs.write(claim, write, steps, timer)
            except DatabaseUnavailable as exc:
                tries += 1
                if time.monotonic() + delay > deadline:
                    raise
                log.warning(
                    "engine.write_retry",
                    extra={"executionId": claim.execution_id, "seq": run.seq, "try": tries,
                           "error": str(exc)[:200]},
                )  # fmt: skip
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)

    # --- a wait step -------------------------------------------------------------------------

    async def _wait(self, run: _Run, step: WaitStep) -> RunOutcome | None:
        """Receive the event, take the timeout's branch, or park (see the module, 4b)."""
        claim, events = run.claim, self.store.events
        now = self._clock()
        recorded: dict[str, Any] = {"event": step.event}
        try:
            correlation = self._correlation(run, step)
        except (ExpressionError, PermanentStepError) as exc:
            done = _StepDone(1, now, now, error=describe_error(exc), input=_encoded(recorded))
            return await self._write_step(run, step, done, "failed", now)
        if correlation is not None:
            recorded["correlation"] = correlation
        await run.runs.idle()
        parked = await events.wait_of(claim.execution_id)
        if parked is not None and parked.seq != run.seq:
            parked = None  # left by an earlier wait (its write deletes it): not this one
        if parked is not None:
            started, deadline = parked.created_at, parked.deadline
        else:
            started = now
            deadline = None if step.timeout_s is None else now + timedelta(seconds=step.timeout_s)
        if deadline is not None:
            recorded["deadline"] = _iso(deadline)
        while True:
            now = self._clock()
            event = await events.find(
                claim.tenant_id, claim.execution_id, claim.workflow_id, step.event, correlation
            )
            if event is not None:
                output = {"event": event.name, "payload": event.payload,
                          "receivedAt": _iso(event.received_at)}  # fmt: skip
                done = self._done_with(
                    step, started, now, output, {**recorded, "eventId": event.id}
                )
                try:
                    return await self._wait_end(run, step, done, now, "continue", event.id)
                except _EventTaken:
                    continue
            if deadline is not None and now >= deadline:
                return await self._wait_timed_out(run, step, started, now, recorded)
            first = parked is None
            outcome = await self._park(run, step.event, correlation, started, deadline, first)
            if outcome is None:
                continue  # an event arrived meanwhile: receive it
            return outcome

    async def _park(
        self,
        run: _Run,
        name: str,
        correlation: str | None,
        started: datetime,
        deadline: datetime | None,
        first: bool,
        consume: Sequence[str] = (),
    ) -> RunOutcome | None:
        """Park the execution on the event ``name`` (a wait step's, or a child's end) until
        ``deadline``: one fenced write (with the pending pure steps' runs, the timeout timer on
        the ``first`` park, consuming ``consume``) that looks for a matching event once more —
        ``None`` when one is there (nothing written: look again); else the run's outcome."""
        claim, now = run.claim, self._clock()
        wait = EventWait(
            execution_id=claim.execution_id, tenant_id=claim.tenant_id,
            workflow_id=claim.workflow_id, name=name, correlation=correlation,
            seq=run.seq, deadline=deadline, created_at=started,
        )  # fmt: skip
        timer = None
        if first and deadline is not None:
            timer = TimerWrite(new_id(), claim.workflow_id, claim.region, run.seq, deadline)
        write = ExecutionWrite(
            status="waiting", next_step=run.index, steps_run=run.seq, now=now,
            lease_expires_at=None, wake_at=deadline,
        )  # fmt: skip
        final = await self.store.events.park(claim, write, run.pending, timer, wait, consume)
        if final is None:
            return None
        run.pending.clear()
        self._observed(run)
        timer_id = timer.id if timer is not None else None
        return self._outcome(claim, final, run.ran, wake_at=deadline, timer_id=timer_id)

    def _correlation(self, run: _Run, step: WaitStep) -> str | None:
        """The value of the step's ``correlation`` expression, as text (string or number)."""
        if step.correlation is None:
            return None
        value = evaluate(step.correlation, self._context(run))
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise PermanentStepError(
                f"correlation must evaluate to a string or a number, got {dumps(value)[:80]}"
            )
        text = value if isinstance(value, str) else dumps(value)
        if not text or len(text) > 512:
            raise PermanentStepError("correlation must be 1 to 512 characters")
        return text

    def _done_with(
        self,
        step: AnyStep,
        started: datetime,
        now: datetime,
        output: Any,
        recorded: dict[str, Any],
    ) -> _StepDone:
        """A step the engine runs itself (wait, workflow, parallel, foreach) succeeded with
        ``output`` — or fails for good when it cannot be stored (``output_too_large`` ...)."""
        try:
            encoded = encode_output(step, output, self._max_output)
        except OutputRejected as exc:
            return _StepDone(1, started, now, error=describe_error(exc), input=_encoded(recorded))
        return _StepDone(
            1, started, now, result=StepResult(output=output), output=encoded,
            input=_encoded(recorded),
        )  # fmt: skip

    async def _wait_timed_out(
        self,
        run: _Run,
        step: WaitStep,
        started: datetime,
        now: datetime,
        recorded: dict[str, Any],
    ) -> RunOutcome | None:
        action = step.timeout_action
        if action is None:
            message = f"no event {step.event!r} arrived within {step.timeout_s:g}s"
            error = {"type": "WaitTimeout", "message": message}
            done = _StepDone(1, started, now, error=error, input=_encoded(recorded))
        else:
            done = self._done_with(step, started, now, {"timedOut": True}, recorded)
        return await self._wait_end(run, step, done, now, action, None)

    async def _wait_end(
        self,
        run: _Run,
        step: WaitStep | WorkflowStep | ParallelStep | ForeachStep,
        done: _StepDone,
        now: datetime,
        action: Any,
        event_id: str | None,
        consume: Sequence[str] = (),
    ) -> RunOutcome | None:
        """The wait step's write (consuming ``event_id`` and ``consume``): raises
        ``_EventTaken`` when another execution consumed ``event_id`` first (nothing written)."""
        claim, events = run.claim, self.store.events

        async def receive(write: ExecutionWrite, steps: Sequence[StepWrite]) -> str:
            status = await events.receive(claim, write, steps, event_id, consume)
            if status is None:
                raise _EventTaken
            return status

        if done.result is None:
            return await self._write_step(run, step, done, "failed", now, persist=receive)
        next_index = run.plan.next_index(run.index, action)
        status = "succeeded" if next_index >= len(run.plan.steps) else "running"
        return await self._write_step(
            run, step, done, status, now, next_index=next_index, persist=receive
        )

    # --- a workflow step (a sub-workflow) -------------------------------------------------------

    async def _subflow(self, run: _Run, step: WorkflowStep) -> RunOutcome | None:
        """Start the child (once), then receive its end or park (see the module, 4c)."""
        recorded: dict[str, Any] = {"workflow": step.workflow, "version": step.version}
        started = await self._start_child(run, step, recorded)
        if isinstance(started, dict):
            now = self._clock()
            done = _StepDone(1, now, now, error=started, input=_encoded(recorded))
            return await self._wait_end(run, step, done, now, "continue", None)
        recorded.update(version=started.workflow_version, childId=started.id)
        return await self._await_child(run, step, started, recorded)

    async def _start_child(
        self, run: _Run, step: WorkflowStep, recorded: dict[str, Any]
    ) -> Execution | dict[str, Any]:
        """The step run's child (created and enqueued the first time), or the step's error."""
        claim, now = run.claim, self._clock()
        limit = self.settings.workflow_max_depth
        if claim.depth + 1 > limit:
            return {
                "type": "WorkflowDepthExceeded", "code": "workflow_depth_exceeded",
                "message": f"a workflow step at depth {claim.depth} would start a child at depth "
                           f"{claim.depth + 1}; the limit is {limit} (WORKFLOW_MAX_DEPTH)",
            }  # fmt: skip
        context = self._context(run)
        try:
            child_input = render_template(step.input, context)
        except ExpressionError as exc:
            return describe_error(exc)
        await run.runs.idle()
        try:
            child, created = await self.store.children.start(
                tenant_id=claim.tenant_id, parent_id=claim.execution_id, seq=run.seq,
                depth=claim.depth + 1, workflow_id=step.workflow, version=step.version,
                input=child_input, now=now,
            )  # fmt: skip
        except (NotFound, Conflict, InputInvalid) as exc:
            error = describe_error(exc)
            if isinstance(exc, ConveyorError) and exc.details and "details" not in error:
                error["details"] = exc.details
            message = f"cannot start workflow {step.workflow!r}: {error['message']}"
            return {**error, "message": message}
        # A run of the parent that died after creating the child may not have enqueued it
        # (job id = child id: a job still there is not added twice).
        if created or (claim.attempts > 1 and child.status == "queued"):
            await self._enqueue(child, "workflow", child.id)
        return child

    async def _await_child(
        self, run: _Run, step: WorkflowStep, child: Execution, recorded: dict[str, Any]
    ) -> RunOutcome | None:
        """Receive the child's end (its output or error), time out, or park until it ends."""
        claim, events = run.claim, self.store.events
        now = self._clock()
        name = child_event(run.seq)
        parked = await events.wait_of(claim.execution_id)
        if parked is not None and parked.seq != run.seq:
            parked = None
        started = parked.created_at if parked is not None else now
        deadline = None
        if step.timeout_s is not None:
            deadline = started + timedelta(seconds=step.timeout_s)
            recorded["deadline"] = _iso(deadline)
        while True:
            now = self._clock()
            child = await self.store.executions.get(claim.tenant_id, child.id)
            event = await events.find(
                claim.tenant_id, claim.execution_id, claim.workflow_id, name, None
            )
            event_id = None if event is None else event.id
            if child.terminal:
                done = self._child_done(step, child, started, now, recorded)
                try:
                    return await self._wait_end(run, step, done, now, "continue", event_id)
                except _EventTaken:
                    continue
            if deadline is not None and now >= deadline:
                await self._cancel_child(child)
                message = f"workflow {step.workflow!r} did not end within {step.timeout_s:g}s"
                error = {"type": "WaitTimeout", "message": message, "childId": child.id}
                done = _StepDone(1, started, now, error=error, input=_encoded(recorded))
                return await self._wait_end(run, step, done, now, "continue", event_id)
            outcome = await self._park(run, name, None, started, deadline, parked is None)
            if outcome is None:
                continue  # the child ended meanwhile
            if outcome.status == "cancelled":  # cancelled before the child was: cancel it too
                await self._cancel_child(child)
            return outcome

    def _child_done(
        self,
        step: WorkflowStep,
        child: Execution,
        started: datetime,
        now: datetime,
        recorded: dict[str, Any],
    ) -> _StepDone:
        """The step's result: the child's output, or ``ChildFailed`` with the child's error."""
        if child.status == "succeeded":
            return self._done_with(step, started, now, child.output, recorded)
        error = {
            "type": "ChildFailed", "code": f"child_{child.status}",
            "message": f"workflow {step.workflow!r} (execution {child.id}) {child.status}",
            "details": {"childId": child.id, "status": child.status, "error": child.error},
        }  # fmt: skip
        return _StepDone(1, started, now, error=error, input=_encoded(recorded))

    async def _cancel_child(self, child: Execution) -> None:
        with contextlib.suppress(Conflict):  # it ended meanwhile
            await self.store.executions.cancel(child.tenant_id, child.id)

    # --- a parallel or foreach step: children through the queue ------------------------------

    async def _fanout(self, run: _Run, step: ParallelStep | ForeachStep) -> RunOutcome | None:
        """Start the branches / items as child executions (each once; a foreach keeps at most
        ``concurrency`` running), park until their ends wake it, join (see the module, 4d)."""
        claim, events = run.claim, self.store.events
        now = self._clock()
        items = self._fanout_items(run, step)
        if isinstance(items, dict):
            failed = _StepDone(1, now, now, error=items, input=_encoded({"type": step.type}))
            return await self._wait_end(run, step, failed, now, "continue", None)
        total = len(items)
        if isinstance(step, ParallelStep):
            recorded: dict[str, Any] = {"branches": total, "mode": step.mode}
            window = total
        else:
            recorded = {"items": total, "concurrency": step.concurrency}
            window = step.concurrency
        name = child_event(run.seq)
        parked = await events.wait_of(claim.execution_id)
        if parked is not None and parked.seq != run.seq:
            parked = None
        started = parked.created_at if parked is not None else now
        deadline = None
        if step.timeout_s is not None:
            deadline = started + timedelta(seconds=step.timeout_s)
            recorded["deadline"] = _iso(deadline)
        children = self.store.children
        await self._enqueue_queued_children(run, step.type)
        first_wins = isinstance(step, ParallelStep) and step.mode == "any"
        renewed = time.monotonic()
        while True:
            if time.monotonic() - renewed >= self.renew_every_s:  # children keep ending
                await self._renew(run)
                renewed = time.monotonic()
            now = self._clock()
            seen = await events.pending(claim.tenant_id, claim.execution_id, name)
            state = await children.fanout(
                claim.tenant_id, claim.execution_id, run.seq, winner=first_wins
            )
            done: _StepDone | None = await self._fanout_joined(
                run, step, state, total, started, now, recorded
            )
            if done is None and deadline is not None and now >= deadline:
                what = "branches" if isinstance(step, ParallelStep) else "items"
                message = f"the {what} of step {step.id!r} did not end within {step.timeout_s:g}s"
                late = {"type": "WaitTimeout", "message": message}
                done = _StepDone(1, started, now, error=late, input=_encoded(recorded))
            if done is not None:
                await self._cancel_children(claim.tenant_id, claim.execution_id, run.seq)
                return await self._wait_end(run, step, done, now, "continue", None, seen)
            upto = min(total, state.started + max(window - state.active, 0))
            if upto > state.started:
                error = await self._start_branches(run, step, items, state.started, upto, now)
                if error is not None:
                    await self._cancel_children(claim.tenant_id, claim.execution_id, run.seq)
                    done = _StepDone(1, started, now, error=error, input=_encoded(recorded))
                    return await self._wait_end(run, step, done, now, "continue", None, seen)
            outcome = await self._park(run, name, None, started, deadline, parked is None, seen)
            if outcome is None:
                continue  # a child ended meanwhile
            return outcome

    async def _enqueue_queued_children(self, run: _Run, reason: str) -> None:
        """After a run of the parent died (``attempts`` > 1: a delivery took over its expired
        lease), enqueue (again) the step's children that are still ``queued``: a run that died
        between creating children and enqueueing them left them without a job, and only this
        parent knows they must run (job id = child id: a job still there is not added twice)."""
        claim = run.claim
        if claim.attempts <= 1:
            return
        await run.runs.idle()
        queued = await self.store.children.fanout_queued(
            claim.tenant_id, claim.execution_id, run.seq
        )
        if queued:
            await asyncio.gather(*(self._enqueue(c, reason, c.id) for c in queued))

    def _fanout_items(
        self, run: _Run, step: ParallelStep | ForeachStep
    ) -> list[Any] | dict[str, Any]:
        """The branches (their indexes) or the foreach's items; or the step's error (too deep,
        ``items`` not an array, more than ``WORKFLOW_MAX_FANOUT``)."""
        claim = run.claim
        limit = self.settings.workflow_max_depth
        if claim.depth + 1 > limit:
            return {
                "type": "WorkflowDepthExceeded", "code": "workflow_depth_exceeded",
                "message": f"a {step.type} step at depth {claim.depth} would start children at "
                           f"depth {claim.depth + 1}; the limit is {limit} (WORKFLOW_MAX_DEPTH)",
            }  # fmt: skip
        if isinstance(step, ParallelStep):
            return list(range(len(step.branches)))
        try:
            items = evaluate(step.items, self._context(run))
        except ExpressionError as exc:
            return describe_error(exc)
        if not isinstance(items, list):
            kind = "null" if items is None else type(items).__name__
            return {
                "type": "ExpressionError", "code": "items_not_array",
                "message": f"foreach items {step.items!r} evaluated to {kind}, not an array",
            }  # fmt: skip
        most = self.settings.workflow_max_fanout
        if len(items) > most:
            return {
                "type": "FanoutExceeded", "code": "fanout_exceeded",
                "message": f"foreach over {len(items):,} items; the limit is {most:,} "
                           "(WORKFLOW_MAX_FANOUT)",
            }  # fmt: skip
        return items

    def _context(self, run: _Run) -> dict[str, Any]:
        claim = run.claim
        return build_context(
            claim.input, run.outputs, execution_id=claim.execution_id,
            workflow_id=claim.workflow_id, tenant_id=claim.tenant_id,
        )  # fmt: skip

    async def _start_branches(
        self,
        run: _Run,
        step: ParallelStep | ForeachStep,
        items: list[Any],
        start: int,
        stop: int,
        now: datetime,
    ) -> dict[str, Any] | None:
        """Create (once) and enqueue the children ``start .. stop - 1``; the step's error when
        an input cannot be rendered or stored."""
        claim, plan = run.claim, run.plan
        prefix = f"{plan.branch}/" if plan.branch else ""
        context = self._context(run)
        inputs: list[tuple[int, str | None, Any]] = []
        try:
            for index in range(start, stop):
                if isinstance(step, ParallelStep):
                    value = (
                        claim.input if step.input is None else render_template(step.input, context)
                    )
                    inputs.append((index, f"{prefix}{step.id}.{index}", value))
                elif step.input is None:
                    inputs.append((index, None, {"item": items[index], "index": index}))
                else:
                    scope = {**context, "item": items[index], "index": index}
                    inputs.append((index, None, render_template(step.input, scope)))
        except ExpressionError as exc:
            return describe_error(exc)
        await run.runs.idle()
        try:
            created = await self.store.children.start_branches(
                claim, seq=run.seq, branch=f"{prefix}{step.id}", kind=step.type, inputs=inputs,
                now=now,
            )  # fmt: skip
        except InputInvalid as exc:
            return describe_error(exc)
        if created:
            await asyncio.gather(*(self._enqueue(c, step.type, c.id) for c in created))
        return None

    async def _fanout_joined(
        self,
        run: _Run,
        step: ParallelStep | ForeachStep,
        state: Fanout,
        total: int,
        started: datetime,
        now: datetime,
        recorded: dict[str, Any],
    ) -> _StepDone | None:
        """The step's result once its children allow one (``None``: not yet)."""
        claim = run.claim
        if isinstance(step, ParallelStep) and step.mode == "any":
            if state.winner is not None:
                value: Any = {"branch": state.winner.index, "output": state.winner.output}
                return self._done_with(step, started, now, value, recorded)
            if state.started < total or state.active or state.failed is None:
                return None
            first = state.failed
            message = f"every branch of step {step.id!r} failed (the first: branch {first.index})"
        elif state.failed is not None:
            first = state.failed
            what = "branch" if isinstance(step, ParallelStep) else "item"
            message = f"{what} {first.index} of step {step.id!r} {first.status}"
        elif state.succeeded >= total:
            outputs = await self.store.children.fanout_outputs(
                claim.tenant_id, claim.execution_id, run.seq
            )
            return self._done_with(step, started, now, outputs, recorded)
        else:
            return None
        error = {
            "type": "BranchFailed", "code": f"branch_{first.status}", "message": message,
            "details": {"index": first.index, "childId": first.id, "status": first.status,
                        "error": first.error},
        }  # fmt: skip
        return _StepDone(1, started, now, error=error, input=_encoded(recorded))

    async def _cancel_children(self, tenant_id: str, parent_id: str, seq: int) -> None:
        """Cancel the children of a joined (or failed) fan-out step that are still running."""
        for child_id in await self.store.children.fanout_active(tenant_id, parent_id, seq):
            with contextlib.suppress(Conflict, NotFound):  # it ended meanwhile
                await self.store.executions.cancel(tenant_id, child_id)

    # --- one step: attempts, timeout, retries, lease renewal -------------------------------

    async def _attempts(
        self, run: _Run, step: AnyStep, first: _FirstTry | None = None
    ) -> _StepDone:
        """The step's tries, by its retry policy (``first``: the first, already made)."""
        policy = step.retry or _NO_RETRY
        timeout = step.timeout_s
        if timeout is None and not run.plan.local[run.index]:
            timeout = self.default_step_timeout_s
        started = self._clock() if first is None else first.started
        history: list[dict[str, Any]] = []
        attempt = 0
        if run.resume is not None:  # the tries made before a retry wait
            attempt, history, started = run.resume
            run.resume = None
        while True:
            attempt += 1
            ctx = StepContext(
                input=run.claim.input,
                steps=run.outputs,
                execution_id=run.claim.execution_id,
                workflow_id=run.claim.workflow_id,
                tenant_id=run.claim.tenant_id,
                settings=self.settings,
                http=self._http,
                now=self._clock(),
                attempt=attempt,
                rendered=RenderedInput() if first is None else first.rendered,
                secrets=self._secrets_of(run.claim.tenant_id),
            )
            if first is None:
                tried = await self._attempt(step, ctx, timeout)
            else:
                tried, first = first.tried, None
            result, error = tried.result, tried.error
            if error is None:
                assert result is not None
                try:  # an output that cannot be stored fails the try, for good (not retryable)
                    output = encode_output(step, result.output, self._max_output)
                except OutputRejected as exc:
                    error = describe_error(exc)
                else:
                    did = self._recorded_input(result, ctx)
                    return _StepDone(
                        attempt, started, self._clock(), result=result, output=output, input=did
                    )
            if policy.attempts > 1:
                history.append({"attempt": attempt, **error})
            retry = tried.error is not None and policy.retries(
                tried.kind, tried.status, tried.retryable
            )
            if not retry or attempt >= policy.attempts:
                log.info(
                    "engine.step_failed",
                    extra={
                        "execution_id": run.claim.execution_id,
                        "step": step.id,
                        "attempts": attempt,
                        "error": error["type"],
                    },
                )
                did = self._recorded_input(result, ctx)
                return _StepDone(
                    attempt, started, self._clock(), error=error, history=history, input=did
                )
            wait = policy.delay_after(attempt)
            if wait >= DURABLE_RETRY_MIN_S:
                now = self._clock()
                did = self._recorded_input(result, ctx)
                return _StepDone(
                    attempt,
                    started,
                    now,
                    error=error,
                    history=history,
                    input=did,
                    retry_at=now + timedelta(seconds=wait),
                )
            await asyncio.sleep(wait)

    def _pure_try(self, run: _Run, step: PureStep) -> _StepDone | _FirstTry:
        """A pure step's first try. Succeeded: what :meth:`_attempts` makes of it, without
        what only a step that waits or fails needs (a :class:`StepContext`, a timeout, the
        retry policy, a coroutine per layer) — most of a ``transform``'s cost. Failed (or its
        output cannot be stored): the try, for :meth:`_attempts` to take from there — never
        made again (an expression stopped by its deadline would block the loop twice)."""
        claim = run.claim
        started = self._clock()
        rendered = RenderedInput()
        try:
            result = run_pure_step(step, self._context(run), rendered)
        except Exception as exc:
            return _FirstTry(self._failed(exc, step, claim.execution_id, step.timeout_s),
                             rendered, started)  # fmt: skip
        try:
            output = encode_output(step, result.output, self._max_output)
        except OutputRejected:
            return _FirstTry(_Tried(result), rendered, started)
        did = None if rendered.value is None else encode_input(rendered.value, self._max_output)
        return _StepDone(1, started, self._clock(), result=result, output=output, input=did)

    def _secrets_of(self, tenant_id: str) -> SecretResolver:
        """What ``http`` steps read the tenant's secrets with (at the step, when it runs): a
        missing secret, or one this process cannot decrypt, fails the step for good, naming
        the secret; a database outage is worth another try."""

        async def resolve(names: Collection[str]) -> Mapping[str, str]:
            try:
                return await self.store.secrets.resolve(tenant_id, names)
            except NotFound as exc:
                raise PermanentStepError(exc.message, exc.details) from None
            except SecretsUnavailable as exc:
                raise PermanentStepError(exc.message, exc.details) from None
            except DatabaseUnavailable as exc:
                raise RetryableStepError(
                    f"secrets could not be read: {exc.message}", kind="connection"
                ) from None

        return resolve

    def _recorded_input(self, result: StepResult | None, ctx: StepContext) -> Encoded | None:
        """What a try did, ready to store: the result's ``rendered_input``, else what the
        runner had rendered into ``ctx.rendered`` (a try that failed or timed out half-way);
        ``None`` when it reported nothing (the step's definition is recorded)."""
        rendered = None if result is None else result.rendered_input
        if rendered is None:
            rendered = ctx.rendered.value
        return None if rendered is None else encode_input(rendered, self._max_output)

    async def _attempt(self, step: AnyStep, ctx: StepContext, limit_s: float | None) -> _Tried:
        """One try: a result, or the error with its kind (for the retry policy)."""
        try:
            if limit_s is None:
                result = await self._runner(step, ctx)
            else:
                async with asyncio.timeout(limit_s):
                    result = await self._runner(step, ctx)
        except Exception as exc:
            return self._failed(exc, step, ctx.execution_id, limit_s)
        return _Tried(result)

    @staticmethod
    def _failed(exc: Exception, step: AnyStep, execution_id: str, limit_s: float | None) -> _Tried:
        """A try that raised ``exc`` (called where it is handled: a crash logs its
        traceback)."""
        if isinstance(exc, TimeoutError):
            error = {"type": "StepTimeout", "message": f"step timed out after {limit_s}s"}
            return _Tried(None, error, True, "timeout")
        if isinstance(exc, RetryableStepError | PermanentStepError):
            retryable = isinstance(exc, RetryableStepError)
            status = exc.details.get("status") if isinstance(exc.details, dict) else None
            code = status if exc.kind == "status" and isinstance(status, int) else None
            return _Tried(None, describe_error(exc), retryable, exc.kind, code)
        log.exception("engine.step_crashed", extra={"execution_id": execution_id, "step": step.id})
        message = f"{type(exc).__name__}: {exc}"[:2000]
        return _Tried(None, {"type": "InternalError", "message": message})

    async def _renew(self, run: _Run) -> None:
        """Extend the lease; LeaseLost stops the step. A database blip only logs: the lease
        may then expire, and the fenced write decides."""
        try:
            await run.runs.renew(run.claim, self._clock() + self.lease_ttl)
        except DatabaseUnavailable as exc:
            log.warning(
                "engine.renew_failed",
                extra={"execution_id": run.claim.execution_id, "error": exc.message},
            )
        finally:
            await run.runs.idle()

    async def _guarded(self, run: _Run, work: Coroutine[Any, Any, T]) -> T:
        """Run ``work`` while renewing the lease; stop it if the lease is lost or the
        caller abandons the run."""
        task: asyncio.Task[T] = asyncio.ensure_future(work)
        abandon = asyncio.ensure_future(run.abandon.wait()) if run.abandon is not None else None
        waiting: set[asyncio.Future[Any]] = {task} if abandon is None else {task, abandon}
        try:
            while True:
                done, _ = await asyncio.wait(
                    waiting, timeout=self.renew_every_s, return_when=asyncio.FIRST_COMPLETED
                )
                if task in done:
                    return task.result()
                if abandon is not None and abandon in done:
                    raise _Abandoned
                await self._renew(run)
        finally:
            for pending in (task, abandon):
                if pending is not None and not pending.done():
                    pending.cancel()
            if not task.done():
                await asyncio.wait({task}, timeout=_RELEASE_TIMEOUT_S)


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _encoded(recorded: dict[str, Any]) -> Encoded:
    return Encoded(recorded, dumps(recorded))


def _annotate_step_span(
    step_status: str, execution_status: str, attempts: int, error: dict[str, Any] | None
) -> None:
    """The step's result on its span (tracing on)."""
    tracing.set_attributes({"conveyor.step.status": step_status, "conveyor.step.attempts": attempts,
                            "conveyor.execution.status": execution_status})  # fmt: skip
    if error is not None:
        tracing.mark_error(str(error.get("type", "step failed")))
