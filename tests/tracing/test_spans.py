"""The spans of the enqueue and run paths, in-process (real Postgres and Redis, spans kept in
memory): the job carries the producer's ``traceparent``; a job without one starts a new trace;
a deferred job is not an error."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from conveyor import tracing
from conveyor.dispatch import keys
from conveyor.queue import JobDeferred, WorkflowExecute
from conveyor.settings import Settings
from tests.worker._support import http_recorder
from tests.worker.test_runner import job, runner_for


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    assert tracing.configure("test", exporter=exporter, install_global=False)
    yield exporter
    tracing.shutdown()


def _finished(exporter: InMemorySpanExporter) -> list[ReadableSpan]:
    tracing.shutdown()  # flushes the batch
    return list(exporter.get_finished_spans())


def _hex(span: ReadableSpan) -> tuple[str, str]:
    ctx = span.get_span_context()
    assert ctx is not None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


async def test_job_carries_the_trace_to_the_worker(
    wsettings: Settings, exporter: InMemorySpanExporter
) -> None:
    settings = wsettings.model_copy(update={"http_allowlist": ("127.0.0.1",)})
    with http_recorder() as target:
        async with runner_for(settings) as (runner, s):
            tenant = await s.tenant()
            steps = [{"id": "call", "type": "http", "url": target.url("/x?token=secret")}]
            wf = await s.workflow(tenant, steps)
            (ex,) = await s.executions(tenant, wf, [None], dispatch=False)
            payload = WorkflowExecute(
                execution_id=ex, tenant_id=tenant, workflow_id=wf, region="us"
            )
            await s.dispatcher.enqueue(payload)  # no current span: a new trace (cron, timer)
            raw = await s.queues.redis.hget(
                keys.job(settings.queue_prefix, "workflow.execute.us", ex), "data"
            )
            assert raw is not None
            traceparent = json.loads(raw)["traceparent"]
            carried = payload.model_copy(update={"traceparent": traceparent})
            result = await runner.process(carried, job(ex, tenant)[1])
    assert result["status"] == "succeeded"
    spans = {span.name: span for span in _finished(exporter)}
    send, run = spans["send workflow.execute.us"], spans["process workflow.execute.us"]
    step, call = spans["step http"], spans["GET"]
    assert send.parent is None and send.kind is SpanKind.PRODUCER
    trace_id, send_id = _hex(send)
    assert traceparent.split("-")[1:3] == [trace_id, send_id]
    assert run.parent is not None and format(run.parent.span_id, "016x") == send_id
    assert {_hex(s)[0] for s in (run, step, call)} == {trace_id}
    assert call.attributes is not None and "secret" not in str(call.attributes["url.full"])
    (hit,) = target.hits
    assert hit.headers["traceparent"].split("-")[1:3] == list(_hex(call))


async def test_job_without_traceparent_starts_a_trace_and_deferral_is_no_error(
    wsettings: Settings, exporter: InMemorySpanExporter
) -> None:
    async with runner_for(wsettings) as (runner, s):
        tenant = await s.tenant()
        wf = await s.workflow(tenant, [{"id": "a", "type": "noop"}])
        (ex,) = await s.executions(tenant, wf, [None], dispatch=False)
        result = await runner.process(*job(ex, tenant))  # like a Node producer's job
        assert result["status"] == "succeeded"
        payload, ctx = job(ex, tenant)
        ctx.lock_lost.set()
        with pytest.raises(JobDeferred):
            await runner.process(payload, ctx)
    first, deferred = [s for s in _finished(exporter) if s.name.startswith("process ")]
    assert first.parent is None and first.kind is SpanKind.CONSUMER
    assert first.attributes is not None and first.attributes["conveyor.outcome"] == "succeeded"
    assert deferred.status.status_code is not StatusCode.ERROR
    assert deferred.attributes is not None and "conveyor.job.deferred" in deferred.attributes
