"""Outbound connections of ``http`` steps: an aiohttp session that connects only to addresses
checked beforehand (no DNS of its own).

The caller resolves and checks a host for a port, then sets :data:`PINS` (a context variable
mapping ``(host, port)`` of the URL to its checked addresses) around :meth:`PinnedSession.send`.
A request whose host and port have no pin is refused before anything is sent (fail closed);
the connector's resolver (:class:`PinnedResolver`) answers a host name with the pinned
addresses only, and aiohttp connects to those, in order. Host header, TLS SNI and certificate
checks keep using the host name. The pool keys connections by scheme, host and port, so a
kept-alive connection was itself made to a checked address and port.

**Why aiohttp.** Its HTTP/1.1 parser and writer are C, its connection pool does constant work
per request: measured on this repository's two-core host against a local keep-alive server at
50 concurrent requests, ~0.1 ms of CPU per request, against ~1.3 ms for httpx (its pool scans
every connection on every request and response end, some of those scans nested) and ~0.65 ms
for the sharded httpcore pools this module used before. Outbound HTTP was half of a worker's
CPU in a workflow of two ``http`` steps.

**Stale kept-alive connections.** A server may close an idle connection just as a request is
sent on it; the request then fails although the server never saw it. Idle connections are
therefore kept only :data:`KEEPALIVE_EXPIRY_S` (a connection whose end of stream has already
arrived is never reused), and a request is sent once more when its first attempt went out on
a kept-alive connection from the pool and that connection was closed before anything of an
answer was read (aiohttp's C parser reports the part of a head it read; an interim ``1xx``
answer alone counts as nothing), or was reset (a reset does not say whether part of a head
had arrived) — but only a request that may safely arrive twice: an idempotent method (GET,
HEAD, OPTIONS, PUT, DELETE, TRACE, as RFC 9110 §9.2.2 allows automatic retries of) or one
carrying an ``Idempotency-Key`` header. A ``POST`` without one relies on the short keep-alive
alone (and on the step's retry policy). A new connection, a connection that could not be
opened, a timeout, a connection closed after part of an answer, or an answer never lead to a
second attempt. (aiohttp's own resend, of idempotent methods on any broken connection, is
off: this rule is stricter and also covers ``Idempotency-Key``.)
"""

from __future__ import annotations

import logging
import socket
import ssl
from collections.abc import Mapping
from contextvars import ContextVar
from types import SimpleNamespace
from typing import Any

import aiohttp
import certifi
from aiohttp.abc import AbstractResolver, ResolveResult
from multidict import CIMultiDict
from yarl import URL

__all__ = [
    "KEEPALIVE_EXPIRY_S",
    "PINS",
    "RESENDABLE_METHODS",
    "PinnedResolver",
    "PinnedSession",
    "UncheckedDestination",
    "default_ssl_context",
    "pinned_addresses",
]

logger = logging.getLogger(__name__)

PINS: ContextVar[Mapping[tuple[str, int], tuple[str, ...]] | None] = ContextVar(
    "conveyor_http_pins", default=None
)

RESENDABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})
"""Methods a request may be sent twice with (idempotent, RFC 9110 §9.2.2)."""

KEEPALIVE_EXPIRY_S = 5.0
"""How long an idle connection stays in the pool: no longer than most servers keep one (5 s for
Node.js, uvicorn and Apache httpd; 60-75 s for nginx and cloud load balancers), so a connection
is seldom reused just as its server drops it; the one resend covers the rest."""

MAX_HEADER_BYTES = 16 * 1024
"""Longest status line or response header accepted (aiohttp's default is 8,190 bytes)."""
MAX_HEADERS = 256
"""Most response headers accepted (aiohttp's default is 128)."""

_NO_TIMEOUTS = aiohttp.ClientTimeout(total=None, connect=None, sock_read=None, sock_connect=None)
"""The caller bounds the whole request (lookups, redirects, body) with one ``asyncio.timeout``:
no timers of aiohttp's own per request."""


def default_ssl_context() -> ssl.SSLContext:
    """Certificates verified against Mozilla's CA bundle (``certifi``), host names checked."""
    return ssl.create_default_context(cafile=certifi.where())


class UncheckedDestination(aiohttp.ClientConnectionError):
    """A request for a host and port that were not checked (no pin): never sent."""


def pinned_addresses(host: str, port: int) -> tuple[str, ...]:
    """The checked addresses of ``host`` for ``port`` in this request's :data:`PINS`; raises
    :class:`UncheckedDestination` without any."""
    pins = PINS.get() or {}
    addresses = pins.get((host.lower(), port))
    if not addresses:
        raise UncheckedDestination(f"refusing to connect to unchecked host {host!r} port {port}")
    return addresses


