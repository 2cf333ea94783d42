"""``conveyor status [--watch SECONDS]``: the admin status document, as tables in a terminal.

Reads ``GET /api/admin/workers/status`` (address from ``API_HOST``/``API_PORT`` or ``--url``,
admin token from ``ADMIN_TOKEN`` or ``--token``) and renders queue depths per region, the live
processes and their heartbeats, the scheduler's lock holder and last tick and the timer backlog;
then ``GET /api/admin/storage``: rows, size and oldest row per table, Redis memory, the jobs each
queue keeps and the retention settings (a failure there is a note, not an error).
``--watch`` refreshes in place (default every 30 s, light enough to leave running); ``--json`` prints
the raw document. Exit 1 with one clear line when the API is unreachable, refuses the token or
has its admin API disabled.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from typing import Any, TextIO

import httpx

from conveyor.cli.tables import render
from conveyor.errors import ConveyorError
from conveyor.settings import Settings, client_url

STATUS_PATH = "/api/admin/workers/status"
STORAGE_PATH = "/api/admin/storage"
DEFAULT_WATCH_S = 30.0
_CLEAR = "\x1b[H\x1b[2J"


class StatusError(ConveyorError):
    """The admin status document could not be read."""


class ApiUnreachable(StatusError):
    """The API did not answer (connection refused, timeout)."""


class ApiRefused(StatusError):
    """The API answered but refused to give the status (401, 503, ...)."""


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number of seconds") from None
    if seconds < 1:
        raise argparse.ArgumentTypeError("must be at least 1 second")
    return seconds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--watch",
        nargs="?",
        type=_seconds,
        const=DEFAULT_WATCH_S,
        default=None,
        metavar="SECONDS",
        help=f"refresh every SECONDS (default {DEFAULT_WATCH_S:.0f}) until Ctrl-C",
    )
    parser.add_argument("--url", help="API base URL (default: http://API_HOST:API_PORT)")
    parser.add_argument("--token", help="admin token (default: ADMIN_TOKEN)")
    parser.add_argument("--json", action="store_true", help="print the raw JSON document")
    parser.add_argument(
        "--timeout", type=float, default=5.0, metavar="SECONDS", help="HTTP timeout (default 5)"
    )  # fmt: skip


def _error_message(response: httpx.Response) -> str:
    try:
        error = response.json().get("error") or {}
        return str(error.get("message") or error.get("code") or "")
    except (ValueError, AttributeError):
        return response.text[:200].strip()


def fetch(client: httpx.Client, url: str, token: str) -> dict[str, Any]:
    """The status document; raises :class:`ApiUnreachable` or :class:`ApiRefused`."""
    return call_admin(client, "GET", url, STATUS_PATH, token)


def fetch_storage(client: httpx.Client, url: str, token: str) -> tuple[dict[str, Any] | None, str]:
    """The storage document, or ``None`` and why not (an older API, a database error)."""
    try:
        return call_admin(client, "GET", url, STORAGE_PATH, token), ""
    except StatusError as exc:
        return None, f"storage not shown: {exc.message}"


def call_admin(
    client: httpx.Client, method: str, url: str, path: str, token: str
) -> dict[str, Any]:
    """One admin API call (``Authorization: Bearer token``); the JSON document it answered.

    Raises :class:`ApiUnreachable` (no answer) or :class:`ApiRefused` (an error answer, with the
    API's message and what to check)."""
    endpoint = url.rstrip("/") + path
    try:
        response = client.request(method, endpoint, headers={"Authorization": f"Bearer {token}"})
    except httpx.HTTPError as exc:
        reason = str(exc) or type(exc).__name__
        raise ApiUnreachable(
            f"cannot reach the Conveyor API at {url} ({reason}); is `conveyor api` running? "
            "Set API_HOST/API_PORT or pass --url"
        ) from exc
    code = response.status_code
    detail = _error_message(response) if code >= 400 else ""
    if code in (401, 403):
        raise ApiRefused(
            f"the API at {url} refused the admin token (HTTP {code}); check ADMIN_TOKEN or --token"
        )
    if code == 503:
        raise ApiRefused(
            f"the API at {url} answered 503 ({detail or 'unavailable'}); "
            "if the admin API is disabled, "
            "start `conveyor api` with ADMIN_TOKEN set"
        )
    if code >= 400:
        raise ApiRefused(
            f"{method} {endpoint} answered HTTP {code}: {detail or response.reason_phrase}"
        )
    try:
        doc = response.json()
    except ValueError as exc:
        raise ApiRefused(
            f"{method} {endpoint} did not answer JSON: {response.text[:200]!r}"
        ) from exc
    if not isinstance(doc, dict) or doc.get("success") is False:
        raise ApiRefused(
            f"{method} {endpoint} answered an unexpected document: {response.text[:200]!r}"
        )
    return doc


def admin_target(args: argparse.Namespace, settings: Settings) -> tuple[str, str]:
    """``(API base URL, admin token)`` from ``--url``/``--token`` or the settings; the token
    is empty when neither gives one."""
    url = (args.url or client_url(settings.api_host, settings.api_port)).rstrip("/")
    token = args.token or (settings.admin_token.get_secret_value() if settings.admin_token else "")
    return url, token


class _Screen:
    """Writes frames: cleared in place on a terminal, separated by a blank line otherwise."""

    def __init__(self, out: TextIO, *, as_json: bool, watching: bool, source: str) -> None:
        self.out = out
        self.as_json = as_json
        self.watching = watching
        self.source = source
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self.frames = 0

    def show(
        self,
        doc: dict[str, Any],
        *,
        every_s: float | None,
        warning: str = "",
        storage: tuple[dict[str, Any] | None, str] | None = None,
    ) -> None:
        if self.as_json:
            self.out.write(
                json.dumps(doc, indent=None if self.watching else 2, sort_keys=True) + "\n"
            )
            self.out.flush()
            return
        stored, note = storage if storage is not None else (None, "")
        text = render(doc, source=self.source, storage=stored, storage_note=note)
        if warning:
            text = f"!! {warning}\n\n{text}"
        if every_s is not None:
            text += f"\nrefreshing every {every_s:g}s; Ctrl-C to quit\n"
        if self.tty and self.watching:
            text = _CLEAR + text
        elif self.frames:
            text = "\n" + text
        self.out.write(text)
        self.out.flush()
        self.frames += 1


def _watch(
    client: httpx.Client, url: str, token: str, screen: _Screen, every_s: float, doc: dict[str, Any]
) -> int:
    while True:
        time.sleep(every_s)
        try:
            doc = fetch(client, url, token)
            screen.show(doc, every_s=every_s, storage=_storage(client, url, token, screen))
        except ApiUnreachable as exc:
            stamp = datetime.now(UTC).isoformat(timespec="seconds")
            if screen.as_json:
                print(f"conveyor status: {exc.message}", file=sys.stderr)
            else:
                screen.show(
                    doc, every_s=every_s, warning=f"{stamp}: {exc.message}; showing the last answer"
                )


def _storage(
    client: httpx.Client, url: str, token: str, screen: _Screen
) -> tuple[dict[str, Any] | None, str] | None:
    """The storage section's document (not fetched for ``--json``, which prints the status
    document as it is)."""
    return None if screen.as_json else fetch_storage(client, url, token)


def run(args: argparse.Namespace, settings: Settings, *, out: TextIO | None = None) -> int:
    url, token = admin_target(args, settings)
    if not token:
        print("conveyor status: no admin token: set ADMIN_TOKEN or pass --token", file=sys.stderr)
        return 1
    screen = _Screen(
        out or sys.stdout, as_json=args.json, watching=args.watch is not None, source=url
    )
    try:
        with httpx.Client(timeout=args.timeout) as client:
            doc = fetch(client, url, token)
            screen.show(doc, every_s=args.watch, storage=_storage(client, url, token, screen))
            if args.watch is None:
                return 0
            return _watch(client, url, token, screen, args.watch, doc)
    except StatusError as exc:
        print(f"conveyor status: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
