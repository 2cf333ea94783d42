"""FastAPI's own OpenTelemetry signals follow Conveyor's tracing switch, decided when the app is
built: off, a request never asks OpenTelemetry whether a provider was set since (FastAPI's
default, three environment reads per request); on, FastAPI's request span goes to Conveyor's
provider and is the ``trigger`` span's parent. Real Postgres and Redis, spans in memory."""

from __future__ import annotations

from typing import Any, NoReturn

import pytest
from opentelemetry import trace as otel_trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from conveyor import tracing
from tests.api.conftest import make_settings, running_api


def _boom(*_args: Any, **_kwargs: Any) -> NoReturn:
    raise AssertionError("a request asked OpenTelemetry for a global provider")


async def test_tracing_off_a_request_never_looks_for_a_provider(
    api_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert tracing.enabled is False
    async with running_api(make_settings(**api_env)) as api:
        headers = await api.tenant()
        workflow_id = await api.workflow(headers)
        monkeypatch.setattr(otel_trace, "get_tracer_provider", _boom)
        url = f"/api/workflows/{workflow_id}/executions"
        r = await api.client.post(url, headers=headers, json={"input": {}})  # the fast lane
        assert r.status_code == 202, r.text
        r = await api.client.get("/api/workflows", headers=headers)  # FastAPI's own routing
        assert r.status_code == 200, r.text


async def test_tracing_on_fastapis_request_span_goes_to_conveyors_provider(
    api_env: dict[str, str],
) -> None:
    exporter = InMemorySpanExporter()
    assert tracing.configure("api", exporter=exporter, install_global=False)
    try:
        async with running_api(make_settings(**api_env)) as api:
            headers = await api.tenant()
            workflow_id = await api.workflow(headers)
            r = await api.client.post(
                f"/api/workflows/{workflow_id}/executions", headers=headers, json={"input": {}}
            )  # the fast lane's case
            assert r.status_code == 202, r.text
    finally:
        tracing.shutdown()  # flushes the batch
    spans = exporter.get_finished_spans()
    by_id = {s.context.span_id: s for s in spans if s.context is not None}
    (span,) = [s for s in spans if s.name == "trigger"]
    while span.parent is not None:  # up to the root: FastAPI's request span
        span = by_id[span.parent.span_id]
    assert span.kind == SpanKind.SERVER
    assert span.name == "POST /api/workflows/{workflowId}/executions"
