"""What every console page shares: rendering with the security headers, the session and CSRF
token in the template context, form parsing, the process context."""

from __future__ import annotations

import functools
from typing import Any
from urllib.parse import parse_qsl

from fastapi import Request
from fastapi.responses import HTMLResponse
from jinja2 import Environment

from conveyor.api.console._render import environment
from conveyor.api.console._session import CSRF_FIELD, Session
from conveyor.api.context import ApiContext
from conveyor.api.errors import ApiError

CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
"""No inline script or style anywhere, nothing from another origin, no framing."""

SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}

MAX_FORM_BYTES = 16_384

NAV = (
    ("overview", "/console", "Overview"),
    ("executions", "/console/executions", "Executions"),
    ("workflows", "/console/workflows", "Workflows"),
    ("schedules", "/console/schedules", "Schedules"),
    ("tenants", "/console/tenants", "Tenants"),
)


@functools.cache
def templates() -> Environment:
    return environment()


def secure(response: HTMLResponse) -> HTMLResponse:
    response.headers.update(SECURITY_HEADERS)
    return response


def render(
    request: Request,
    template: str,
    *,
    session: Session | None = None,
    status_code: int = 200,
    **values: Any,
) -> HTMLResponse:
    """Render ``template`` (autoescaped) with the navigation and the session's CSRF token."""
    html = (
        templates()
        .get_template(template)
        .render(
            nav=NAV,
            csrf_field=CSRF_FIELD,
            csrf=session.csrf if session else "",
            signed_in=session is not None,
            path=request.url.path,
            **values,
        )
    )
    return secure(HTMLResponse(html, status_code=status_code))


def ctx_of(request: Request) -> ApiContext:
    ctx: ApiContext | None = getattr(request.app.state, "ctx", None)
    if ctx is None:
        raise ApiError(503, "starting", "The API is starting; retry shortly.")
    return ctx


async def form_of(request: Request) -> dict[str, str]:
    """An ``application/x-www-form-urlencoded`` body (the only kind the console posts)."""
    body = await request.body()
    if len(body) > MAX_FORM_BYTES:
        raise ApiError(413, "payload_too_large", f"Forms are limited to {MAX_FORM_BYTES} bytes.")
    try:
        pairs = parse_qsl(body.decode(), keep_blank_values=True, max_num_fields=64)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ApiError(400, "bad_request", f"Unreadable form: {exc}") from exc
    return dict(pairs)


def clean(value: str | None, limit: int = 64) -> str | None:
    """A query parameter trimmed; ``None`` when empty; cut at ``limit`` characters."""
    if value is None:
        return None
    value = value.strip()[:limit]
    return value or None
