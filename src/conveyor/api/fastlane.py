"""A fast lane in front of FastAPI's routing for the hottest routes.

``POST /api/workflows/{workflowId}/executions`` (the trigger), ``GET /api/executions`` (the
list), ``GET /api/executions/{executionId}`` (an execution with its step runs) and ``GET
/api/health`` are what clients, consoles and probes call most. FastAPI's generic machinery
(route matching over every route, dependency solving, parameter models) costs more CPU than the
work of these routes, so :class:`FastLane` serves them directly — but only in the common,
well-formed case (for the list: only the known query parameters, each status one of the
statuses, ``limit`` a plain number within bounds, scalar parameters given once), and with the
SAME code: the route's own endpoint function and dependencies (:func:`require_tenant`),
the same request model (:class:`TriggerIn`), the same response model and serialisation, the
same exception handlers. Anything unusual — another content type, no ``Content-Length``, a
body that is not a JSON object, a parameter that fails validation, a root path, duplicate
headers — is handed to the FastAPI application untouched (the body already read is replayed),
so every error answer still comes from FastAPI itself.

It sits inside :class:`~conveyor.api.middleware.RequestMetricsMiddleware` and
:class:`~conveyor.api.middleware.BodyLimitMiddleware` (so metrics, the body limits and the
last-resort 500 apply unchanged) and, as soon as the path matches, sets ``scope["route"]`` to
the route, as the router would: the metrics label every request it sees with the route's
template. A body the parser refuses (``ValueError``, ``RecursionError``) is handed over like
any other, and the body limits raised by ``receive()`` are answered by the same exception
handler FastAPI would use. ``tests/api/test_fastlane.py`` checks that both paths give
byte-identical answers; ``tests/api/test_fastlane_property.py`` does so for generated bodies.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials
from fastapi.security.utils import get_authorization_scheme_param
from pydantic import TypeAdapter, ValidationError
from starlette.datastructures import QueryParams
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conveyor.api.context import ApiContext
from conveyor.api.deps import TenantAuth, require_tenant
from conveyor.api.routes import executions
from conveyor.api.routes import health as health_routes
from conveyor.api.routes.executions import get_execution, list_executions, trigger_execution
from conveyor.api.routes.health import health
from conveyor.api.schemas import Envelope, ExecutionOut, HealthData, Page, TriggerIn


def _telemetry_hook() -> Callable[..., None] | None:
    """What FastAPI's router calls on a match for its telemetry (private, hence looked up: a
    FastAPI without it leaves the request span named after the method alone)."""
    try:
        from fastapi.telemetry import _api
    except ImportError:  # pragma: no cover - a FastAPI without native telemetry
        return None
    hook: Callable[..., None] | None = getattr(_api, "_route_selected", None)
    return hook


_route_selected = _telemetry_hook()

__all__ = ["FastLane"]

TRIGGER_PATH = "/api/workflows/{workflowId}/executions"
HEALTH_PATH = "/api/health"
LIST_PATH = "/api/executions"
DETAIL_PATH = "/api/executions/{executionId}"
_TRIGGER_RE = re.compile(r"/api/workflows/([^/]+)/executions")
_DETAIL_PREFIX = "/api/executions/"
_STATUSES = frozenset(("queued", "running", "waiting", "succeeded", "failed", "cancelled"))
"""``ExecutionStatus``: a list's ``status`` values (anything else: FastAPI answers 422)."""
_LIMIT_RE = re.compile(r"[1-9][0-9]{0,2}")
_MAX_LIMIT = 200
_MAX_CURSOR = 512
_MAX_ID = 64
"""``workflowId`` path parameter: 1..64 characters (as declared on the route)."""
_MAX_IDEMPOTENCY_KEY = 255

_EXECUTION_OUT: TypeAdapter[Envelope[ExecutionOut]] = TypeAdapter(Envelope[ExecutionOut])
_HEALTH_OUT: TypeAdapter[Envelope[HealthData]] = TypeAdapter(Envelope[HealthData])
_LIST_OUT: TypeAdapter[Envelope[Page[ExecutionOut]]] = TypeAdapter(Envelope[Page[ExecutionOut]])

