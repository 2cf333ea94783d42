"""An httpx transport that connects only to addresses checked beforehand (no DNS of its own).

The caller resolves and checks a host for a port, then sets :data:`PINS` (a context variable
mapping ``(host, port)`` of the URL to its checked addresses) around ``client.send``. The
network backend looks each connection's host and port up there and connects to those
addresses in order; a host or port without a pin is refused (fail closed). Host header, TLS
SNI and certificate checks keep using the host name, because httpcore still sees the original
URL. The pool keys connections by scheme, host and port, so a kept-alive connection was itself
made to a checked address and port.

**Stale kept-alive connections.** A server may close an idle connection just as a request is
sent on it; the request then fails although the server never saw it. Idle connections are
therefore kept only :data:`KEEPALIVE_EXPIRY_S`, and a request is sent once more, on another
connection, when its first attempt failed the way such a request fails: the connection had
already carried an earlier request (it came from the pool), and it ended — end of stream,
reset, failed write — before a single byte of answer arrived. A timeout, a fresh connection
or any byte of answer means the server may have acted on the request: no second attempt.

A server that reads a request from a kept-alive connection and then closes it without a byte
of answer looks the same on the wire, so — as RFC 9110 §9.2.2 says of automatic retries — the
second attempt is made only for a request that may safely arrive twice: an idempotent method
(GET, HEAD, OPTIONS, PUT, DELETE, TRACE) or one carrying an ``Idempotency-Key`` header. A
``POST`` without one relies on the short keep-alive alone (and on the step's retry policy).

**Pool shards.** httpcore's pool looks at every one of its connections on every request and
every response's end — some of those scans nested, so the cost grows with the square of the
pool's size (with 50 kept-alive connections, ~10% of a worker's CPU in the five-step
workflow). The transport therefore runs several pools of at most
:data:`POOL_SHARD_CONNECTIONS` connections (together exactly ``max_connections``) and sends
each request through the one with the fewest requests in flight.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx

__all__ = [
    "KEEPALIVE_EXPIRY_S",
    "PINS",
    "POOL_SHARD_CONNECTIONS",
    "RESENDABLE_METHODS",
    "PinnedBackend",
    "PinnedTransport",
    "open_tcp",
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

POOL_SHARD_CONNECTIONS = 10
"""Most connections in one httpcore pool of the transport (see the module's docstring)."""

_CORE_ERRORS = (
    httpcore.TimeoutException,
    httpcore.NetworkError,
    httpcore.ProtocolError,
    httpcore.UnsupportedProtocol,
)


@dataclass(slots=True)
class _Exchange:
    """One attempt to send a request, as its connection saw it: whether the server can have
    received it."""

    reused: bool = False
    """The connection had carried an earlier request: it came from the pool, kept alive."""
    received: int = 0
    """Bytes of answer read from the connection during this attempt."""
    dropped: bool = False
    """The connection ended under the attempt: end of stream, reset, or a failed write."""

    @property
    def unseen_by_server(self) -> bool:
        """A kept-alive connection the server had closed, ending before any byte of answer."""
        return self.reused and self.received == 0 and self.dropped


_EXCHANGE: ContextVar[_Exchange | None] = ContextVar("conveyor_http_exchange", default=None)


_UNASKED = object()


class _WatchedStream(httpcore.AsyncNetworkStream):
    """A connection's stream that tells the current :class:`_Exchange` what happens on it."""

    def __init__(self, inner: httpcore.AsyncNetworkStream) -> None:
        self._inner = inner
        self._carried = 0
        self._current: _Exchange | None = None
        self._socket: Any = _UNASKED

    def _exchange(self) -> _Exchange | None:
        """The attempt this I/O belongs to (``None`` outside one, e.g. reading a body)."""
        exchange = _EXCHANGE.get()
        if exchange is not None and exchange is not self._current:
            self._current = exchange
            self._carried += 1
            exchange.reused = self._carried > 1
        return exchange

    async def read(
        self,
        max_bytes: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's stream signature
    ) -> bytes:
        exchange = self._exchange()
        try:
            data = await self._inner.read(max_bytes, timeout)
        except httpcore.ReadError:
            _dropped(exchange)
            raise
        if exchange is not None:
            exchange.received += len(data)
        if not data:
            _dropped(exchange)
        return data

    async def write(
        self,
        buffer: bytes,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's stream signature
    ) -> None:
        exchange = self._exchange()
        try:
            await self._inner.write(buffer, timeout)
        except httpcore.WriteError:
            _dropped(exchange)
            raise

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's stream signature
    ) -> httpcore.AsyncNetworkStream:
        return _WatchedStream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        # httpcore asks every pooled connection whether its socket is readable on every
        # request (is an idle one closed by the server?), and anyio builds its table of
        # attributes anew for each ask: with 50 connections that was ~5-7% of a worker's
        # CPU. A stream's socket never changes: look it up once, poll it as httpcore does.
        if info == "is_readable":
            return _readable(self.get_extra_info("socket"))
        if info != "socket":
            return self._inner.get_extra_info(info)
        if self._socket is _UNASKED:
            self._socket = self._inner.get_extra_info(info)
        return self._socket


