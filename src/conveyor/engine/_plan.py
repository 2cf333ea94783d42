"""Per-version execution plans (cached) and JSON encoding of step results and of what each
step did (its recorded input), both against ``STEP_OUTPUT_MAX_BYTES``."""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from conveyor.errors import ConveyorError, PermanentStepError
from conveyor.store import dumps, storable_text, without_nul, without_surrogates
from conveyor.workflows import (
    ConditionStep,
    DelayStep,
    GotoAction,
    HttpStep,
    NoopStep,
    TransformStep,
    WorkflowDefinition,
)
from conveyor.workflows.steps import AnyStep, PureStep

__all__ = [
    "NOT_JSON",
    "NO_OUTPUT",
    "TRUNCATED",
    "Encoded",
    "OutputNotJson",
    "OutputRejected",
    "OutputTooLarge",
    "Plan",
    "PlanCache",
    "describe_error",
    "encode_execution_output",
    "encode_input",
    "encode_output",
]

LOCAL_STEPS = (NoopStep, TransformStep, ConditionStep, DelayStep)
PURE_STEPS = PureStep
"""Deterministic steps without side effects: running one again after a crash is harmless."""
SELECTING_STEPS = (HttpStep, TransformStep)
"""Step types with a ``select`` field."""


@dataclass(frozen=True, slots=True)
class Plan:
    """A workflow version prepared for running: steps, their positions, recorded inputs."""

    definition: WorkflowDefinition
    steps: tuple[AnyStep, ...]
    index: dict[str, int]
    inputs: tuple[Any, ...]
    """The steps' definition documents: what a step run records as its ``input`` when its
    runner reports nothing it rendered (``noop``; a custom runner; a template that failed
    before anything was rendered)."""
    inputs_json: tuple[str, ...]
    local: tuple[bool, ...]
    """Steps that never wait on I/O (run inline, no lease-renewal task)."""
    pure: tuple[bool, ...]
    """Steps whose record waits for the next durable write (:data:`PURE_STEPS`)."""
    unleased: bool = False
    """Every step is pure and tried once: a run of it needs no lease (see
    :meth:`conveyor.store.runs.RunStore.peek`), its one write claims the execution."""
    branch: str | None = None
    """The step list of the workflow this plan runs (a ``parallel`` branch's or a
    ``foreach``'s, see :meth:`WorkflowDefinition.branch`); ``None``: the workflow's own."""

    @classmethod
    def build(cls, definition: WorkflowDefinition, branch: str | None = None) -> Plan:
        steps = tuple(definition.steps)
        inputs = tuple(s.model_dump(mode="json", by_alias=True, exclude_unset=True) for s in steps)
        return cls(
            definition=definition,
            steps=steps,
            index={s.id: i for i, s in enumerate(steps)},
            inputs=inputs,
            inputs_json=tuple(dumps(i) for i in inputs),
            local=tuple(isinstance(s, LOCAL_STEPS) for s in steps),
            pure=tuple(isinstance(s, PURE_STEPS) for s in steps),
            unleased=all(
                isinstance(s, PURE_STEPS) and (s.retry is None or s.retry.attempts == 1)
                for s in steps
            ),
            branch=branch,
        )

    def by_id(self, step_id: str) -> AnyStep:
        """The step with id ``step_id`` (``KeyError`` if absent)."""
        return self.steps[self.index[step_id]]

    def next_index(self, current: int, action: Any) -> int:
        """Where ``action`` (``continue``/``end``/goto) leads; ``len(steps)`` means the end."""
        if action == "continue":
            return current + 1
        if isinstance(action, GotoAction):
            return self.index[action.goto]
        return len(self.steps)


PlanKey = tuple[str, str, int, str]
"""(tenant_id, workflow_id, version, branch or ``""``)."""


class PlanCache:
    """LRU of plans keyed by :data:`PlanKey`: versions are immutable. ``maxsize`` is
    ``WORKFLOW_CACHE_SIZE`` (as the store's ``DefinitionCache``; a plan holds the same parsed
    definition, so the two share it)."""

    def __init__(self, maxsize: int = 10_000) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[PlanKey, Plan] = OrderedDict()

    def get(self, key: PlanKey) -> Plan | None:
        plan = self._items.get(key)
        if plan is not None:
            self._items.move_to_end(key)
        return plan

    def put(self, key: PlanKey, plan: Plan) -> None:
        self._items[key] = plan
        self._items.move_to_end(key)
        while len(self._items) > self.maxsize:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class OutputRejected(PermanentStepError):
    """A step's output cannot be stored. Permanent: running the step again cannot shrink it."""

    code: ClassVar[str]
    """Stable, machine-readable: the ``code`` of the step's (and execution's) error."""


class OutputTooLarge(OutputRejected):
    """A step's output is larger than ``STEP_OUTPUT_MAX_BYTES``."""

    code = "output_too_large"


class OutputNotJson(OutputRejected):
    """A step's output is not JSON (a custom step runner returned e.g. a datetime or NaN)."""

    code = "output_not_json"


@dataclass(frozen=True, slots=True)
class Encoded:
    """A JSON value ready to store: the value (NUL characters replaced) and its text."""

    value: Any
    text: str | None


NO_OUTPUT = Encoded(None, None)


def encode_output(step: AnyStep, value: Any, max_bytes: int) -> Encoded:
    """Serialise ``step``'s output for storage.

    Raises :class:`OutputTooLarge` above ``max_bytes`` (UTF-8 bytes of its JSON text) and
    :class:`OutputNotJson` when it is not JSON. Nothing is ever truncated: a later step
    must never read a stand-in as if it were the data.
    """
    return _encode(
        value,
        max_bytes,
        lambda: f"step {step.id!r}",
        lambda size: _too_large(step, size, max_bytes),
    )


