"""Pure ASGI middleware: request body limits, HTTP metrics, last-resort error shape.

Both are plain ASGI callables (no ``BaseHTTPMiddleware``): they add no task per request and
never copy the body (a JSON body with more than one chunk aside, joined once to check its
depth).
"""

from __future__ import annotations

import functools
import json
import logging
import re
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conveyor.api.errors import MALFORMED_JSON, ApiError, error_body, text_position

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


MAX_JSON_DEPTH = 128
"""The deepest nesting of arrays and objects accepted in a JSON request body.

Python's parser fails at a depth that depends on the call stack (``RecursionError``, so the
fast lane and FastAPI would disagree near it) and pydantic refuses to serialise beyond 255
levels (an accepted trigger would answer 500); one fixed, lower limit checked before any
parser runs gives every route and both paths the same answer."""


class JsonTooDeep(ApiError):
    """Raised from ``receive()`` when the whole body is read and nests deeper than allowed."""

    def __init__(self, limit: int, line: int, column: int) -> None:
        message = f"Arrays and objects are nested deeper than {limit} levels."
        super().__init__(
            400,
            MALFORMED_JSON,
            "The request body is nested too deeply.",
            [{"line": line, "column": column, "message": message}],
        )


_STRING = rb'"[^"\\]*+(?:\\.?[^"\\]*+)*+(?:"|\Z)'
"""A JSON string; an unterminated one runs to the end of the body."""
_NEUTRAL = rb"(?:" + _STRING + rb'|[^"\[\]{}]++)'
"""A string or a run of bytes that are neither brackets nor quotes."""


@functools.cache
def _depth_pattern(limit: int) -> re.Pattern[bytes]:
    r"""Matches a whole body, setting group ``deep`` at the first ``[`` or ``{`` (outside
    strings) nested deeper than ``limit``.

    One level of the pattern per level of nesting, ``A(0) = N*+ (?:(?=[[{]) (?P<deep>) .*)?``
    and ``A(j) = (?:N | [[{] A(j-1) (?:[]}] | \Z))*+``, where ``N`` is a string or plain
    bytes: every quantifier is possessive and each byte decides the branch, so the match is
    one pass in C, without backtracking. At the first opener too deep, ``A(0)`` records its
    offset and consumes the rest, so every enclosing level ends at once. A closer without an
    opener is ignored, and so is everything after an unterminated string: the parser refuses
    such bodies anyway, before it nests deeper than this pattern looked.
    """
    level = _NEUTRAL + rb"*+(?:(?=[\[{])(?P<deep>).*)?"
    for _ in range(limit - 1):
        level = rb"(?:" + _NEUTRAL + rb"|[\[{]" + level + rb"(?:[\]}]|\Z))*+"
    top = rb"(?:" + _NEUTRAL + rb"|[\]}]|[\[{]" + level + rb"(?:[\]}]|\Z))*+"
    return re.compile(top, re.DOTALL)


def too_deep_at(body: bytes, limit: int) -> int | None:
    """The offset of the first ``[`` or ``{`` outside strings nested deeper than ``limit``
    (``limit >= 1``) in UTF-8 ``body``; ``None`` if there is none. Linear in its size."""
    match = _depth_pattern(limit).match(body)
    if match is None or match.group("deep") is None:
        return None
    return match.start("deep")


def json_too_deep(body: bytes, limit: int) -> JsonTooDeep | None:
    """The error for a body :func:`json.loads` would read nested deeper than ``limit``.

    Like the parser, a body in UTF-16 or UTF-32 is decoded first (its multi-byte characters
    could otherwise hide brackets); a body it cannot decode never reaches the parser.
    """
    encoding = json.detect_encoding(body)
    if encoding not in ("utf-8", "utf-8-sig"):
        try:
            body = body.decode(encoding, "surrogatepass").encode("utf-8", "surrogatepass")
        except UnicodeError:
            return None
    offset = too_deep_at(body, limit)
    if offset is None:
        return None
    return JsonTooDeep(limit, *text_position(body, offset))


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


