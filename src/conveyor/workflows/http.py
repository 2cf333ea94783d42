"""Outbound HTTP for ``http`` steps, guarded against SSRF.

For every hop (the first request and each redirect, followed by hand):

1. Only ``http``/``https`` URLs are accepted. The destination port is the URL's, or 80/443
   from its scheme.
2. The host is resolved **once**, in this module (:func:`_resolve`); IP literals — also the
   legacy forms ``connect()`` accepts, such as ``127.1``, ``0x7f000001``, ``2130706433``,
   ``0177.0.0.1`` — are parsed as addresses without any lookup (and checked as such; an
   all-decimal legacy form such as ``127.1`` is then refused for good by the connector, which
   wants ``127.0.0.1``: "request refused: … is not a canonical IPv4 address"). A client
   reuses a name's answer for ``settings.http_dns_cache_s`` (:class:`DnsCache`; concurrent
   lookups of one name are one lookup); the answer is checked on every hop all the same.
3. Every address is checked: loopback, private (RFC 1918, fc00::/7), CGNAT (100.64/10),
   link-local (169.254/16 with the cloud metadata address, fe80::/10), unspecified,
   multicast, reserved and other non-global ranges are refused — also when embedded in IPv6
   (IPv4-mapped ``::ffff:a.b.c.d``, IPv4-compatible, NAT64 ``64:ff9b::/96``, 6to4) — unless
   ``settings.http_allowlist`` has an entry for the destination port (or for any port) that
   names the host (``name``, ``*.suffix``) or an address/CIDR containing the address. If any
   address of a host is refused, the host is refused.
4. The connection goes to the checked addresses and port only
   (:mod:`conveyor.workflows.transport`): the connector's resolver looks ``(host, port)`` up in
   a per-request pin table and never resolves names itself, so there is no DNS-rebinding window
   and no connection to a port that was not checked. Host header, TLS SNI and certificate
   verification still use the original host name. A connection for a host with no pin is
   refused (fail closed). Proxies from the environment are ignored; cookies are never kept.

Bodies are streamed and the request fails as soon as more than ``max_response_bytes`` (after
content decoding) arrive; the whole call — lookups, redirects, body — runs under one timeout.

The transport sends a request a second time only when a kept-alive connection reused from the
pool ended before any byte of answer and the request may arrive twice (see
:mod:`conveyor.workflows.transport`).

Errors: network errors, timeouts, 408/425/429 and 5xx → :class:`RetryableStepError`; refusals,
bad URLs, oversize responses and other 4xx → :class:`PermanentStepError`. Each carries its
``kind`` for the step's retry policy (``retry_on`` / ``retry_statuses``): ``connection``,
``timeout`` or ``status`` (then ``details["status"]``); refusals have none.

:func:`execute_http` reports the request as rendered — method, URL, headers, body — with
credentials redacted (:func:`redact_url`, :func:`redact_headers`) as each part is rendered, so
a request that fails (refused, timed out) still shows what it was: a step run's ``input``.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import functools
import ipaddress
import json
import logging
import re
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import aiohttp
import httpx
from aiohttp.http_exceptions import ContentEncodingError
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from conveyor import tracing
from conveyor.errors import PermanentStepError, RetryableStepError
from conveyor.redaction import Redactor
from conveyor.settings import Settings
from conveyor.workflows.expressions import compact_json, render_template
from conveyor.workflows.netguard import AllowList, address_refusal, parse_ip_literal
from conveyor.workflows.transport import PINS, PinnedSession

if TYPE_CHECKING:
    from conveyor.workflows.step_models import HttpStep

__all__ = [
    "DEFAULT_HTTP_TIMEOUT_S",
    "REDACTED",
    "CheckedDestination",
    "HttpResponse",
    "SafeHttpClient",
    "address_refusal",
    "execute_http",
    "parse_ip_literal",
    "redact_headers",
    "redact_url",
]

logger = logging.getLogger(__name__)
CLIENT = tracing.SpanKind.CLIENT

DEFAULT_HTTP_TIMEOUT_S = 30.0
USER_AGENT = "conveyor-http-step/0.1"
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
RETRYABLE_STATUSES = frozenset({408, 425, 429})
KEPT_RESPONSE_HEADERS = (
    "content-type",
    "content-length",
    "content-encoding",
    "location",
    "etag",
    "last-modified",
    "cache-control",
    "retry-after",
    "date",
    "x-request-id",
)
_SENSITIVE_HEADERS = ("authorization", "cookie", "proxy-authorization")

REDACTED = "[redacted]"
"""What a recorded request shows instead of a credential."""
_SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "cookie", "set-cookie", "x-api-key"}
)
_SECRET_WORDS = ("token", "secret", "password", "key")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
_REDACTOR: contextvars.ContextVar[Redactor | None] = contextvars.ContextVar(
    "conveyor_http_redactor", default=None
)
"""The secrets of the step whose request runs in this task: kept out of log lines and spans."""


def _shown(text: str) -> str:
    """``text`` (a URL, a host) as logs and spans may show it: userinfo and secrets out."""
    redactor = _REDACTOR.get()
    text = redact_url(text)
    return text if redactor is None else redactor.text(text)


async def _resolve(host: str, port: int) -> list[str]:
    """Resolve ``host`` to IP address strings (the one DNS lookup a hop makes)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class DnsCache:
    """Answers of :func:`_resolve` per ``(host, port)``, kept ``ttl_s`` seconds (0: none), at
    most :attr:`MAX_ENTRIES` (the oldest go first). Concurrent lookups of one name share one:
    a caller that gives up leaves it to the others, and the last one to give up cancels it
    (a lookup still queued for the resolver threads is then dropped, as it was before
    lookups were shared). Failed or empty lookups are not kept.

    Reusing an answer opens no rebinding window: what a request connects to is what it
    checked, and the addresses were a real answer at most ``ttl_s`` ago — the time an answer
    lives in most HTTP clients' caches (aiohttp's default is 10 s). What it saves: a
    ``getaddrinfo`` per request, run in the event loop's thread pool (a handful of threads
    for every concurrent step of the process).
    """

    MAX_ENTRIES = 4096

    def __init__(self, ttl_s: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl_s = ttl_s
        self._clock = clock
        # in the order they were kept: with one ttl, also the order they expire in
        self._answers: dict[tuple[str, int], tuple[float, tuple[str, ...]]] = {}
        self._lookups: dict[tuple[str, int], _Lookup] = {}
        self.misses = 0
        """Lookups made (tests read it)."""

    async def resolve(self, host: str, port: int) -> tuple[str, ...]:
        key = (host, port)
        kept = self._answers.get(key)
        if kept is not None:
            if kept[0] > self._clock():
                return kept[1]
            del self._answers[key]
        lookup = self._lookups.get(key)
        if lookup is None or lookup.task.cancelling() or lookup.task.cancelled():
            self.misses += 1
            lookup = _Lookup(asyncio.ensure_future(_resolve(host, port)))
            self._lookups[key] = lookup
            lookup.task.add_done_callback(lambda done: self._keep(key, done))
        lookup.waiters += 1
        try:
            return tuple(await asyncio.shield(lookup.task))
        finally:
            lookup.waiters -= 1
            if not lookup.waiters and not lookup.task.done():
                lookup.task.cancel()  # nobody wants it any more

    def cancel(self) -> None:
        """Cancel the lookups on their way (the client is closing)."""
        for lookup in list(self._lookups.values()):
            lookup.task.cancel()

    def _keep(self, key: tuple[str, int], done: asyncio.Task[list[str]]) -> None:
        current = self._lookups.get(key)
        if current is not None and current.task is done:  # (not a newer lookup of the name)
            del self._lookups[key]
        if done.cancelled() or done.exception() is not None or not done.result():
            return  # (retrieved here; each waiter raises it from its own await)
        if self.ttl_s <= 0:
            return
        while len(self._answers) >= self.MAX_ENTRIES:
            del self._answers[next(iter(self._answers))]  # the oldest, O(1)
        self._answers.pop(key, None)  # kept again: to the end of the order
        self._answers[key] = (self._clock() + self.ttl_s, tuple(done.result()))


@dataclass(slots=True)
class _Lookup:
    task: asyncio.Task[list[str]]
    waiters: int = 0


# --- client ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CheckedDestination:
    """Where one hop may connect after the SSRF check: the pin a connection must match."""

    host: str
    """The URL's host as the connector sees it (lower-case, trailing dot kept): the pin key."""
    port: int
    """The destination port: the URL's, or 80/443 from its scheme."""
    addresses: tuple[str, ...]
    """The checked addresses, tried in this order."""

    @property
    def pins(self) -> dict[tuple[str, int], tuple[str, ...]]:
        """The pin table for :data:`~conveyor.workflows.transport.PINS`."""
        return {(self.host, self.port): self.addresses}


@dataclass(frozen=True, slots=True)
class HttpResponse:
    """A complete (size-capped) response to the last hop."""

    status: int
    headers: CIMultiDictProxy[str]
    content: bytes
    url: str


_ALLOWED_MAX = 4096
"""Allowed destinations a client remembers (see ``SafeHttpClient._allowed``)."""


class SafeHttpClient:
    """SSRF-guarded HTTP client; one per process, shared by every ``http`` step.

    ``async with SafeHttpClient(settings) as client: await client.request(...)``.
    """

    def __init__(self, settings: Settings, *, max_connections: int = 100) -> None:
        self._allow = AllowList.from_entries(settings.http_allowlist)
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        self._max_connections = max_connections
        self._client: PinnedSession | None = None
        self.dns = DnsCache(settings.http_dns_cache_s)
        self._allowed: set[tuple[str, int]] = set()
        """``(address, port)`` pairs found allowed: the verdict depends only on them and on
        the allow-list, fixed for the client's life (bounded: cleared when full)."""

    async def __aenter__(self) -> SafeHttpClient:
        self._client = PinnedSession(self._max_connections, user_agent=USER_AGENT)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        client, self._client = self._client, None
        self.dns.cancel()
        if client is not None:
            await client.aclose()

    async def check_url(self, url: httpx.URL) -> CheckedDestination:
        """Resolve and check ``url``'s host for its destination port.

        Raises :class:`PermanentStepError` for a refused URL, :class:`RetryableStepError` when
        the name cannot be resolved.
        """
        if url.scheme not in ("http", "https"):
            raise PermanentStepError(
                f"refused URL scheme {url.scheme!r}: only http and https are allowed",
                url=redact_url(str(url)),
            )
        key = url.raw_host.decode("ascii").lower()
        host = key.rstrip(".")
        if not host:
            raise PermanentStepError("refused URL without a host", url=redact_url(str(url)))
        port = url.port or (443 if url.scheme == "https" else 80)
        addresses = await self._addresses(url, host, port)
        if not self._allow.names_host(host, port):
            for address in addresses:
                self._check_address(host, address, port)
        return CheckedDestination(key, port, addresses)

    async def _addresses(self, url: httpx.URL, host: str, port: int) -> tuple[str, ...]:
        """The addresses ``host`` denotes: an IP literal itself, else its DNS answer."""
        literal = parse_ip_literal(host)
        if literal is not None:
            return (str(literal),)
        try:
            addresses = await self.dns.resolve(host, port)
        except (OSError, UnicodeError) as exc:
            raise RetryableStepError(
                f"could not resolve host {host!r}: {exc}",
                kind="connection",
                url=redact_url(str(url)),
            ) from exc
        if not addresses:
            raise RetryableStepError(
                f"host {host!r} has no addresses", kind="connection", url=redact_url(str(url))
            )
        return tuple(addresses)

    def _check_address(self, host: str, address: str, port: int) -> None:
        if (address, port) in self._allowed:
            return
        ip = ipaddress.ip_address(address.split("%", 1)[0])
        reason = address_refusal(ip)
        if reason is None or self._allow.contains(ip, port):
            if len(self._allowed) >= _ALLOWED_MAX:
                self._allowed.clear()
            self._allowed.add((address, port))
            return
        logger.warning(
            "http.refused",
            extra={"host": _shown(host), "address": address, "port": port, "reason": reason},
        )
        entry = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
        raise PermanentStepError(
            f"refused to connect to {host!r}: {address} is {reason} "
            f"(to allow it, add {entry} to HTTP_ALLOWLIST)",
            host=host,
            address=address,
            port=port,
        )

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
        timeout_s: float = DEFAULT_HTTP_TIMEOUT_S,
        max_response_bytes: int = 1024 * 1024,
        follow_redirects: bool = True,
        max_redirects: int = 5,
    ) -> HttpResponse:
        """Send a request, following redirects by hand and checking every hop."""
        if self._client is None:
            raise RuntimeError("SafeHttpClient is not open: use 'async with'")
        try:
            target = parse_url(url)
        except (httpx.InvalidURL, ValueError, TypeError) as exc:
            # secrets out before the cut: cut first, a secret's head would be left
            raise PermanentStepError(f"invalid URL {_shown(url)!r:.200}: {exc}") from exc
        encoded = CIMultiDict(headers or {})
        limits = (timeout_s, max_response_bytes, max_redirects, follow_redirects)
        if not tracing.enabled:
            return await self._send(method, url, target, encoded, content, limits)
        with tracing.start_span(method, _span_attributes(method, target), kind=CLIENT) as span:
            tracing.inject(encoded)  # traceparent/tracestate of this span, on every hop
            response = await self._send(method, url, target, encoded, content, limits)
            span.set_attribute("http.response.status_code", response.status)
            if response.status >= 400:
                tracing.mark_error(str(response.status), span)
            return response

    async def _send(
        self,
        method: str,
        url: str,
        target: httpx.URL,
        headers: CIMultiDict[str],
        content: bytes | None,
        limits: tuple[float, int, int, bool],
    ) -> HttpResponse:
        """One request (redirects followed) under one timeout; errors as step errors."""
        timeout_s, max_response_bytes, max_redirects, follow_redirects = limits
        try:
            async with asyncio.timeout(timeout_s):
                return await self._follow(
                    method,
                    target,
                    headers,
                    content,
                    max_response_bytes,
                    max_redirects if follow_redirects else 0,
                    follow_redirects,
                )
        except TimeoutError as exc:
            raise RetryableStepError(
                f"request timed out after {timeout_s}s", kind="timeout", url=redact_url(url)
            ) from exc
        except (aiohttp.InvalidURL, ValueError) as exc:
            raise PermanentStepError(f"request refused: {exc}", url=redact_url(url)) from exc
        except aiohttp.ClientPayloadError as exc:
            if _undecodable(exc):
                raise PermanentStepError(
                    f"undecodable response: {exc}", url=redact_url(url)
                ) from exc
            raise _failed(exc, url) from exc
        except aiohttp.ClientResponseError as exc:  # the head did not parse (not a status)
            raise RetryableStepError(
                f"invalid response: {exc.message}", kind="connection", url=redact_url(url)
            ) from exc
        except aiohttp.ClientError as exc:
            raise _failed(exc, url) from exc

    async def _follow(
        self,
        method: str,
        url: httpx.URL,
        headers: CIMultiDict[str],
        content: bytes | None,
        max_bytes: int,
        max_redirects: int,
        follow: bool,
    ) -> HttpResponse:
        assert self._client is not None
        for hop in range(max_redirects + 1):
            destination = await self.check_url(url)
            token = PINS.set(destination.pins)
            started = time.monotonic()
            try:
                response = await self._client.send(method, *_wire(url, headers), content)
            finally:
                PINS.reset(token)
            try:
                if logger.isEnabledFor(logging.DEBUG):  # the URL's redaction costs otherwise
                    logger.debug(
                        "http.response",
                        extra={
                            "url": _shown(str(url)),
                            "status": response.status,
                            "hop": hop,
                            "elapsed_ms": round((time.monotonic() - started) * 1000, 1),
                        },
                    )
                location = response.headers.get("location")
                if not follow or response.status not in REDIRECT_STATUSES or not location:
                    body = await _read_capped(response, max_bytes)
                    return HttpResponse(
                        response.status, response.headers, body, redact_url(str(url))
                    )
            finally:
                response.release()
            next_url = _join(url, location)
            method, content, headers = _redirect_request(
                response.status, method, content, headers, url, next_url
            )
            url = next_url
        raise PermanentStepError(
            f"too many redirects (more than {max_redirects})", url=redact_url(str(url))
        )


