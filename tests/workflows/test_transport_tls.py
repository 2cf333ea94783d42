"""HTTPS through the pinned session: the connection goes to the pinned address, while SNI and the
certificate check use the URL's host name (a certificate for another name is refused)."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import aiohttp
import pytest
import trustme
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from conveyor.workflows.transport import PINS, PinnedSession


@dataclass
class TlsServer:
    port: int
    server_names: list[str | None] = field(default_factory=list)
    hosts: list[str] = field(default_factory=list)


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


async def serve_tls(ca: trustme.CA, cert_for: str) -> tuple[TlsServer, web.AppRunner]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(cert_for).configure_cert(context)

    async def hello(request: web.Request) -> web.Response:
        server.hosts.append(request.host)
        return web.Response(text="hello")

    def record_sni(_sock: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
        server.server_names.append(name)

    context.sni_callback = record_sni
    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
    await site.start()
    server = TlsServer(port=runner.addresses[0][1])
    return server, runner


@pytest.fixture
async def session(ca: trustme.CA) -> AsyncIterator[PinnedSession]:
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    pinned = PinnedSession(2, user_agent="conveyor-test", ssl_context=client_context)
    yield pinned
    await pinned.aclose()


async def get(session: PinnedSession, host: str, port: int) -> aiohttp.ClientResponse:
    token = PINS.set({(host, port): ("127.0.0.1",)})
    try:
        return await session.send("GET", URL(f"https://{host}:{port}/"), CIMultiDict(), None)
    finally:
        PINS.reset(token)


async def test_tls_to_a_pinned_address_verifies_the_url_host_name(
    ca: trustme.CA, session: PinnedSession
) -> None:
    server, runner = await serve_tls(ca, "api.example")
    try:
        response = await get(session, "api.example", server.port)
        assert response.status == 200 and await response.text() == "hello"
        response.release()
    finally:
        await runner.cleanup()
    assert server.server_names == ["api.example"]
    assert server.hosts == [f"api.example:{server.port}"]


async def test_a_certificate_for_another_name_is_refused(
    ca: trustme.CA, session: PinnedSession
) -> None:
    server, runner = await serve_tls(ca, "other.example")
    try:
        with pytest.raises(aiohttp.ClientConnectorCertificateError, match=r"api\.example"):
            await get(session, "api.example", server.port)
    finally:
        await runner.cleanup()
    assert server.hosts == []


async def test_the_default_trust_store_refuses_an_unknown_authority(ca: trustme.CA) -> None:
    server, runner = await serve_tls(ca, "api.example")
    pinned = PinnedSession(2, user_agent="conveyor-test")
    try:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await get(pinned, "api.example", server.port)
    finally:
        await pinned.aclose()
        await runner.cleanup()
    assert server.hosts == []
