"""Typed job payloads: a registry from queue base name to a pydantic model.

A queue named ``workflow.execute.us`` resolves to the spec registered for
``workflow.execute`` (the longest registered dotted prefix wins). Payloads are JSON with
camelCase keys, so a Node.js BullMQ producer can write them; unknown keys are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from pydantic.alias_generators import to_camel

from conveyor.errors import PayloadInvalid
from conveyor.settings import Settings

EXECUTION_QUEUE = "workflow.execute"
_REGION_RE = r"^[a-z0-9][a-z0-9-]{0,31}$"
_INT_ID_RE = re.compile(r"^\d+$")

NonEmptyStr = Annotated[str, Field(min_length=1, max_length=200)]


def _is_none(value: object) -> bool:
    return value is None


class Payload(BaseModel):
    """Base for job payloads: snake_case attributes, camelCase JSON, unknown keys ignored."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        extra="ignore",
        frozen=True,
    )


class WorkflowExecute(Payload):
    """Run (or resume) one execution. Queue ``workflow.execute.<region>``."""

    execution_id: NonEmptyStr
    """The execution to run; also the job id, so enqueueing twice is harmless."""
    tenant_id: NonEmptyStr
    """The tenant owning the execution (used for per-tenant concurrency)."""
    workflow_id: NonEmptyStr
    """The workflow the execution belongs to."""
    region: Annotated[str, Field(pattern=_REGION_RE)]
    """The region whose workers run it (matches the queue name's suffix)."""
    workflow_version: int | None = None
    """The workflow version pinned when the execution was triggered."""
    enqueued_at: int | None = None
    """When it was enqueued, ms since the epoch (for enqueue-to-start latency)."""
    reason: str | None = None
    """Why it was enqueued: ``trigger``, ``timer``, ``schedule``, ``retry``, ``recovery``..."""
    traceparent: str | None = Field(default=None, max_length=128, exclude_if=_is_none)
    """W3C trace context of the enqueue (``00-<trace id>-<span id>-<flags>``), set when
    tracing is on; the worker's spans continue that trace. Absent (Node producers, tracing
    off; then not written either): the worker starts a new trace if it traces."""


DEFAULT_JOB_OPTIONS: Mapping[str, Any] = MappingProxyType(
    {
        "attempts": 5,
        "backoff": {"type": "exponential", "delay": 1000},
        "removeOnComplete": {"age": 24 * 3600, "count": 1000},
        "removeOnFail": {"age": 7 * 24 * 3600, "count": 10000},
    }
)
"""BullMQ job options for ``workflow.execute``: 5 attempts, exponential backoff from 1 s,
finished jobs kept for a bounded time and count (Redis must not grow without bound). The
bounds shown are the defaults of ``QUEUE_KEEP_COMPLETED``/``QUEUE_KEEP_FAILED``, which replace
them (:meth:`PayloadSpec.options_for`)."""

_KEEP_KEYS = ("removeOnComplete", "removeOnFail")


@dataclass(frozen=True)
class PayloadSpec:
    """How jobs of one queue family are validated, named and configured."""

    base_name: str
    """The registered name, e.g. ``workflow.execute``; also the BullMQ job name."""
    model: type[BaseModel]
    """The payload model; enqueue validates with it and the processor receives it."""
    job_options: Mapping[str, Any] = field(default_factory=lambda: DEFAULT_JOB_OPTIONS)
    """BullMQ default job options (attempts, backoff, removeOnComplete, removeOnFail)."""
    default_job_id: Callable[[Any], str | None] | None = None
    """Derives the job id from a payload when the caller gives none."""
    keep_from_settings: bool = True
    """``removeOnComplete``/``removeOnFail`` come from ``QUEUE_KEEP_COMPLETED`` /
    ``QUEUE_KEEP_FAILED`` (a registration that sets its own keeps them)."""

    def options_for(self, settings: Settings) -> dict[str, Any]:
        """The default job options of this queue family under ``settings``."""
        opts = dict(self.job_options)
        if self.keep_from_settings:
            opts["removeOnComplete"] = settings.queue_keep_completed.job_option()
            opts["removeOnFail"] = settings.queue_keep_failed.job_option()
        return opts

    def validate(self, queue: str, data: Any) -> BaseModel:
        """Validate raw job data (a dict from JSON) into the model, or raise PayloadInvalid."""
        try:
            return self.model.model_validate(data)
        except ValidationError as exc:
            raise payload_invalid(queue, exc) from None

    def dump(
        self, queue: str, payload: BaseModel | Mapping[str, Any]
    ) -> tuple[BaseModel, dict[str, Any]]:
        """Validate ``payload`` for enqueueing; return the model and its JSON-ready dict."""
        if type(payload) is not self.model:
            if isinstance(payload, BaseModel):
                payload = payload.model_dump(by_alias=True)
            payload = self.validate(queue, payload)
        assert isinstance(payload, BaseModel)
        return payload, payload.model_dump(mode="json", by_alias=True)


