"""Log lines carry ``execution_id`` (bound by the worker and the API) and ``trace_id`` (while a
span is current, tracing on only)."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from conveyor import tracing
from conveyor.logs import EXECUTION_ID, configure_logging
from conveyor.settings import load_settings

log = logging.getLogger("conveyor.tests.tracing")


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    out = io.StringIO()
    configure_logging(load_settings({"LOG_FORMAT": "json", "LOG_LEVEL": "INFO"}), stream=out)
    yield out
    root.handlers[:], root.level = handlers, level


def _lines(out: io.StringIO) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    return [line for line in lines if line["logger"] == log.name]


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    # not the global provider: other tests in this process must stay untraced
    assert tracing.configure("test", exporter=exporter, install_global=False)
    yield exporter
    tracing.shutdown()
    assert tracing.enabled is False


def test_lines_carry_the_bound_execution_id(json_log: io.StringIO) -> None:
    log.info("before")
    token = EXECUTION_ID.set("ex-1")
    try:
        log.info("during")
        log.info("explicit", extra={"execution_id": "ex-given"})
    finally:
        EXECUTION_ID.reset(token)
    log.info("after")
    before, during, explicit, after = _lines(json_log)
    assert "execution_id" not in before and "execution_id" not in after
    assert during["execution_id"] == "ex-1"
    assert explicit["execution_id"] == "ex-given"
    assert all("trace_id" not in line for line in (before, during, after)), "tracing is off"


def test_lines_carry_the_current_trace_id(
    json_log: io.StringIO, spans: InMemorySpanExporter
) -> None:
    token = EXECUTION_ID.set("ex-2")
    try:
        with tracing.start_span("work") as span:
            log.info("inside")
        log.info("outside")
    finally:
        EXECUTION_ID.reset(token)
    inside, outside = _lines(json_log)
    assert inside["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert inside["execution_id"] == outside["execution_id"] == "ex-2"
    assert "trace_id" not in outside
    tracing.shutdown()
    assert [s.name for s in spans.get_finished_spans()] == ["work"]


def test_text_lines_too(spans: InMemorySpanExporter) -> None:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    out = io.StringIO()
    try:
        configure_logging(load_settings({"LOG_FORMAT": "text"}), stream=out)
        token = EXECUTION_ID.set("ex-3")
        with tracing.start_span("work"):
            log.warning("inside")
        EXECUTION_ID.reset(token)
    finally:
        root.handlers[:], root.level = handlers, level
    assert "execution_id=ex-3" in out.getvalue() and "trace_id=" in out.getvalue()


def test_traceparent_round_trip(spans: InMemorySpanExporter) -> None:
    assert tracing.inject() is None, "no current span: nothing to propagate"
    assert tracing.extract(None) is None and tracing.extract("garbage") is None
    with tracing.start_span("parent") as parent:
        traceparent = tracing.inject()
        headers: dict[str, str] = {}
        assert tracing.inject(headers) == traceparent == headers["traceparent"]
    assert traceparent is not None
    with tracing.start_span("child", context=tracing.extract(traceparent)) as child:
        pass
    assert child.get_span_context().trace_id == parent.get_span_context().trace_id