PARSED_URLS_CACHED = 128
"""Parsed URLs kept (:func:`parse_url`): a step that calls the same URL every time parses it
once."""
PARSED_URL_MAX_CHARS = 256
"""A longer URL is parsed every time: the cache stays under ~0.5 MB even when its URLs are
percent-encoded at length."""


def parse_url(url: str) -> httpx.URL:
    """``httpx.URL(url)`` — ~9 us of CPU for a short URL (``timeit``; py-spy put it at an
    eighth of an ``http`` step's worker CPU) — remembered for the last :data:`PARSED_URLS_CACHED`
    URLs up to :data:`PARSED_URL_MAX_CHARS` characters (an ``httpx.URL`` is immutable: its
    ``copy_with``/``join`` return new ones; every hop is still checked). A URL that does not
    parse raises every time. Like the requests themselves, it holds rendered URLs, any
    credentials in them included, in this process's memory only."""
    if len(url) > PARSED_URL_MAX_CHARS:
        return httpx.URL(url)
    return _parse_cached(url)


@functools.lru_cache(maxsize=PARSED_URLS_CACHED)
def _parse_cached(url: str) -> httpx.URL:
    return httpx.URL(url)


def _span_attributes(method: str, url: httpx.URL) -> dict[str, Any]:
    """A client span's attributes: the URL without credentials, query or fragment."""
    port = url.port or (443 if url.scheme == "https" else 80)
    return {
        "http.request.method": method,
        "server.port": port,
        "server.address": _shown(url.host),
        "url.full": _shown(str(url.copy_with(query=None, fragment=None))),
    }