_REGISTRY: dict[str, PayloadSpec] = {}


def register_payload(
    base_name: str,
    model: type[BaseModel],
    *,
    job_options: Mapping[str, Any] | None = None,
    default_job_id: Callable[[Any], str | None] | None = None,
    replace: bool = False,
) -> PayloadSpec:
    """Register ``model`` for queues named ``base_name`` or ``base_name.<suffix>``."""
    if not base_name or base_name.startswith(".") or base_name.endswith("."):
        raise ValueError(f"invalid queue base name {base_name!r}")
    if base_name in _REGISTRY and not replace:
        raise ValueError(f"a payload model is already registered for {base_name!r}")
    spec = PayloadSpec(
        base_name=base_name,
        model=model,
        job_options=MappingProxyType(
            dict(job_options if job_options is not None else DEFAULT_JOB_OPTIONS)
        ),
        default_job_id=default_job_id,
        keep_from_settings=job_options is None or not any(k in job_options for k in _KEEP_KEYS),
    )
    _REGISTRY[base_name] = spec
    return spec


def unregister_payload(base_name: str) -> None:
    """Forget a registration (for tests that register their own models)."""
    _REGISTRY.pop(base_name, None)


def payload_spec(queue_name: str) -> PayloadSpec:
    """The spec for ``queue_name``: exact name first, then its dotted prefixes."""
    name = queue_name
    while True:
        spec = _REGISTRY.get(name)
        if spec is not None:
            return spec
        name, dot, _ = name.rpartition(".")
        if not dot:
            break
    known = ", ".join(sorted(_REGISTRY)) or "none"
    raise ValueError(
        f"no payload model registered for queue {queue_name!r} (registered: {known}); "
        "use conveyor.queue.register_payload()"
    )


def execution_queue_name(region: str) -> str:
    """``workflow.execute.<region>``: the queue an execution of ``region`` is sent to."""
    if not re.match(_REGION_RE, region):
        raise ValueError(f"invalid region {region!r}")
    return f"{EXECUTION_QUEUE}.{region}"


def check_job_id(job_id: str) -> str:
    """Refuse ids BullMQ would confuse with its own numeric ids."""
    if not job_id or _INT_ID_RE.match(job_id):
        raise ValueError(f"job id {job_id!r} must be a non-empty, non-integer string")
    return job_id


def describe_validation_error(exc: ValidationError) -> tuple[str, list[dict[str, str]]]:
    """One line naming every bad field, plus the structured list."""
    errors = [
        {"field": ".".join(str(p) for p in err["loc"]) or "(payload)", "message": err["msg"]}
        for err in exc.errors()
    ]
    return "; ".join(f"{e['field']}: {e['message']}" for e in errors), errors


def payload_invalid(queue: str, exc: ValidationError) -> PayloadInvalid:
    summary, errors = describe_validation_error(exc)
    return PayloadInvalid(
        f"invalid payload for queue {queue}: {summary}", queue=queue, errors=errors
    )


register_payload(
    EXECUTION_QUEUE,
    WorkflowExecute,
    default_job_id=lambda payload: payload.execution_id,
)


def job_options(spec: PayloadSpec, payload: BaseModel, opts: Mapping[str, Any]) -> dict[str, Any]:
    """BullMQ per-job options from Conveyor's (job id, priority, delay)."""
    out: dict[str, Any] = {}
    job_id = opts.get("job_id")
    if job_id is None and spec.default_job_id is not None:
        job_id = spec.default_job_id(payload)
    if job_id is not None:
        out["jobId"] = check_job_id(job_id)
    priority = opts.get("priority", 0)
    if priority:
        if not 0 < priority <= 2_097_152:
            raise ValueError("priority must be between 1 and 2097152 (0 = none)")
        out["priority"] = priority
    delay_ms = opts.get("delay_ms", 0)
    if delay_ms:
        if delay_ms < 0:
            raise ValueError("delay_ms must be >= 0")
        out["delay"] = int(delay_ms)
    return out