def _readable(sock: socket.socket | None) -> bool:
    """httpcore's ``is_socket_readable``: would a read return at once (data, or the ``b""``
    of a closed connection)? A socket that is gone counts as readable (closed)."""
    fd = None if sock is None else sock.fileno()
    if fd is None or fd < 0:
        return True
    poll = select.poll()
    poll.register(fd, select.POLLIN)
    return bool(poll.poll(0))


def _dropped(exchange: _Exchange | None) -> None:
    if exchange is not None:
        exchange.dropped = True


async def open_tcp(
    backend: httpcore.AsyncNetworkBackend,
    address: str,
    port: int,
    timeout: float | None,  # noqa: ASYNC109 - httpcore's backend signature
    local_address: str | None,
    socket_options: Iterable[Any] | None,
) -> httpcore.AsyncNetworkStream:
    """Open a TCP connection to a checked address (a seam for tests)."""
    return await backend.connect_tcp(
        address, port, timeout=timeout, local_address=local_address, socket_options=socket_options
    )


class PinnedBackend(httpcore.AsyncNetworkBackend):
    """Connects only to the addresses pinned for the current request's host."""

    def __init__(self) -> None:
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's backend signature
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        pins = PINS.get() or {}
        addresses = pins.get((host.lower(), port))
        if not addresses:
            raise httpcore.ConnectError(
                f"refusing to connect to unchecked host {host!r} port {port}"
            )
        last: Exception | None = None
        for address in addresses:
            try:
                stream = await open_tcp(
                    self._inner, address, port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout, OSError) as exc:
                last = exc
            else:
                return _WatchedStream(stream)
        assert last is not None
        if isinstance(last, httpcore.ConnectTimeout | httpcore.ConnectError):
            raise last
        raise httpcore.ConnectError(str(last)) from last

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 - httpcore's backend signature
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise httpcore.ConnectError("unix sockets are not allowed")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


_EXCEPTIONS: tuple[tuple[type[Exception], type[httpx.HTTPError]], ...] = (
    (httpcore.ConnectTimeout, httpx.ConnectTimeout),
    (httpcore.ReadTimeout, httpx.ReadTimeout),
    (httpcore.WriteTimeout, httpx.WriteTimeout),
    (httpcore.PoolTimeout, httpx.PoolTimeout),
    (httpcore.TimeoutException, httpx.TimeoutException),
    (httpcore.ConnectError, httpx.ConnectError),
    (httpcore.ReadError, httpx.ReadError),
    (httpcore.WriteError, httpx.WriteError),
    (httpcore.NetworkError, httpx.NetworkError),
    (httpcore.UnsupportedProtocol, httpx.UnsupportedProtocol),
    (httpcore.LocalProtocolError, httpx.LocalProtocolError),
    (httpcore.RemoteProtocolError, httpx.RemoteProtocolError),
    (httpcore.ProtocolError, httpx.ProtocolError),
)


def _translate(exc: Exception) -> Exception:
    for source, target in _EXCEPTIONS:
        if isinstance(exc, source):
            return target(str(exc))
    return exc