class PinnedResolver(AbstractResolver):
    """aiohttp's resolver: a host name is answered with its pinned addresses, never from DNS."""

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        try:
            addresses = pinned_addresses(host, port)
        except UncheckedDestination as exc:
            raise OSError(str(exc)) from None  # aiohttp reports it as a connection error
        flags = socket.AI_NUMERICHOST | socket.AI_NUMERICSERV
        return [
            ResolveResult(
                hostname=host,
                host=address,
                port=port,
                family=socket.AF_INET6 if ":" in address else socket.AF_INET,
                proto=0,
                flags=flags,
            )
            for address in addresses
        ]

    async def close(self) -> None:
        return None


class PinnedSession:
    """One ``aiohttp.ClientSession`` for every ``http`` step of the process: at most
    ``max_connections`` connections, kept alive :data:`KEEPALIVE_EXPIRY_S`, no cookies, no
    proxies from the environment, no redirects followed (the caller checks each hop), and
    the one resend of a request on a stale connection (see the module's docstring).

    Open it inside the event loop that uses it: ``session = PinnedSession(n)``, then
    :meth:`aclose`. ``ssl_context`` replaces :func:`default_ssl_context` (tests trust their
    own CA with it).
    """

    def __init__(
        self,
        max_connections: int,
        *,
        user_agent: str,
        keepalive_expiry_s: float = KEEPALIVE_EXPIRY_S,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        connector = aiohttp.TCPConnector(
            limit=max_connections,
            limit_per_host=0,
            keepalive_timeout=keepalive_expiry_s,
            resolver=PinnedResolver(),
            use_dns_cache=False,
            ssl=ssl_context or default_ssl_context(),
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),  # shared by every tenant: never keep cookies
            timeout=_NO_TIMEOUTS,
            headers={"user-agent": user_agent},
            trust_env=False,
            auto_decompress=True,
            trace_configs=[_REUSE_TRACE],
            # a response head as large as httpx (h11) took: 16 KiB lines and fields
            max_line_size=MAX_HEADER_BYTES,
            max_field_size=MAX_HEADER_BYTES,
            max_headers=MAX_HEADERS,
        )
        # aiohttp resends an idempotent request on a broken connection by itself, but not
        # one with an Idempotency-Key and without telling: resends are made (and logged) here.
        self._session._retry_connection = False

    async def send(
        self, method: str, url: URL, headers: CIMultiDict[str], content: bytes | None
    ) -> aiohttp.ClientResponse:
        """Send the request (its URL's host and port pinned); the response's head has arrived,
        its body is to be read (then :meth:`aiohttp.ClientResponse.release`)."""
        pinned_addresses(url.raw_host or "", url.port or 0)  # fail closed before any I/O
        attempt = {"reused": False}
        try:
            return await self._request(method, url, headers, content, attempt)
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            if not (
                attempt["reused"] and _ended_unanswered(exc) and _may_arrive_twice(method, headers)
            ):
                raise
            logger.info(
                "http.stale_connection",
                extra={"host": url.host, "error": f"{type(exc).__name__}: {exc}"},
            )
        return await self._request(method, url, headers, content, {"reused": False})

    async def _request(
        self,
        method: str,
        url: URL,
        headers: CIMultiDict[str],
        content: bytes | None,
        attempt: dict[str, bool],
    ) -> aiohttp.ClientResponse:
        return await self._session.request(
            method,
            url,
            headers=headers,
            data=content,
            allow_redirects=False,
            trace_request_ctx=attempt,
        )

    async def aclose(self) -> None:
        await self._session.close()


async def _mark_reused(
    _session: aiohttp.ClientSession,
    context: SimpleNamespace,
    _params: aiohttp.TraceConnectionReuseconnParams,
) -> None:
    attempt = context.trace_request_ctx
    if isinstance(attempt, dict):
        attempt["reused"] = True


_REUSE_TRACE = aiohttp.TraceConfig()
"""Marks the attempt (``trace_request_ctx``) whose connection came from the pool."""
_REUSE_TRACE.on_connection_reuseconn.append(_mark_reused)
_REUSE_TRACE.freeze()


def _ended_unanswered(exc: aiohttp.ClientOSError | aiohttp.ServerDisconnectedError) -> bool:
    """The connection was open and ended before the answer: closed before a byte of it (a
    disconnection with part of an answer carries the part), or reset. Not: could not connect."""
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return isinstance(exc.message, str)
    return not isinstance(exc, aiohttp.ClientConnectorError)


def _may_arrive_twice(method: str, headers: Mapping[str, Any]) -> bool:
    """Whether the target may safely receive the request twice (see the module docstring)."""
    return method in RESENDABLE_METHODS or "idempotency-key" in headers