OUTPUT_EXPRESSION = "the workflow's output expression"


def encode_execution_output(value: Any, max_bytes: int) -> Encoded:
    """Serialise the value of the workflow's ``output`` expression for storage, against the
    same limit as a step's output (:class:`OutputTooLarge`, :class:`OutputNotJson`)."""

    def too_large(size: int) -> str:
        return (
            f"{OUTPUT_EXPRESSION} produced {size:,} bytes; the limit is {max_bytes:,} "
            "(STEP_OUTPUT_MAX_BYTES)"
        )

    return _encode(value, max_bytes, lambda: OUTPUT_EXPRESSION, too_large)


def _encode(
    value: Any, max_bytes: int, who: Callable[[], str], too_large: Callable[[int], str]
) -> Encoded:
    """``value`` encoded; ``who`` (what produced it) is only built for an error's message."""
    if value is None:
        return NO_OUTPUT
    try:
        text = dumps(value)
    except (TypeError, ValueError, RecursionError) as exc:
        reason = str(exc)[:300] or type(exc).__name__
        raise OutputNotJson(f"{who()} produced output that is not JSON: {reason}") from None
    value, text = storable_text(value, text)  # no NUL, no lone surrogate (U+FFFD instead)
    size = _size(text)
    if size > max_bytes:
        raise OutputTooLarge(too_large(size), size_bytes=size, limit_bytes=max_bytes)
    return Encoded(value, text)


TRUNCATED = "[truncated]"
"""The key of the marker that stands in a recorded input for a value too large to keep:
``{"[truncated]": {"size_bytes", "limit_bytes"}, "preview": <its start, as text>}``."""
NOT_JSON = "[not JSON]"
"""The key of what a recorded input that is not JSON (a custom runner's) is replaced by."""


def encode_input(value: Any, max_bytes: int) -> Encoded:
    """Serialise what a step did (its run's recorded ``input``) for storage. Never raises.

    Diagnostic data, so unlike an output it is cut rather than refused when its JSON text is
    above ``max_bytes``: the largest members of an object first, each replaced by a
    :data:`TRUNCATED` marker with as long a preview as fits, then, if that is not enough, the
    whole value. A value that is not JSON (a custom runner's) is recorded as
    ``{"[not JSON]": <why>}``.
    """
    try:
        text = dumps(value)
    except (TypeError, ValueError, RecursionError) as exc:
        value = {NOT_JSON: str(exc)[:300] or type(exc).__name__}
        text = dumps(value)
    value, text = storable_text(value, text)
    size = _size(text)
    if size <= max_bytes:
        return Encoded(value, text)
    if isinstance(value, dict) and value:
        texts = {key: dumps(member) for key, member in value.items()}
        kept = dict(value)
        for key in sorted(texts, key=lambda k: _size(texts[k]), reverse=True):
            kept[key] = _marker(value[key], texts[key], kept, key, max_bytes)
            kept_text = dumps(kept)
            if _size(kept_text) <= max_bytes:
                return Encoded(kept, kept_text)
    whole = _marker(value, text, None, None, max_bytes)
    return Encoded(whole, dumps(whole))


def _marker(
    value: Any, text: str, around: dict[Any, Any] | None, key: Any, max_bytes: int
) -> dict[str, Any]:
    """A :data:`TRUNCATED` marker for ``value`` (JSON ``text``) with the longest preview that
    keeps the document — ``around`` with the marker at ``key``, or the marker alone — within
    ``max_bytes`` (an empty one when nothing fits)."""
    marker: dict[str, Any] = {
        TRUNCATED: {"size_bytes": _size(text), "limit_bytes": max_bytes},
        "preview": "",
    }
    document = marker if around is None else {**around, key: marker}
    budget = max_bytes - _size(dumps(document))
    source = value if isinstance(value, str) else text
    length = min(len(source), max(budget, 0))
    while length > 0:
        cost = _size(dumps(source[:length])) - 2  # its quotes are already counted
        if cost <= budget:
            break
        length = min(length - 1, length * budget // cost)
    marker["preview"] = source[: max(length, 0)]
    return marker


def _size(text: str) -> int:
    """UTF-8 bytes of ``text``."""
    return len(text) if text.isascii() else len(text.encode())


def _too_large(step: AnyStep, size: int, limit: int) -> str:
    message = (
        f"step {step.id!r} produced {size:,} bytes of output; the limit is {limit:,} "
        "(STEP_OUTPUT_MAX_BYTES)"
    )
    if not isinstance(step, SELECTING_STEPS):
        return message
    if step.select is None:
        return f"{message}: keep only what later steps need with `select`"
    return f"{message}: `select` less (the limit applies to the selected value)"


def describe_error(exc: BaseException) -> dict[str, Any]:
    """A JSON description of a step error (type, code for rejected outputs, message,
    JSON-safe details)."""
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    # storable as the outputs are: a message may quote a value (a lone surrogate, a NUL)
    text = without_surrogates(str(message)[:2000].replace("\x00", "\ufffd"))
    error: dict[str, Any] = {"type": type(exc).__name__}
    if isinstance(exc, OutputRejected):
        error["code"] = exc.code
    error["message"] = text
    details = exc.details if isinstance(exc, ConveyorError) else None
    if details:
        try:
            encoded = dumps(details)
        except (TypeError, ValueError, RecursionError):
            encoded = dumps({"repr": repr(details)[:1000]})
        error["details"] = json.loads(without_surrogates(without_nul(encoded)))
    return error
