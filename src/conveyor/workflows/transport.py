"""An httpx transport that connects only to addresses checked beforehand (no DNS of its own).

The caller resolves and checks a host, then sets :data:`PINS` (a context variable mapping the
URL's host to its checked addresses) around ``client.send``. The network backend looks the
host up there and connects to those addresses in order; a host without a pin is refused
(fail closed). Host header, TLS SNI and certificate checks keep using the host name, because
httpcore still sees the original URL. The pool keys connections by host, so a kept-alive
connection was itself made to a checked address.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping
from contextvars import ContextVar
from typing import Any

import httpcore
import httpx

__all__ = ["PINS", "PinnedBackend", "PinnedTransport", "open_tcp"]

PINS: ContextVar[Mapping[str, tuple[str, ...]] | None] = ContextVar(
    "conveyor_http_pins", default=None
)


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
        addresses = pins.get(host.lower())
        if not addresses:
            raise httpcore.ConnectError(f"refusing to connect to unchecked host {host!r}")
        last: Exception | None = None
        for address in addresses:
            try:
                return await open_tcp(
                    self._inner, address, port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout, OSError) as exc:
                last = exc
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
    def __init__(self, stream: Any) -> None:
        self._stream = stream

    async def __aiter__(self) -> AsyncIterator[bytes]:
        try:
            async for part in self._stream:
                yield part
        except httpcore.TimeoutException as exc:
            raise _translate(exc) from exc
        except (httpcore.NetworkError, httpcore.ProtocolError) as exc:
            raise _translate(exc) from exc

    async def aclose(self) -> None:
        if hasattr(self._stream, "aclose"):
            await self._stream.aclose()


class PinnedTransport(httpx.AsyncBaseTransport):
    """httpx transport over an httpcore pool whose network backend is :class:`PinnedBackend`."""

    def __init__(self, max_connections: int) -> None:
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=30.0,
            network_backend=PinnedBackend(),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.AsyncByteStream)
        core_request = httpcore.Request(
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
        try:
            response = await self._pool.handle_async_request(core_request)
        except (httpcore.TimeoutException, httpcore.NetworkError, httpcore.ProtocolError) as exc:
            raise _translate(exc) from exc
        except httpcore.UnsupportedProtocol as exc:
            raise _translate(exc) from exc
        return httpx.Response(
            status_code=response.status,
            headers=response.headers,
            stream=_ResponseStream(response.stream),
            extensions=response.extensions,
        )

    async def aclose(self) -> None:
        await self._pool.aclose()