def _wire(url: httpx.URL, headers: CIMultiDict[str]) -> tuple[URL, CIMultiDict[str]]:
    """The URL and headers as sent: credentials in the URL become Basic authentication unless
    the step sets its own Authorization header (which then wins); they never go on the wire
    in the URL itself."""
    sent = URL(str(url), encoded=True)
    if sent.raw_user is None and sent.raw_password is None:
        return sent, headers
    if "authorization" not in headers:
        headers = headers.copy()
        credentials = f"{sent.user or ''}:{sent.password or ''}".encode()
        headers["Authorization"] = "Basic " + base64.b64encode(credentials).decode()  # RFC 7617
    return sent.with_user(None), headers


def _failed(exc: Exception, url: str) -> RetryableStepError:
    return RetryableStepError(
        f"request failed: {type(exc).__name__}: {exc}", kind="connection", url=redact_url(url)
    )


def _undecodable(exc: aiohttp.ClientPayloadError) -> bool:
    """The body's content encoding could not be decoded (not: the connection broke)."""
    return isinstance(exc.__cause__, ContentEncodingError)


def _join(url: httpx.URL, location: str) -> httpx.URL:
    try:
        return url.join(location)
    except (httpx.InvalidURL, ValueError) as exc:
        raise PermanentStepError(f"invalid redirect location {location!r:.200}") from exc


