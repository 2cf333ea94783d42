"""Sign-in with the admin token and sign-out."""

from __future__ import annotations

import logging
import secrets
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse

from conveyor.api.console._common import form_of, render, secure
from conveyor.api.console._session import (
    COOKIE,
    check_sign_in_token,
    clear_session,
    console_enabled,
    decode,
    new_session,
    safe_next,
    session_of,
    set_session,
    set_sign_in_token,
    token_matches,
)
from conveyor.api.console._session import check_csrf as _check_csrf

log = logging.getLogger(__name__)

router = APIRouter(prefix="/console", include_in_schema=False)


def _sign_in_form(
    request: Request, next_path: str, *, error: str | None = None, status_code: int = 200
) -> HTMLResponse:
    settings = request.app.state.settings
    enabled = console_enabled(settings)
    token = secrets.token_urlsafe(24)
    response = render(
        request,
        "sign_in.html",
        sign_in_token=token,
        next_path=next_path,
        error=error if enabled else "The console is disabled: ADMIN_TOKEN is not set.",
        enabled=enabled,
        status_code=status_code if enabled else 503,
    )
    set_sign_in_token(response, request, token)
    return response


@router.get("/sign-in", response_class=HTMLResponse)
async def sign_in_page(
    request: Request, next: Annotated[str | None, Query(max_length=1024)] = None
) -> Any:
    if decode(request.app.state.settings, request.cookies.get(COOKIE)) is not None:
        return secure_redirect(safe_next(next))
    return _sign_in_form(request, safe_next(next))


@router.post("/sign-in", response_class=HTMLResponse)
async def sign_in(request: Request) -> Any:
    form = await form_of(request)
    check_sign_in_token(request, form)
    settings = request.app.state.settings
    next_path = safe_next(form.get("next"))
    if not console_enabled(settings):
        return _sign_in_form(request, next_path)
    if not token_matches(settings, form.get("token", "")):
        log.warning("console.sign_in_refused", extra={"client": _client(request)})
        return _sign_in_form(request, next_path, error="That is not the admin token.",
                             status_code=401)  # fmt: skip
    response = secure_redirect(next_path)
    set_session(response, request, settings, new_session())
    log.info("console.signed_in", extra={"client": _client(request)})
    return response


@router.post("/sign-out")
async def sign_out(request: Request) -> Any:
    session = session_of(request)
    _check_csrf(session, await form_of(request))
    response = secure_redirect("/console/sign-in")
    clear_session(response, request)
    return response


def secure_redirect(target: str) -> RedirectResponse:
    response = RedirectResponse(target, status_code=303)
    secure(response)  # type: ignore[arg-type]
    return response


def _client(request: Request) -> str | None:
    return request.client.host if request.client else None
