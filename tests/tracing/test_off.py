"""Tracing off (no OTLP endpoint): the enqueue and run paths create no span, no context, no
trace string — every tracing entry point and span constructor fails the test if reached."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, NoReturn

import pytest
from opentelemetry import trace as otel_trace

from conveyor import tracing
from conveyor.dispatch import keys
from conveyor.queue import WorkflowExecute
from conveyor.settings import Settings
from tests.worker._support import http_recorder
from tests.worker.test_runner import job, runner_for


def _boom(*_args: Any, **_kwargs: Any) -> NoReturn:
    raise AssertionError("tracing used while it is off")


class _Exploding:
    def __getattr__(self, name: str) -> NoReturn:
        raise AssertionError(f"tracer.{name} used while tracing is off")


@pytest.fixture
def tracing_forbidden(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    assert tracing.enabled is False
    for name in ("start_span", "inject", "extract", "set_attributes", "mark_error",
                 "current_trace_id"):  # fmt: skip
        monkeypatch.setattr(tracing, name, _boom)
    monkeypatch.setattr(tracing, "_tracer", _Exploding())
    monkeypatch.setattr(otel_trace, "get_current_span", _boom)
    monkeypatch.setattr(otel_trace.NonRecordingSpan, "__init__", _boom)
    monkeypatch.setattr(otel_trace.SpanContext, "__new__", _boom)
    from opentelemetry.sdk import trace as sdk_trace

    monkeypatch.setattr(sdk_trace.Span, "__init__", _boom)
    yield


def test_configure_without_endpoint_stays_off(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    assert tracing.configure("worker") is False
    assert tracing.enabled is False
    tracing.shutdown()  # a no-op when off


def test_endpoint_from_the_standard_variables() -> None:
    base = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}
    assert tracing.traces_endpoint(base) == "http://collector:4318/v1/traces"
    own = {**base, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4318/custom"}
    assert tracing.traces_endpoint(own) == "http://t:4318/custom"
    assert tracing.traces_endpoint({**base, "OTEL_SDK_DISABLED": "true"}) is None
    assert tracing.traces_endpoint({**base, "OTEL_TRACES_EXPORTER": "none"}) is None
    assert tracing.traces_endpoint({}) is None


@pytest.mark.usefixtures("tracing_forbidden")
async def test_enqueue_and_run_create_no_span_when_off(wsettings: Settings) -> None:
    settings = wsettings.model_copy(update={"http_allowlist": ("127.0.0.1",)})
    with http_recorder() as target:
        async with runner_for(settings) as (runner, s):
            tenant = await s.tenant()
            wf = await s.workflow(tenant, [{"id": "call", "type": "http", "url": target.url("/x")}])
            (ex,) = await s.executions(tenant, wf, [None], dispatch=False)
            payload = WorkflowExecute(
                execution_id=ex, tenant_id=tenant, workflow_id=wf, region="us"
            )
            await s.dispatcher.enqueue(payload)
            key = keys.job(settings.queue_prefix, s.dispatcher.queue("us").name, ex)
            raw = await s.queues.redis.hget(key, "data")
            assert raw is not None
            data = json.loads(raw)
            result = await runner.process(*job(ex, tenant))
    assert result["status"] == "succeeded"
    (hit,) = target.hits
    assert "traceparent" not in hit.headers and "tracestate" not in hit.headers
    assert data["executionId"] == ex and "traceparent" not in data
