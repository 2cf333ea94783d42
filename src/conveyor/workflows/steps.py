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

What the step did — the step run's recorded ``input`` — comes from the rendering the runner
does anyway, never from a second one. The runner writes it to ``ctx.rendered`` as it goes, so
that a try that fails (or is cancelled by the engine's timeout) half-way still shows what it
had rendered, and returns it as ``StepResult.rendered_input``:

* ``http``: the request as sent — ``{"method", "url", "headers", "body"}`` after templating,
  credentials redacted (see :func:`~conveyor.workflows.http.execute_http`);
* ``transform``: ``{"expression", "select"?}`` as written (its value is the output);
* ``condition``: ``{"expression"}`` or ``{"cases": [<when>, ...]}`` as written, and the
  ``"branch"`` taken (``"then"``, ``"else"`` or the index of the matching case);
* ``delay``: ``{"seconds"?, "until"}``, ``until`` the resolved wake time (UTC) — or, when it
  does not parse, the value the template rendered;
* ``noop``: nothing (``None``); the engine records the step's definition.

When the engine re-enters a ``delay`` step whose timer fired it passes ``resuming=True`` and
the step completes without suspending again.

Secrets: an ``http`` step whose URL, headers or body reference ``{{ secrets.NAME }}`` asks
``ctx.secrets`` for those values just before it renders (a missing one fails the step, for
good, naming it). Everything recorded of that try — its rendered input, its output (an echo of
the value included), its error — has each value replaced by ``[secret]``
(:class:`~conveyor.redaction.Redactor`); so have the HTTP client's log lines and spans.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from conveyor.errors import PermanentStepError, StepError
from conveyor.redaction import Redactor
from conveyor.settings import Settings
from conveyor.workflows.expressions import (
    MAX_VALUE_SIZE,
    ExpressionError,
    build_context,
    evaluate,
    render_template,
    secrets_for,
    template_secrets,
    truthy,
)
from conveyor.workflows.http import SafeHttpClient, execute_http
from conveyor.workflows.step_models import (
    Action,
    AnyStep,
    ConditionStep,
    DelayStep,
    ForeachStep,
    GotoAction,
    HttpStep,
    NoopStep,
    ParallelStep,
    TransformStep,
    WaitStep,
    WorkflowStep,
    parse_until,
)

__all__ = [
    "AnyStep",
    "PureStep",
    "RenderedInput",
    "SecretResolver",
    "StepContext",
    "StepResult",
    "http_step_secrets",
    "run_pure_step",
    "run_step",
]


SecretResolver = Callable[[Collection[str]], Awaitable[Mapping[str, str]]]
"""The values of the named secrets of the execution's tenant. Raises
:class:`~conveyor.errors.PermanentStepError` naming a missing secret (never a value)."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(slots=True, eq=False)
class RenderedInput:
    """Where a step runner records what the step did, as it renders it (one per try)."""

    value: Any = None
    """The step run's ``input`` so far (JSON); ``None``: nothing rendered yet."""


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
    rendered: RenderedInput = field(default_factory=RenderedInput, compare=False)
    """Filled in by the runner while it renders: what the step did so far (see the module)."""
    secrets: SecretResolver | None = None
    """Reads the tenant's secrets for ``http`` steps; ``None``: a step that references one
    fails (no secrets available)."""

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
    rendered_input: Any = None
    """What the step did (JSON, credentials redacted): the step run's recorded ``input``.
    ``None``: the engine records what the runner left in ``ctx.rendered``, else the step's
    definition."""

    @property
    def goto(self) -> str | None:
        return self.next.goto if isinstance(self.next, GotoAction) else None


async def run_step(step: AnyStep, ctx: StepContext) -> StepResult:
    """Run ``step`` once. Raises ``RetryableStepError`` / ``PermanentStepError``.

    What the step did is left in ``ctx.rendered`` as it is rendered and returned as the
    result's ``rendered_input`` (see the module docstring).
    """
    result = await _run(step, ctx)
    if ctx.rendered.value is None:
        return result
    # built directly: dataclasses.replace takes several times as long, on every step
    return StepResult(result.output, result.next, result.suspend_until, ctx.rendered.value)


PureStep = NoopStep | TransformStep | ConditionStep
"""The step types :func:`run_pure_step` runs: deterministic, without side effects."""

_NOTHING = StepResult()


def run_pure_step(
    step: PureStep, context: Mapping[str, Any], rendered: RenderedInput
) -> StepResult:
    """Run a pure step once, synchronously, over the expression ``context``
    (:func:`~conveyor.workflows.expressions.build_context`'s document): what :func:`run_step`
    does for it, without the :class:`StepContext` (the engine's fast path for pure steps).

    What it did goes to ``rendered`` as it renders (not into the result); raises
    :class:`~conveyor.workflows.expressions.ExpressionError` (permanent) as ``run_step`` does.
    """
    if isinstance(step, NoopStep):
        return _NOTHING
    if isinstance(step, TransformStep):
        rendered.value = _transform_input(step)
        output = evaluate(step.expression, context)
        return StepResult(output=_select_output(step, output))
    return _run_condition(step, context, rendered)


async def _run(step: AnyStep, ctx: StepContext) -> StepResult:
    if isinstance(step, PureStep):
        return run_pure_step(step, ctx.expression_context(), ctx.rendered)
    if isinstance(step, DelayStep):
        return _run_delay(step, ctx)
    if isinstance(step, HttpStep):
        return StepResult(output=_select_output(step, await _run_http(step, ctx)))
    if isinstance(step, WaitStep):  # the engine waits (it owns the events and the timer)
        raise PermanentStepError("a wait step is run by the engine, not by a step runner")
    if isinstance(step, WorkflowStep | ParallelStep | ForeachStep):  # children: the engine's
        raise PermanentStepError(f"a {step.type} step is run by the engine, not by a step runner")
    raise PermanentStepError(f"unknown step type {type(step).__name__}")


def _transform_input(step: TransformStep) -> dict[str, Any]:
    if step.select is None:
        return {"expression": step.expression}
    return {"expression": step.expression, "select": step.select}


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


def http_step_secrets(step: HttpStep) -> set[str]:
    """The names of the secrets ``step`` references (URL, header values, body)."""
    return (
        template_secrets(step.url)
        | template_secrets(list(step.headers.values()))
        | template_secrets(step.body)
    )


async def _run_http(step: HttpStep, ctx: StepContext) -> dict[str, Any]:
    context = ctx.expression_context()
    names = http_step_secrets(step)
    if not names:

        def record(request: dict[str, Any]) -> None:
            ctx.rendered.value = request

        return await _send_http(step, context, ctx, record, None)
    if ctx.secrets is None:
        raise PermanentStepError(
            f"secret {sorted(names)[0]!r} cannot be read here: no secrets are available",
            secret=sorted(names)[0],
        )
    values = await ctx.secrets(names)
    redactor = Redactor(values.values())

    def record_redacted(request: dict[str, Any]) -> None:
        ctx.rendered.value = redactor.value(request)

    try:
        with secrets_for(dict(values)):  # to its ``secrets.NAME`` placeholders alone
            output = await _send_http(step, context, ctx, record_redacted, redactor)
    except StepError as exc:
        raise _redacted_error(exc, redactor) from None
    except Exception as exc:
        if redactor.contains(str(exc)) or redactor.contains(repr(exc.args)):
            raise PermanentStepError(
                f"{type(exc).__name__}: {redactor.text(str(exc))}"[:2000]
            ) from None
        raise
    redacted: dict[str, Any] = redactor.value(output)
    return redacted


async def _send_http(
    step: HttpStep,
    context: Mapping[str, Any],
    ctx: StepContext,
    record: Callable[[dict[str, Any]], None],
    redactor: Redactor | None,
) -> dict[str, Any]:
    if ctx.http is not None:
        return await execute_http(step, context, ctx.http, record=record, redactor=redactor)
    async with SafeHttpClient(ctx.settings) as client:
        return await execute_http(step, context, client, record=record, redactor=redactor)


def _redacted_error(exc: StepError, redactor: Redactor) -> StepError:
    """``exc`` (same type) with the secret values out of its message and details."""
    details = redactor.value(exc.details) if exc.details is not None else {}
    return type(exc)(redactor.text(exc.message), details, kind=exc.kind)  # kind: retry_on


def _run_condition(
    step: ConditionStep, context: Mapping[str, Any], rendered: RenderedInput
) -> StepResult:
    branch: str | int
    action: Action
    if step.cases is None:
        assert step.expression is not None
        evaluated: dict[str, Any] = {"expression": step.expression}
        rendered.value = evaluated
        matched = truthy(evaluate(step.expression, context))
        branch, action = ("then", step.then_action) if matched else ("else", step.else_action)
    else:
        evaluated = {"cases": [case.when for case in step.cases]}
        rendered.value = evaluated
        branch, action = "else", step.else_action
        for index, case in enumerate(step.cases):
            if truthy(evaluate(case.when, context)):
                branch, action = index, case.then
                break
    rendered.value = {**evaluated, "branch": branch}
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
    given = {} if step.seconds is None else {"seconds": step.seconds}
    ctx.rendered.value = {**given, **output}
    if ctx.resuming or until <= now:
        return StepResult(output=output)
    return StepResult(output=output, suspend_until=until)


def _resolve_until(template: str, ctx: StepContext) -> datetime:
    value = render_template(template, ctx.expression_context())
    ctx.rendered.value = {"until": value}  # replaced by the wake time once it parses
    if not isinstance(value, str):
        raise PermanentStepError(f"'until' must evaluate to an ISO-8601 string, got {value!r:.80}")
    try:
        return parse_until(value)
    except ValueError as exc:
        raise PermanentStepError(f"'until' {value!r:.80}: {exc}") from None
