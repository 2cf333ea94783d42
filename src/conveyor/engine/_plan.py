"""Per-version execution plans (cached) and JSON encoding of step results."""

from __future__ import annotations

import json
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from conveyor.errors import ConveyorError
from conveyor.store import dumps, has_nul, without_nul
from conveyor.workflows import (
    ConditionStep,
    DelayStep,
    GotoAction,
    NoopStep,
    TransformStep,
    WorkflowDefinition,
)
from conveyor.workflows.steps import AnyStep

__all__ = ["Encoded", "Plan", "PlanCache", "describe_error", "encode"]

LOCAL_STEPS = (NoopStep, TransformStep, ConditionStep, DelayStep)
_PREVIEW_BYTES = 1024


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


@dataclass(frozen=True, slots=True)
class Encoded:
    """A JSON value ready to store: the value (possibly the truncation marker) and its text."""

    value: Any
    text: str | None
    truncated: bool


_NONE = Encoded(None, None, False)


def encode(value: Any, max_bytes: int) -> Encoded:
    """Serialise ``value``; above ``max_bytes`` store a marker with a preview instead."""
    if value is None:
        return _NONE
    try:
        text = dumps(value)
    except (TypeError, ValueError, RecursionError) as exc:
        value = {"truncated": True, "reason": f"not JSON-serialisable: {exc}"[:500]}
        return Encoded(value, dumps(value), True)
    if has_nul(text):  # Postgres cannot store NUL characters in JSON
        text = without_nul(text)
        value = json.loads(text)
    size = len(text) if text.isascii() else len(text.encode())
    if size <= max_bytes:
        return Encoded(value, text, False)
    preview = text.encode()[: min(_PREVIEW_BYTES, max_bytes // 2)].decode(errors="ignore")
    marker = {"truncated": True, "size_bytes": size, "limit_bytes": max_bytes, "preview": preview}
    return Encoded(marker, dumps(marker), True)


def describe_error(exc: BaseException) -> dict[str, Any]:
    """A JSON description of a step error (type, message, JSON-safe details)."""
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    text = str(message)[:2000].replace("\x00", "\ufffd")
    error: dict[str, Any] = {"type": type(exc).__name__, "message": text}
    details = exc.details if isinstance(exc, ConveyorError) else None
    if details:
        try:
            encoded = dumps(details)
        except (TypeError, ValueError, RecursionError):
            encoded = dumps({"repr": repr(details)[:1000]})
        error["details"] = json.loads(without_nul(encoded))
    return error
