"""Per-version execution plans (cached) and JSON encoding of step results (with their limit)."""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, ClassVar

from conveyor.errors import ConveyorError, PermanentStepError
from conveyor.store import dumps, has_nul, without_nul
from conveyor.workflows import (
    ConditionStep,
    DelayStep,
    GotoAction,
    HttpStep,
    NoopStep,
    TransformStep,
    WorkflowDefinition,
)
from conveyor.workflows.steps import AnyStep

__all__ = [
    "NO_OUTPUT",
    "Encoded",
    "OutputNotJson",
    "OutputRejected",
    "OutputTooLarge",
    "Plan",
    "PlanCache",
    "describe_error",
    "encode_output",
]

LOCAL_STEPS = (NoopStep, TransformStep, ConditionStep, DelayStep)
SELECTING_STEPS = (HttpStep, TransformStep)
"""Step types with a ``select`` field."""


@dataclass(frozen=True, slots=True)
class Plan:
    """A workflow version prepared for running: steps, their positions, recorded inputs."""

    definition: WorkflowDefinition
    steps: tuple[AnyStep, ...]
    index: dict[str, int]
    inputs: tuple[Any, ...]
    """What a step run records as its ``input``: the step's definition document."""
    inputs_json: tuple[str, ...]
    local: tuple[bool, ...]
    """Steps that never wait on I/O (run inline, no lease-renewal task)."""

    @classmethod
    def build(cls, definition: WorkflowDefinition) -> Plan:
        steps = tuple(definition.steps)
        inputs = tuple(s.model_dump(mode="json", by_alias=True, exclude_unset=True) for s in steps)
        return cls(
            definition=definition,
            steps=steps,
            index={s.id: i for i, s in enumerate(steps)},
            inputs=inputs,
            inputs_json=tuple(dumps(i) for i in inputs),
            local=tuple(isinstance(s, LOCAL_STEPS) for s in steps),
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


class PlanCache:
    """LRU of plans keyed by (tenant_id, workflow_id, version): versions are immutable."""

    def __init__(self, maxsize: int = 1024) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[tuple[str, str, int], Plan] = OrderedDict()

    def get(self, key: tuple[str, str, int]) -> Plan | None:
        plan = self._items.get(key)
        if plan is not None:
            self._items.move_to_end(key)
        return plan

    def put(self, key: tuple[str, str, int], plan: Plan) -> None:
        self._items[key] = plan
        self._items.move_to_end(key)
        while len(self._items) > self.maxsize:
            self._items.popitem(last=False)


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
    if value is None:
        return NO_OUTPUT
    try:
        text = dumps(value)
    except (TypeError, ValueError, RecursionError) as exc:
        reason = str(exc)[:300] or type(exc).__name__
        raise OutputNotJson(
            f"step {step.id!r} produced output that is not JSON: {reason}"
        ) from None
    if has_nul(text):  # Postgres cannot store NUL characters in JSON
        text = without_nul(text)
        value = json.loads(text)
    size = len(text) if text.isascii() else len(text.encode())
    if size > max_bytes:
        raise OutputTooLarge(
            _too_large(step, size, max_bytes), size_bytes=size, limit_bytes=max_bytes
        )
    return Encoded(value, text)


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
    text = str(message)[:2000].replace("\x00", "\ufffd")
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
        error["details"] = json.loads(without_nul(encoded))
    return error