def _body_headers(scope: Scope) -> tuple[int | None, bool]:
    """The request's Content-Length (``None`` if absent, -1 if malformed), and whether some
    route may parse its body as JSON: FastAPI parses ``application/json`` and
    ``application/*+json``, the webhooks any ``…json…`` type and a body without one."""
    declared: int | None = None
    content_types = 0
    json_type = False
    for name, value in scope.get("headers", ()):
        if name == b"content-length" and declared is None:
            try:
                declared = int(value)
            except ValueError:
                declared = -1
            if declared < 0:
                declared = -1
        elif name == b"content-type":
            content_types += 1
            json_type = json_type or b"json" in value or b"json" in value.lower()
    return declared, json_type or not content_types


class BodyLimitMiddleware:
    """Refuse request bodies larger than ``max_bytes`` (413) or JSON bodies nested deeper
    than ``max_depth`` (400 ``malformed_json``), without buffering them.

    A ``Content-Length`` above the limit is refused before the application runs; a body sent
    without one (chunked) is counted as it is received and the read that crosses the limit
    raises :class:`BodyTooLarge`, which the error handlers render as 413.

    The depth of a body some route may parse as JSON is checked when its last chunk arrives,
    before any parser runs: that read raises :class:`JsonTooDeep`. Earlier chunks are kept by
    reference (the application reads the whole body anyway). A body of at most ``max_depth``
    bytes costs nothing more; a longer one is joined and its ``[`` and ``{`` counted; only one
    with more of them than ``max_depth`` is scanned (:func:`json_too_deep`).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, max_depth: int = MAX_JSON_DEPTH) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.max_depth = max_depth
        _depth_pattern(max_depth)  # compiled now (tens of ms), not during a request

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.max_bytes
        declared, json_body = _body_headers(scope)
        if declared == -1:
            await send_error(send, 400, "bad_request", "Content-Length is not a number.")
            return
        if declared is not None and declared > limit:
            exc = BodyTooLarge(limit)
            await send_error(send, 413, exc.code, exc.message, exc.details)
            return

        limited_receive = _limited(receive, limit, self.max_depth if json_body else None)
        started = False

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except (BodyTooLarge, JsonTooDeep) as exc:
            if started:
                raise
            await send_error(send, exc.status_code, exc.code, exc.message, exc.details)


def _limited(receive: Receive, max_bytes: int, max_depth: int | None) -> Receive:
    """``receive`` that raises :class:`BodyTooLarge` past ``max_bytes`` and, unless
    ``max_depth`` is ``None``, :class:`JsonTooDeep` with the last chunk of a body too deep."""
    received = 0
    chunks: list[bytes] = []

    async def limited_receive() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            chunk = message.get("body", b"")
            received += len(chunk)
            if received > max_bytes:
                raise BodyTooLarge(max_bytes)
            if max_depth is not None:
                if message.get("more_body", False):
                    chunks.append(chunk)
                elif received > max_depth:  # a shorter body cannot nest deeper
                    _check_depth((*chunks, chunk), max_depth)
        return message

    return limited_receive


def _check_depth(chunks: tuple[bytes, ...], max_depth: int) -> None:
    """Raise :class:`JsonTooDeep` if the body of ``chunks`` nests deeper than ``max_depth``.

    A body with no more ``[`` and ``{`` than levels allowed (nearly every body) cannot:
    counting them is all it costs. Only the others are scanned (:func:`json_too_deep`).
    """
    body = b"".join(chunks)  # one chunk: that chunk, not a copy
    if body.count(b"[") + body.count(b"{") > max_depth:
        error = json_too_deep(body, max_depth)
        if error is not None:
            raise error


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

    The route label is the matched route template (``/api/executions/{executionId}``), or
    ``unmatched``, so that label cardinality stays bounded. It is read from ``scope["route"]``,
    which FastAPI's router sets — and the fast lane, for the routes it serves, as soon as their
    path matches (so its answers, errors included, carry the same template).
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
