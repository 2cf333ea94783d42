"""OpenTelemetry traces: one trace per execution, OFF unless an OTLP endpoint is configured.

Configured by the standard variables, read once per process by :func:`configure`:

* ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` (used as is) or ``OTEL_EXPORTER_OTLP_ENDPOINT``
  (``/v1/traces`` appended): where spans go, OTLP over HTTP/protobuf. Neither set → tracing
  stays off. ``OTEL_SDK_DISABLED=true`` or ``OTEL_TRACES_EXPORTER=none`` turn it off too.
* ``OTEL_SERVICE_NAME`` (default ``conveyor-<role>``), ``OTEL_RESOURCE_ATTRIBUTES``,
  ``OTEL_TRACES_SAMPLER``/``_ARG``, ``OTEL_BSP_*``, ``OTEL_EXPORTER_OTLP_HEADERS``/``_TIMEOUT``
  and the other ``OTEL_EXPORTER_OTLP_*`` variables are honoured by the SDK itself.

**Off costs nothing.** Callers on hot paths test the module attribute first —
``if tracing.enabled:`` (never ``from conveyor.tracing import enabled``, which copies the
value) — and create no span, context or string otherwise.

The trace context travels as a W3C ``traceparent`` string: in the job payload
(:class:`~conveyor.queue.WorkflowExecute.traceparent`) from the dispatcher to the worker, and
in the ``traceparent``/``tracestate`` headers of ``http`` steps' requests. Only the W3C trace
context is propagated, never baggage (it could carry data to third parties).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, MutableMapping
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

__all__ = [
    "Span",
    "SpanKind",
    "configure",
    "current_trace_id",
    "enabled",
    "extract",
    "inject",
    "mark_error",
    "set_attributes",
    "shutdown",
    "start_span",
    "tracer_provider",
    "traces_endpoint",
]

log = logging.getLogger(__name__)

enabled: bool = False
"""True once :func:`configure` installed an exporter; test it before any tracing work."""

SHUTDOWN_TIMEOUT_S = 5.0
"""Longest :func:`shutdown` waits for the last spans to be exported."""

_PROPAGATOR = TraceContextTextMapPropagator()
_provider: TracerProvider | None = None
_tracer: trace.Tracer = trace.NoOpTracer()


def traces_endpoint(environ: Mapping[str, str] | None = None) -> str | None:
    """The OTLP/HTTP traces URL the environment names, or ``None`` (tracing off)."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    if env.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower() == "none":
        return None
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    if endpoint:
        return endpoint
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    return f"{base.rstrip('/')}/v1/traces" if base else None


def configure(
    role: str, *, exporter: SpanExporter | None = None, install_global: bool = True
) -> bool:
    """Start tracing for this process (once, at start-up) if the environment asks for it.

    ``role`` names the process (``api``, ``worker``, ...): the default service name is
    ``conveyor-<role>``. ``exporter`` replaces the OTLP exporter (tests, embedding). Returns
    whether tracing is on. With ``install_global`` the provider also becomes OpenTelemetry's
    global one (if no other was set), so libraries that trace through the global API (FastAPI
    traces each request then) join the same traces.
    """
    endpoint = None
    if exporter is None:
        endpoint = traces_endpoint()
        if endpoint is None:
            return False
    try:
        _configure(role, endpoint, exporter, install_global)
    except Exception as exc:  # optional: a tracing problem never stops a process
        log.error("tracing.configure_failed", extra={"error": repr(exc)[:300]})
        return False
    return True


def _configure(
    role: str, endpoint: str | None, exporter: SpanExporter | None, install_global: bool
) -> None:
    global enabled, _provider, _tracer
    # imported here: a process with tracing off never loads the SDK
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    if exporter is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=endpoint)
    service = os.environ.get("OTEL_SERVICE_NAME", "").strip() or f"conveyor-{role}"
    # the sampler comes from OTEL_TRACES_SAMPLER (default: parent-based, always on)
    provider = TracerProvider(
        resource=Resource.create({SERVICE_NAME: service}), shutdown_on_exit=False
    )
    provider.add_span_processor(BatchSpanProcessor(exporter))
    if _provider is not None:
        shutdown()
    _provider = provider
    _tracer = provider.get_tracer("conveyor")
    if install_global and isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        trace.set_tracer_provider(provider)
    enabled = True
    log.info("tracing.configured", extra={"service": service, "endpoint": endpoint or "custom"})


def tracer_provider() -> TracerProvider | None:
    """This process's provider while tracing is on (:func:`configure`), else ``None``."""
    return _provider if enabled else None


def shutdown(timeout_s: float = SHUTDOWN_TIMEOUT_S) -> None:
    """Export the spans still buffered and stop tracing; waits at most ``timeout_s``.

    Idempotent; a no-op when tracing is off. An exporter that hangs is left behind (the
    export runs on a daemon thread), never holding the process up."""
    global enabled, _provider, _tracer
    provider, _provider = _provider, None
    enabled = False
    _tracer = trace.NoOpTracer()
    if provider is None:
        return

    def close() -> None:
        provider.force_flush(int(timeout_s * 1000))
        provider.shutdown()

    closer = threading.Thread(target=close, name="tracing-shutdown", daemon=True)
    closer.start()
    closer.join(timeout_s)
    if closer.is_alive():
        log.warning("tracing.shutdown_timeout", extra={"timeout_s": timeout_s})


def start_span(
    name: str,
    attributes: Mapping[str, Any] | None = None,
    *,
    kind: SpanKind = SpanKind.INTERNAL,
    context: Context | None = None,
    set_status_on_exception: bool = True,
) -> AbstractContextManager[Span]:
    """``with tracing.start_span(...) as span:`` — a span, current inside the block, child of
    ``context`` (from :func:`extract`) or of the current span. Call only when
    :data:`enabled`."""
    return _tracer.start_as_current_span(
        name,
        context=context,
        kind=kind,
        attributes=attributes,
        set_status_on_exception=set_status_on_exception,
    )


def inject(headers: MutableMapping[str, str] | None = None) -> str | None:
    """The current span's W3C ``traceparent`` (``None`` without a valid span); also writes
    ``traceparent`` and ``tracestate`` into ``headers`` when given."""
    carrier: MutableMapping[str, str] = {} if headers is None else headers
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent")


def extract(traceparent: str | None) -> Context | None:
    """The context a ``traceparent`` string continues; ``None`` (start a new trace) when it is
    absent or malformed."""
    if not traceparent:
        return None
    context = _PROPAGATOR.extract({"traceparent": traceparent})
    if not trace.get_current_span(context).get_span_context().is_valid:
        return None
    return context


def current_trace_id() -> str | None:
    """The current span's trace id as 32 hex digits, or ``None``."""
    span_context = trace.get_current_span().get_span_context()
    if not span_context.is_valid:
        return None
    return format(span_context.trace_id, "032x")


def set_attributes(attributes: Mapping[str, Any]) -> None:
    """Add ``attributes`` to the current span (if it records)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes(attributes)


def mark_error(description: str, span: Span | None = None) -> None:
    """Set ``span``'s (default: the current span's) status to ERROR with ``description``."""
    target = span if span is not None else trace.get_current_span()
    target.set_status(Status(StatusCode.ERROR, description))