Handler = Callable[[Request, Exception], Awaitable[Response]]


class _Fallback(Exception):
    """Not the common case: let FastAPI handle the request."""


class _Headers:
    """The request headers the fast lane looks at (``None``: absent; duplicates → fallback)."""

    __slots__ = ("authorization", "content_length", "content_type", "idempotency_key")

    def __init__(self, scope: Scope) -> None:
        self.authorization: bytes | None = None
        self.content_type: bytes | None = None
        self.content_length: bytes | None = None
        self.idempotency_key: bytes | None = None
        for name, value in scope["headers"]:
            if name == b"authorization":
                self._set("authorization", value)
            elif name == b"content-type":
                self._set("content_type", value)
            elif name == b"content-length":
                self._set("content_length", value)
            elif name == b"idempotency-key":
                self._set("idempotency_key", value)

    def plain_json(self) -> bool:
        """A non-empty body of declared length, ``Content-Type: application/json`` exactly."""
        return (
            self.content_type is not None
            and self.content_type.lower() == b"application/json"
            and self.content_length is not None
            and self.content_length != b"0"
        )

    def _set(self, attr: str, value: bytes) -> None:
        if getattr(self, attr) is not None:
            raise _Fallback
        setattr(self, attr, value)


class FastLane:
    """Pure ASGI middleware serving the trigger and health routes without FastAPI's routing
    and dependency solving (see the module docstring for when it steps aside)."""

    def __init__(self, app: ASGIApp, api: FastAPI) -> None:
        self.app = app
        self.api = api
        self._routes: dict[tuple[str, str], APIRoute] | None = None
        self._handlers: dict[Any, Handler] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not scope.get("root_path"):
            method, path = scope["method"], scope["path"]
            if method == "POST" and path.endswith("/executions"):
                match = _TRIGGER_RE.fullmatch(path)
                if match is not None:
                    workflow_id = match.group(1)
                    route = self._route("POST", TRIGGER_PATH)
                    _enter_route(scope, route, {"workflowId": workflow_id})
                    await self._trigger(scope, receive, send, route, workflow_id)
                    return
            elif method == "GET" and path == HEALTH_PATH:
                _enter_route(scope, self._route("GET", HEALTH_PATH), {})
                await self._health(scope, receive, send)
                return
            elif method == "GET" and path == LIST_PATH:
                _enter_route(scope, self._route("GET", LIST_PATH), {})
                await self._list(scope, receive, send)
                return
            elif method == "GET" and path.startswith(_DETAIL_PREFIX):
                execution_id = path[len(_DETAIL_PREFIX) :]
                if execution_id and "/" not in execution_id:
                    route = self._route("GET", DETAIL_PATH)
                    _enter_route(scope, route, {"executionId": execution_id})
                    await self._detail(scope, receive, send, execution_id)
                    return
        await self.app(scope, receive, send)

    # --- the routes ------------------------------------------------------------------------
    # The route is entered in the scope as soon as the path matches, as the router does before
    # it reads the body: whatever answers (this lane, an exception handler, FastAPI after a
    # hand-over, the last-resort 500), the metrics label it with the route's template.
    async def _trigger(
        self, scope: Scope, receive: Receive, send: Send, route: APIRoute, workflow_id: str
    ) -> None:
        ctx = self._ctx()
        try:
            headers = _Headers(scope)
            if ctx is None or not headers.plain_json():
                raise _Fallback
        except _Fallback:
            await self.app(scope, receive, send)
            return
        received: list[Message] = []
        try:
            document = await _read_json(receive, received)
        except _Fallback:
            await self.app(scope, _replay(received, receive), send)
            return
        except HTTPException as exc:  # from ``receive()``: the body limits of the middleware
            await self._handle(exc, scope, receive, send)
            return
        receive = _replay(received, receive)
        # FastAPI's order: the body is read first, then the dependencies run (authentication
        # errors win over parameter errors), then the parameters are validated.
        try:
            auth = await require_tenant(ctx, _credentials(headers.authorization))
        except Exception as exc:
            await self._handle(exc, scope, receive, send)
            return
        try:
            key = _idempotency_key(headers.idempotency_key)
            if not 1 <= len(workflow_id) <= _MAX_ID:
                raise _Fallback
            body = TriggerIn.model_validate(document)
        except (_Fallback, ValidationError):
            await self.app(scope, receive, send)
            return
        sub = _sub_response()
        try:
            content = await trigger_execution(
                ctx, auth, workflow_id, sub, body=body, idempotency_key=key
            )
        except Exception as exc:
            await self._handle(exc, scope, receive, send)
            return
        payload = _EXECUTION_OUT.dump_json(_EXECUTION_OUT.validate_python(content), by_alias=True)
        await _respond(scope, receive, send, payload, sub.status_code or route.status_code, sub)

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        ctx = self._ctx()
        if ctx is None:
            await self.app(scope, receive, send)
            return
        await self._answer(scope, receive, send, health(ctx), _HEALTH_OUT)

    async def _list(self, scope: Scope, receive: Receive, send: Send) -> None:
        tenant = await self._tenant(scope, receive, send)
        if tenant is None:
            return
        # FastAPI's order: the dependencies (authentication) first, then the parameters.
        try:
            params = _list_params(scope)
        except _Fallback:
            await self.app(scope, receive, send)
            return
        ctx, auth = tenant
        await self._answer(scope, receive, send, list_executions(ctx, auth, **params), _LIST_OUT)

    async def _detail(self, scope: Scope, receive: Receive, send: Send, execution_id: str) -> None:
        tenant = await self._tenant(scope, receive, send)
        if tenant is None:
            return
        if len(execution_id) > _MAX_ID:
            await self.app(scope, receive, send)
            return
        ctx, auth = tenant
        content = get_execution(ctx, auth, execution_id)
        await self._answer(scope, receive, send, content, _EXECUTION_OUT)

    async def _tenant(
        self, scope: Scope, receive: Receive, send: Send
    ) -> tuple[ApiContext, TenantAuth] | None:
        """A GET's context and authenticated tenant; ``None`` once answered or handed over."""
        ctx = self._ctx()
        try:
            headers = _Headers(scope)
            if ctx is None:
                raise _Fallback
        except _Fallback:
            await self.app(scope, receive, send)
            return None
        try:
            return ctx, await require_tenant(ctx, _credentials(headers.authorization))
        except Exception as exc:
            await self._handle(exc, scope, receive, send)
            return None

    async def _answer(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        content: Awaitable[Any],
        adapter: TypeAdapter[Any],
    ) -> None:
        """Await the endpoint's ``content`` and send it serialised as the route's response
        model (200), or answer its exception with the application's handler."""
        try:
            result = await content
        except Exception as exc:
            await self._handle(exc, scope, receive, send)
            return
        payload = adapter.dump_json(adapter.validate_python(result), by_alias=True)
        await _respond(scope, receive, send, payload, None, None)

    # --- plumbing --------------------------------------------------------------------------
    def _ctx(self) -> ApiContext | None:
        ctx: ApiContext | None = getattr(self.api.state, "ctx", None)
        return ctx

    def _route(self, method: str, path: str) -> APIRoute:
        """The route object FastAPI would match (it labels the request metrics)."""
        if self._routes is None:
            self._routes = {
                (m, r.path): r
                for module in (executions, health_routes)
                for r in module.router.routes
                if isinstance(r, APIRoute)
                for m in r.methods or ()
            }
        return self._routes[(method, path)]

    async def _handle(self, exc: Exception, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer ``exc`` with the application's exception handler, as FastAPI's
        ``ExceptionMiddleware`` would; re-raise it when there is none (→ the last-resort 500
        of :class:`~conveyor.api.middleware.RequestMetricsMiddleware`)."""
        handler = self._handler_for(exc)
        if handler is None:
            raise exc
        response = await handler(Request(scope, receive), exc)
        await response(scope, receive, send)

    def _handler_for(self, exc: Exception) -> Handler | None:
        if self._handlers is None:
            # FastAPI hands the 500/Exception handler to ServerErrorMiddleware, not to
            # ExceptionMiddleware; mirror that.
            self._handlers = {
                key: handler
                for key, handler in self.api.exception_handlers.items()
                if key not in (500, Exception) and inspect.iscoroutinefunction(handler)
            }
        if isinstance(exc, HTTPException) and exc.status_code in self._handlers:
            return self._handlers[exc.status_code]
        for cls in type(exc).__mro__:
            if cls in self._handlers:
                return self._handlers[cls]
        return None


async def _read_json(receive: Receive, received: list[Message]) -> Any:
    """The whole request body parsed as a JSON object; ``_Fallback`` for anything else."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        received.append(message)
        if message["type"] != "http.request":
            raise _Fallback
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    try:
        document = json.loads(b"".join(chunks))
    except (ValueError, RecursionError):  # FastAPI parses it again and answers
        raise _Fallback from None
    if not isinstance(document, dict):
        raise _Fallback
    return document


def _list_params(scope: Scope) -> dict[str, Any]:
    """``GET /api/executions``'s parameters as the route declares them, parsed as Starlette
    does; ``_Fallback`` for anything FastAPI might answer otherwise (an unknown or repeated
    parameter, an empty value, a status that is not one, a limit that is not a plain number
    within 1..200, an over-long workflow id or cursor)."""
    status: list[str] = []
    seen: dict[str, str] = {}
    for name, value in QueryParams(scope["query_string"]).multi_items():
        if not value:
            raise _Fallback
        if name == "status":
            if value not in _STATUSES:
                raise _Fallback
            status.append(value)
        elif name in ("workflowId", "limit", "cursor") and name not in seen:
            seen[name] = value
        else:
            raise _Fallback
    limit = seen.get("limit", "50")
    workflow_id = seen.get("workflowId")
    cursor = seen.get("cursor")
    if _LIMIT_RE.fullmatch(limit) is None or int(limit) > _MAX_LIMIT:
        raise _Fallback
    if (workflow_id is not None and len(workflow_id) > _MAX_ID) or (
        cursor is not None and len(cursor) > _MAX_CURSOR
    ):
        raise _Fallback
    return {
        "status": status or None,
        "workflow_id": workflow_id,
        "limit": int(limit),
        "cursor": cursor,
    }


def _replay(received: list[Message], receive: Receive) -> Receive:
    """``receive`` that first returns the messages already read."""
    pending = list(received)

    async def replay() -> Message:
        if pending:
            return pending.pop(0)
        return await receive()

    return replay


def _credentials(header: bytes | None) -> HTTPAuthorizationCredentials | None:
    """What ``HTTPBearer(auto_error=False)`` makes of the ``Authorization`` header."""
    scheme, credentials = get_authorization_scheme_param(
        None if header is None else header.decode("latin-1")
    )
    if not (scheme and credentials) or scheme.lower() != "bearer":
        return None
    return HTTPAuthorizationCredentials(scheme=scheme, credentials=credentials)


def _idempotency_key(header: bytes | None) -> str | None:
    if header is None:
        return None
    key = header.decode("latin-1")
    if not 1 <= len(key) <= _MAX_IDEMPOTENCY_KEY:
        raise _Fallback
    return key


def _enter_route(scope: Scope, route: APIRoute, path_params: dict[str, str]) -> None:
    """What the router records in the scope for a matched route (and, while FastAPI traces
    the request, tells its telemetry the route: the request span is named after it)."""
    scope["route"] = route
    scope["endpoint"] = route.endpoint
    scope["path_params"] = path_params
    if "fastapi.telemetry" in scope and _route_selected is not None:
        _route_selected(scope=scope, path=route.path_format)


def _sub_response() -> Response:
    """The ``response: Response`` parameter FastAPI gives an endpoint (headers, status)."""
    sub = Response()
    del sub.headers["content-length"]
    sub.status_code = None  # type: ignore[assignment]
    return sub


async def _respond(
    scope: Scope,
    receive: Receive,
    send: Send,
    payload: bytes,
    status: int | None,
    sub: Response | None,
) -> None:
    response = Response(payload, status_code=status or 200, media_type="application/json")
    if sub is not None:
        response.headers.raw.extend(sub.headers.raw)
    await response(scope, receive, send)
