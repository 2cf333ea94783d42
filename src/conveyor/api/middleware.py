"""Pure ASGI middleware: request body limit, HTTP metrics, last-resort error shape.

Both are plain ASGI callables (no ``BaseHTTPMiddleware``): they add no task per request and
never buffer the body.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conveyor.api.errors import ApiError, error_body

log = logging.getLogger(__name__)


class BodyTooLarge(ApiError):
    """Raised from ``receive()`` once more than the allowed number of body bytes arrived."""

    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            "payload_too_large",
            f"The request body exceeds the limit of {limit} bytes.",
            {"limitBytes": limit},
        )


async def send_error(send: Send, status: int, code: str, message: str, details: Any = None) -> None:
    body = json.dumps(error_body(code, message, details)).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _declared_length(scope: Scope) -> int | None:
    """The request's Content-Length; ``None`` if absent, -1 if malformed."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                return -1
            return declared if declared >= 0 else -1
    return None


class BodyLimitMiddleware:
    """Refuse request bodies larger than ``max_bytes`` with 413, without buffering them.

    A ``Content-Length`` above the limit is refused before the application runs; a body sent
    without one (chunked) is counted as it is received and the read that crosses the limit
    raises :class:`BodyTooLarge`, which the error handlers render as 413.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        declared = _declared_length(scope)
        if declared == -1:
            await send_error(send, 400, "bad_request", "Content-Length is not a number.")
            return
        if declared is not None and declared > limit:
            exc = BodyTooLarge(limit)
            await send_error(send, 413, exc.code, exc.message, exc.details)
            return

        received = 0

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:
            if started:
                raise
            await send_error(send, 413, exc.code, exc.message, exc.details)


class HttpMetrics:
    """Prometheus HTTP request metrics, registered in the app's own registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "conveyor_http_requests",
            "HTTP requests answered, by method, route template and status.",
            ["method", "route", "status"],
            registry=registry,
        )
        self.duration = Histogram(
            "conveyor_http_request_duration_seconds",
            "HTTP request duration, by method and route template.",
            ["method", "route"],
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
        )
        # Labelled children per (method, route, status): ``labels()`` takes a lock and builds
        # keys on every call; the label sets are bounded (route templates), so keep them.
        self._children: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    def observe(self, method: str, route: str, status: str, seconds: float) -> None:
        """Count one answered request and record its duration."""
        key = (method, route, status)
        children = self._children.get(key)
        if children is None:
            children = (
                self.requests.labels(method, route, status),
                self.duration.labels(method, route),
            )
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)


class RequestMetricsMiddleware:
    """Count and time every HTTP request; turn an escaped exception into the 500 error shape.

    The route label is the matched route template (``/api/executions/{execution_id}``), or
    ``unmatched``, so that label cardinality stays bounded.
    """

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                status = int(message["status"])
                started = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception as exc:
            log.error(
                "api.unhandled_error",
                extra={"path": scope.get("path"), "error": repr(exc)},
                exc_info=(type(exc), exc, exc.__traceback__),
            )
            if started:
                raise
            status = 500
            await send_error(send, 500, "internal_error", "Internal server error.")
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = str(scope.get("method", ""))
            self.metrics.observe(method, template, str(status), time.perf_counter() - start)