def _redirect_request(
    status: int,
    method: str,
    content: bytes | None,
    headers: CIMultiDict[str],
    url: httpx.URL,
    next_url: httpx.URL,
) -> tuple[str, bytes | None, CIMultiDict[str]]:
    headers = headers.copy()
    if (status == 303 and method != "HEAD") or (status in (301, 302) and method == "POST"):
        method, content = "GET", None
        for name in ("content-type", "content-encoding"):
            headers.popall(name, None)
    if (url.scheme, url.host, url.port) != (next_url.scheme, next_url.host, next_url.port):
        for name in _SENSITIVE_HEADERS:
            headers.popall(name, None)
        _keep_secrets_home(headers, content, next_url)
    return method, content, headers


def _keep_secrets_home(
    headers: CIMultiDict[str], content: bytes | None, next_url: httpx.URL
) -> None:
    """A redirect to another origin never carries the step's secrets: headers that hold one
    are dropped; a body that holds one is not sent again (the step fails, for good)."""
    redactor = _REDACTOR.get()
    if redactor is None:
        return
    for name, value in list(headers.items()):
        if redactor.contains(value):
            headers.popall(name, None)
    if content is not None and redactor.contains(content.decode("utf-8", "replace")):
        raise PermanentStepError(
            "refused to follow a redirect to another origin: it would send a secret of the "
            "request body there",
            url=_shown(str(next_url)),
        )


