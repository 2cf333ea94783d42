"""The operations console: server-rendered pages under ``/console`` served by the API process.

Jinja2 templates (autoescaped), a stylesheet and one small script served from this package
(no CDN: works offline and air-gapped), charts drawn as SVG on the server. Sign-in with the
admin token (:mod:`._session`); every page needs the session, every action (POST) its CSRF
token; every answer carries a strict Content-Security-Policy. ``docs/console.md`` shows it.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

from fastapi import FastAPI, Request
from fastapi.responses import RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from conveyor.api.console import _auth, _manage, _ops
from conveyor.api.console._session import SignedOut

__all__ = ["STATIC_PATH", "install_console"]

STATIC_PATH = "/console/static"


async def _signed_out(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, SignedOut)
    target = "/console/sign-in"
    if exc.next_path and exc.next_path != "/console":
        target += "?next=" + quote(exc.next_path, safe="/")
    return RedirectResponse(target, status_code=303)


def install_console(app: FastAPI) -> None:
    """Mount the console's static files and pages on ``app``."""
    static = Path(__file__).parent / "static"
    app.mount(STATIC_PATH, StaticFiles(directory=str(static)), name="console-static")
    app.add_exception_handler(SignedOut, _signed_out)
    for module in (_auth, _ops, _manage):
        app.include_router(module.router)
