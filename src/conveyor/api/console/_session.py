"""Console sign-in: the admin token buys a signed session cookie; every action carries a CSRF
token.

The cookie (``conveyor_console``) is ``base64(json) "." hex(HMAC-SHA256)``, signed with a key
derived from ``ADMIN_TOKEN`` — so every API replica accepts it, and rotating the token signs
everybody out. It holds the expiry and the session's CSRF token; it is ``HttpOnly``,
``SameSite=Strict``, scoped to ``/console`` and ``Secure`` when the request came over HTTPS.

Sign-in itself is protected by a double-submitted token (a short-lived cookie and the same
value in the form), so another site cannot sign a browser in with the attacker's session.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass

from fastapi import Request, Response

from conveyor.api.errors import ApiError
from conveyor.settings import Settings

COOKIE = "conveyor_console"
SIGN_IN_COOKIE = "conveyor_console_signin"
COOKIE_PATH = "/console"
SESSION_TTL_S = 8 * 3600
"""A session lasts one working day; then the operator signs in again."""
SIGN_IN_TTL_S = 900


class SignedOut(Exception):
    """The request has no valid session: the browser is sent to the sign-in page."""

    def __init__(self, next_path: str) -> None:
        super().__init__(next_path)
        self.next_path = next_path


@dataclass(frozen=True)
class Session:
    """A signed-in operator's session."""

    csrf: str
    expires_at: float


def _key(settings: Settings) -> bytes | None:
    token = settings.admin_token
    if token is None:
        return None
    secret = token.get_secret_value().encode()
    return hmac.new(secret, b"conveyor-console-session-v1", hashlib.sha256).digest()


def console_enabled(settings: Settings) -> bool:
    return settings.admin_token is not None


def token_matches(settings: Settings, given: str) -> bool:
    """The admin token, compared in constant time (never true when none is configured)."""
    expected = settings.admin_token
    if expected is None:
        return False
    return hmac.compare_digest(given.encode(), expected.get_secret_value().encode())


def _sign(key: bytes, payload: bytes) -> str:
    return hmac.new(key, payload, hashlib.sha256).hexdigest()


def encode(settings: Settings, session: Session) -> str:
    key = _key(settings)
    assert key is not None, "a session needs ADMIN_TOKEN"
    raw = json.dumps({"csrf": session.csrf, "exp": session.expires_at}).encode()
    body = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    return f"{body}.{_sign(key, body.encode())}"


def decode(settings: Settings, value: str | None, now: float | None = None) -> Session | None:
    """The session in a cookie value, or ``None`` (absent, forged, expired, malformed)."""
    key = _key(settings)
    if key is None or not value or "." not in value:
        return None
    body, signature = value.rsplit(".", 1)
    if not hmac.compare_digest(signature.encode(), _sign(key, body.encode()).encode()):
        return None
    try:
        data = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        session = Session(csrf=str(data["csrf"]), expires_at=float(data["exp"]))
    except (ValueError, KeyError, TypeError, binascii.Error):
        return None
    if session.expires_at <= (time.time() if now is None else now):
        return None
    return session


def new_session(now: float | None = None) -> Session:
    return Session(
        csrf=secrets.token_urlsafe(32),
        expires_at=(time.time() if now is None else now) + SESSION_TTL_S,
    )


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def set_session(response: Response, request: Request, settings: Settings, session: Session) -> None:
    response.set_cookie(
        COOKIE,
        encode(settings, session),
        max_age=SESSION_TTL_S,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )


def clear_session(response: Response, request: Request) -> None:
    response.delete_cookie(
        COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict", secure=_secure(request)
    )


def set_sign_in_token(response: Response, request: Request, token: str) -> None:
    response.set_cookie(
        SIGN_IN_COOKIE,
        token,
        max_age=SIGN_IN_TTL_S,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )


def session_of(request: Request) -> Session:
    """The request's session; raises :class:`SignedOut` without a valid one."""
    session = decode(request.app.state.settings, request.cookies.get(COOKIE))
    if session is None:
        target = request.url.path
        if request.url.query and request.method == "GET":
            target += "?" + request.url.query
        raise SignedOut(target if request.method == "GET" else "/console")
    return session


CSRF_FIELD = "csrf"


def check_csrf(session: Session, form: dict[str, str]) -> None:
    """403 in the API's error shape unless the form carries the session's CSRF token."""
    given = form.get(CSRF_FIELD, "")
    if not given or not hmac.compare_digest(given.encode(), session.csrf.encode()):
        raise ApiError(
            403,
            "csrf_failed",
            "The form's CSRF token is missing or does not match this session; reload the page "
            "and try again.",
        )


def check_sign_in_token(request: Request, form: dict[str, str]) -> None:
    cookie = request.cookies.get(SIGN_IN_COOKIE, "")
    given = form.get(CSRF_FIELD, "")
    if not cookie or not given or not hmac.compare_digest(cookie.encode(), given.encode()):
        raise ApiError(
            403,
            "csrf_failed",
            "The sign-in form's CSRF token is missing or does not match; reload the page and "
            "try again.",
        )


def safe_next(target: str | None) -> str:
    """Where to go after sign-in: a path inside the console, never another site."""
    if not target or not target.startswith("/console") or target.startswith("//"):
        return "/console"
    if any(c in target for c in "\\\r\n") or ".." in target or target.startswith("/console/sign-"):
        return "/console"
    return target
