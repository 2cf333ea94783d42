"""Step runners: ``await run_step(step, ctx)`` runs one step once and says what comes next.

The engine owns everything around a step: retries (``step.retry``), the overall timeout
(``step.timeout_s``), persistence, timers and the cursor. ``run_step`` only runs the step:

* returns a :class:`StepResult` — the step's JSON ``output`` (only its ``select``-ed part when
  the step has a ``select``), what runs ``next``
  (``"continue"``, ``"end"`` or a :class:`~conveyor.workflows.definition.GotoAction`), and for
  ``delay`` steps ``suspend_until`` (the engine creates a timer row and parks the execution);
* raises :class:`~conveyor.errors.RetryableStepError` (another try may succeed: network error,
  timeout, 5xx, 429) or :class:`~conveyor.errors.PermanentStepError` (it cannot: 4xx, bad
  expression, SSRF refusal).

When the engine re-enters a ``delay`` step whose timer fired it passes ``resuming=True`` and
the step completes without suspending again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from conveyor.errors import PermanentStepError
from conveyor.settings import Settings
from conveyor.workflows.expressions import (
    MAX_VALUE_SIZE,
    ExpressionError,
    build_context,
    evaluate,
    render_template,
    truthy,
)
from conveyor.workflows.http import SafeHttpClient, execute_http
from conveyor.workflows.step_models import (
    Action,
    ConditionStep,
    DelayStep,
    GotoAction,
    HttpStep,
    NoopStep,
    TransformStep,
    parse_until,
)

__all__ = ["AnyStep", "StepContext", "StepResult", "run_step"]

AnyStep = HttpStep | TransformStep | ConditionStep | DelayStep | NoopStep


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True, slots=True)
class StepContext:
    """Everything a step may read. Built by the engine for each step run."""

    input: Any
    """The execution's trigger input (JSON)."""
    steps: Mapping[str, Any]
    """Outputs of the steps completed so far, by step id."""
    execution_id: str
    workflow_id: str
    tenant_id: str
    settings: Settings
    http: SafeHttpClient | None = None
    """A shared, open client (one per process). ``None``: a client is opened for the call."""
    now: datetime = field(default_factory=_utcnow)
    """The engine's clock (aware); ``delay`` steps count ``seconds`` from here."""
    attempt: int = 1
    """Which try of this step this is (1-based)."""
    resuming: bool = False
    """True when the engine re-enters a suspended step (its timer fired)."""

    def expression_context(self) -> dict[str, Any]:
        """The document expressions see: ``input``, ``steps``, ``execution``."""
        return build_context(
            self.input,
            self.steps,
            execution_id=self.execution_id,
            workflow_id=self.workflow_id,
            tenant_id=self.tenant_id,
        )


@dataclass(frozen=True, slots=True)
class StepResult:
    """What one step produced and what runs next."""

    output: Any = None
    next: Literal["continue", "end"] | GotoAction = "continue"
    suspend_until: datetime | None = None
    """Set by ``delay``: park the execution until then (aware UTC)."""

    @property
    def goto(self) -> str | None:
        return self.next.goto if isinstance(self.next, GotoAction) else None


async def run_step(step: AnyStep, ctx: StepContext) -> StepResult:
    """Run ``step`` once. Raises ``RetryableStepError`` / ``PermanentStepError``."""
    if isinstance(step, NoopStep):
        return StepResult()
    if isinstance(step, TransformStep):
        output = evaluate(step.expression, ctx.expression_context())
        return StepResult(output=_select_output(step, output))
    if isinstance(step, ConditionStep):
        return _run_condition(step, ctx)
    if isinstance(step, DelayStep):
        return _run_delay(step, ctx)
    if isinstance(step, HttpStep):
        return StepResult(output=_select_output(step, await _run_http(step, ctx)))
    raise PermanentStepError(f"unknown step type {type(step).__name__}")


def _select_output(step: HttpStep | TransformStep, output: Any) -> Any:
    """``output`` reduced by the step's ``select`` (``output`` itself without one).

    The expression sees only the output (its root, ``@``). Its result may be as large as an
    evaluation may build (:data:`~conveyor.workflows.expressions.MAX_VALUE_SIZE`): the engine
    then checks it against ``STEP_OUTPUT_MAX_BYTES`` exactly, with a message that says so.
    Raises :class:`~conveyor.workflows.expressions.ExpressionError` (permanent).
    """
    if step.select is None:
        return output
    try:
        return evaluate(step.select, output, max_size=MAX_VALUE_SIZE)
    except ExpressionError as exc:
        raise ExpressionError(f"select: {exc.message}") from exc


async def _run_http(step: HttpStep, ctx: StepContext) -> dict[str, Any]:
    context = ctx.expression_context()
    if ctx.http is not None:
        return await execute_http(step, context, ctx.http)
    async with SafeHttpClient(ctx.settings) as client:
        return await execute_http(step, context, client)


def _run_condition(step: ConditionStep, ctx: StepContext) -> StepResult:
    context = ctx.expression_context()
    branch: str | int
    action: Action
    if step.cases is None:
        assert step.expression is not None
        matched = truthy(evaluate(step.expression, context))
        branch, action = ("then", step.then_action) if matched else ("else", step.else_action)
    else:
        branch, action = "else", step.else_action
        for index, case in enumerate(step.cases):
            if truthy(evaluate(case.when, context)):
                branch, action = index, case.then
                break
    shown = action.model_dump() if isinstance(action, GotoAction) else action
    return StepResult(output={"branch": branch, "action": shown}, next=action)


def _run_delay(step: DelayStep, ctx: StepContext) -> StepResult:
    now = ctx.now if ctx.now.tzinfo is not None else ctx.now.replace(tzinfo=UTC)
    if step.seconds is not None:
        until = now + timedelta(seconds=step.seconds)
    else:
        assert step.until is not None
        until = _resolve_until(step.until, ctx)
    until = until.astimezone(UTC)
    output = {"until": until.isoformat().replace("+00:00", "Z")}
    if ctx.resuming or until <= now:
        return StepResult(output=output)
    return StepResult(output=output, suspend_until=until)


def _resolve_until(template: str, ctx: StepContext) -> datetime:
    value = render_template(template, ctx.expression_context())
    if not isinstance(value, str):
        raise PermanentStepError(f"'until' must evaluate to an ISO-8601 string, got {value!r:.80}")
    try:
        return parse_until(value)
    except ValueError as exc:
        raise PermanentStepError(f"'until' {value!r:.80}: {exc}") from None