async def _read_capped(response: aiohttp.ClientResponse, max_bytes: int) -> bytes:
    declared = response.headers.get("content-length", "")
    if (
        declared.isdigit()
        and int(declared) > max_bytes
        and "content-encoding" not in response.headers
    ):
        raise PermanentStepError(
            f"response body of {declared} bytes is larger than max_response_bytes ({max_bytes})"
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.content.iter_any():
        size += len(chunk)
        if size > max_bytes:
            raise PermanentStepError(
                f"response body is larger than max_response_bytes ({max_bytes})"
            )
        chunks.append(chunk)
    return b"".join(chunks)


# --- the http step --------------------------------------------------------------------------------


async def execute_http(
    step: HttpStep,
    context: Mapping[str, Any],
    client: SafeHttpClient,
    *,
    record: Callable[[dict[str, Any]], None] | None = None,
    redactor: Redactor | None = None,
) -> dict[str, Any]:
    """Render ``step``'s templates, send it, and map the response to an output or an error.

    ``redactor``: the step's secret values, kept out of the client's log lines and spans
    while the request runs (the caller redacts what it records: :mod:`conveyor.workflows.steps`).

    Output: ``{"status", "headers" (a subset, lower-case names), "body" (parsed JSON when the
    content type is JSON, else text; ``null`` when empty), "url" (after redirects)}``.

    ``record`` is called with the request as rendered so far — ``{"method", "url"}`` once the
    URL is rendered, then with ``"headers"`` (the content type added for a body included) and
    ``"body"`` (the JSON value or text sent; ``null`` without one) — before it is sent, with
    credentials redacted. Nothing is recorded when the URL itself cannot be rendered.
    """
    token = _REDACTOR.set(redactor) if redactor is not None else None
    try:
        return await _execute_http(step, context, client, record)
    finally:
        if token is not None:
            _REDACTOR.reset(token)


async def _execute_http(
    step: HttpStep,
    context: Mapping[str, Any],
    client: SafeHttpClient,
    record: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    url = render_template(step.url, context, url=True)
    if not isinstance(url, str):
        raise PermanentStepError(f"url must evaluate to a string, got {type(url).__name__}")
    sent: dict[str, Any] = {"method": step.method, "url": redact_url(url)}
    if record is not None:
        record(sent)
    headers = {name: _header_text(render_template(v, context)) for name, v in step.headers.items()}
    body, content = _body(step, context, headers)
    if record is not None:
        record({**sent, "headers": redact_headers(headers), "body": body})
    response = await client.request(
        step.method,
        url,
        headers=headers,
        content=content,
        timeout_s=step.timeout_s or DEFAULT_HTTP_TIMEOUT_S,
        max_response_bytes=step.max_response_bytes,
        follow_redirects=step.follow_redirects,
        max_redirects=step.max_redirects,
    )
    output = {
        "status": response.status,
        "headers": _kept_headers(response.headers, step.response_headers),
        "body": _parse_body(response),
        "url": response.url,
    }
    _check_status(step, response, output)
    return output


def redact_url(url: str) -> str:
    """``url`` with its userinfo (``user:password@``) replaced by ``[redacted]``.

    Works on the text, so that a URL the client refuses as invalid is redacted too: the
    authority runs from after ``scheme://`` (or from the start, without one) to the first
    ``/``, ``?`` or ``#``, and everything in it up to its last ``@`` is userinfo.
    """
    slashes = url.find("//")
    scheme = slashes >= 0 and (slashes == 0 or _SCHEME.fullmatch(url[:slashes]) is not None)
    start = slashes + 2 if scheme else 0
    end = len(url)
    for delimiter in "/?#":
        found = url.find(delimiter, start)
        if found >= 0:
            end = min(end, found)
    at = url.rfind("@", start, end)
    return url if at < 0 else f"{url[:start]}{REDACTED}{url[at:]}"


def redact_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """``headers`` with the values of credential headers replaced by ``[redacted]``.

    Credential headers: ``Authorization``, ``Proxy-Authorization``, ``Cookie``, ``Set-Cookie``,
    ``X-Api-Key`` and any whose name contains ``token``, ``secret``, ``password`` or ``key``
    (case-insensitive) — but not ``Idempotency-Key``, a deduplication key, not a credential.
    """
    return {name: REDACTED if _is_secret_header(name) else value for name, value in headers.items()}


_NOT_SECRET_HEADERS = frozenset({"idempotency-key"})


def _is_secret_header(name: str) -> bool:
    lower = name.lower()
    if lower in _NOT_SECRET_HEADERS:
        return False
    return lower in _SECRET_HEADERS or any(word in lower for word in _SECRET_WORDS)


def _header_text(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))
    if "\r" in text or "\n" in text:
        raise PermanentStepError("a header value contains a line break")
    return text


def _body(
    step: HttpStep, context: Mapping[str, Any], headers: dict[str, str]
) -> tuple[Any, bytes | None]:
    """The rendered body (text or a JSON value; ``None``: no body) and the bytes sent. Adds
    a content type to ``headers`` unless the step gives one."""
    if step.body is None:
        return None, None
    body = render_template(step.body, context)
    if body is None:
        return None, None
    has_type = any(name.lower() == "content-type" for name in headers)
    if isinstance(body, str):
        if not has_type:
            headers["content-type"] = "text/plain; charset=utf-8"
        return body, body.encode()
    if not has_type:
        headers["content-type"] = "application/json"
    return body, compact_json(body).encode()


def _kept_headers(headers: CIMultiDictProxy[str], extra: list[str]) -> dict[str, str]:
    wanted = (*KEPT_RESPONSE_HEADERS, *extra)
    return {
        name: _answer_header_text(", ".join(headers.getall(name)))
        for name in wanted
        if name in headers
    }


def _answer_header_text(value: str) -> str:
    """A response header's value as text: UTF-8 when its bytes are (aiohttp decodes them so,
    keeping any other byte as a lone surrogate), else ISO-8859-1 — HTTP's historical charset,
    as httpx read them."""
    try:
        value.encode()
    except UnicodeEncodeError:
        return value.encode("utf-8", "surrogateescape").decode("latin-1")
    return value


def _parse_body(response: HttpResponse) -> Any:
    if not response.content:
        return None
    content_type = response.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    text = response.content.decode(_charset(response.headers) or "utf-8", errors="replace")
    if content_type == "application/json" or content_type.endswith("+json"):
        try:
            return json.loads(text)
        except (ValueError, RecursionError):
            return text
    return text


def _charset(headers: CIMultiDictProxy[str]) -> str | None:
    for part in headers.get("content-type", "").split(";")[1:]:
        name, _, value = part.strip().partition("=")
        if name.lower() == "charset" and value:
            charset: str = value.strip('"').lower()
            try:
                "".encode(charset)
            except LookupError:
                return None
            return charset
    return None


_EXCERPT_READ = 1024 + 4 * 16 * 1024 + 8
"""Bytes of an error response read for its 1,024-character excerpt: enough to hold a secret
(at most 16 KiB of UTF-8) that starts within the excerpt whatever the charset, so that it is
redacted whole."""


def _check_status(step: HttpStep, response: HttpResponse, output: dict[str, Any]) -> None:
    status = response.status
    ok = status in step.expect_status if step.expect_status else 200 <= status < 300
    if ok:
        return
    # decoded as the body is (a secret echoed in UTF-16 is found too), and the secrets taken out
    # before the cut to 1,024 characters: cut first, a secret's head would be left
    charset = _charset(response.headers) or "utf-8"
    excerpt = response.content[:_EXCERPT_READ].decode(charset, errors="replace")
    redactor = _REDACTOR.get()
    excerpt = (excerpt if redactor is None else redactor.text(excerpt))[:1024]
    details: dict[str, Any] = {"status": status, "url": response.url, "body": excerpt}
    retry_after = response.headers.get("retry-after", "")
    if retry_after.isdigit():
        details["retry_after_s"] = int(retry_after)
    message = f"HTTP {status} from {response.url}"
    if status >= 500 or status in RETRYABLE_STATUSES:
        raise RetryableStepError(message, details, kind="status")
    raise PermanentStepError(message, details, kind="status")