class _ResponseStream(httpx.AsyncByteStream):
    def __init__(self, stream: Any, on_close: Callable[[], None]) -> None:
        self._stream = stream
        self._on_close: Callable[[], None] | None = on_close

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for part in self._stream:
                yield part
        except httpcore.TimeoutException as exc:
            raise _translate(exc) from exc
        except (httpcore.NetworkError, httpcore.ProtocolError) as exc:
            raise _translate(exc) from exc

    async def aclose(self) -> None:
        try:
            if hasattr(self._stream, "aclose"):
                await self._stream.aclose()
        finally:
            done, self._on_close = self._on_close, None
            if done is not None:
                done()


class PinnedTransport(httpx.AsyncBaseTransport):
    """httpx transport over an httpcore pool whose network backend is :class:`PinnedBackend`.

    Sends a request a second time only when its first attempt failed on a kept-alive
    connection that the server had closed (see the module's docstring).
    """

    def __init__(
        self, max_connections: int, *, keepalive_expiry_s: float = KEEPALIVE_EXPIRY_S
    ) -> None:
        if max_connections < 1:
            raise ValueError(f"max_connections must be at least 1, not {max_connections}")
        shards = -(-max_connections // POOL_SHARD_CONNECTIONS)
        sizes = [
            max_connections // shards + (1 if i < max_connections % shards else 0)
            for i in range(shards)
        ]
        ssl_context, backend = httpx.create_ssl_context(), PinnedBackend()
        self._pools = [
            httpcore.AsyncConnectionPool(
                ssl_context=ssl_context,
                max_connections=size,
                max_keepalive_connections=size,
                keepalive_expiry=keepalive_expiry_s,
                network_backend=backend,
            )
            for size in sizes
        ]
        self._in_flight = [0] * shards
        """Requests sent through each pool whose response has not been closed yet."""

    def _least_busy(self) -> int:
        """The pool with the fewest requests in flight (the first of them: at low rates the
        requests, and so the kept-alive connections, gather in the first pools)."""
        in_flight = self._in_flight
        best = 0
        for i in range(1, len(in_flight)):
            if in_flight[i] < in_flight[best]:
                best = i
        return best

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        shard = self._least_busy()
        self._in_flight[shard] += 1
        try:
            response = await self._send_again_if_unseen(request, self._pools[shard])
        except BaseException as exc:
            self._in_flight[shard] -= 1
            if isinstance(exc, _CORE_ERRORS):
                raise _translate(exc) from exc
            raise

        def closed() -> None:
            self._in_flight[shard] -= 1

        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseStream(response.stream, closed),
            extensions=response.extensions,
        )

    async def _send_again_if_unseen(
        self, request: httpx.Request, pool: httpcore.AsyncConnectionPool
    ) -> httpcore.Response:
        """Send ``request``; once more if the first attempt never reached the server."""
        first = _Exchange()
        try:
            return await self._send(request, first, pool)
        except (httpcore.NetworkError, httpcore.ProtocolError) as exc:
            if not (
                first.unseen_by_server
                and isinstance(request.stream, httpx.ByteStream)
                and _may_arrive_twice(request)
            ):
                raise
            logger.info(
                "http.stale_connection",
                extra={"host": request.url.host, "error": f"{type(exc).__name__}: {exc}"},
            )
        return await self._send(request, _Exchange(), pool)

    async def _send(
        self, request: httpx.Request, exchange: _Exchange, pool: httpcore.AsyncConnectionPool
    ) -> httpcore.Response:
        token = _EXCHANGE.set(exchange)
        try:
            return await pool.handle_async_request(_core_request(request))
        finally:
            _EXCHANGE.reset(token)

    async def aclose(self) -> None:
        for pool in self._pools:
            await pool.aclose()


def _may_arrive_twice(request: httpx.Request) -> bool:
    """Whether the target may safely receive ``request`` twice (see the module docstring)."""
    return request.method in RESENDABLE_METHODS or "idempotency-key" in request.headers


def _core_request(request: httpx.Request) -> httpcore.Request:
    assert isinstance(request.stream, httpx.AsyncByteStream)
    return httpcore.Request(
        method=request.method,
        url=httpcore.URL(
            scheme=request.url.raw_scheme,
            host=request.url.raw_host,
            port=request.url.port,
            target=request.url.raw_path,
        ),
        headers=request.headers.raw,
        content=request.stream,
        extensions=request.extensions,
    )
