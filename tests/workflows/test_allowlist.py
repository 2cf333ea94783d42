"""HTTP_ALLOWLIST entries (``host``, ``host:port``, ``cidr``, ``cidr:port``) and their ports.

A port-less entry opens every port of its target; an entry with a port opens only that port,
checked for every hop against the destination port (the URL's, or 80/443 from its scheme),
and again by the transport for every connection it opens.
"""

from __future__ import annotations

import ipaddress

import httpx
import pytest
from multidict import CIMultiDict
from yarl import URL

from conveyor.errors import PermanentStepError
from conveyor.settings import AllowlistEntry, parse_allowlist_entry
from conveyor.workflows import http as http_module
from conveyor.workflows import transport
from conveyor.workflows.http import SafeHttpClient
from tests.helpers import free_port
from tests.workflows.conftest import LocalServer, make_settings

# --- parsing --------------------------------------------------------------------------------------

V4 = ipaddress.IPv4Network
V6 = ipaddress.IPv6Network


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1", AllowlistEntry(V4("127.0.0.1/32"))),
        ("127.0.0.1:45663", AllowlistEntry(V4("127.0.0.1/32"), 45663)),
        ("10.0.0.0/8", AllowlistEntry(V4("10.0.0.0/8"))),
        ("10.0.0.0/8:5432", AllowlistEntry(V4("10.0.0.0/8"), 5432)),
        ("::1", AllowlistEntry(V6("::1/128"))),
        ("[::1]", AllowlistEntry(V6("::1/128"))),
        ("[::1]:8080", AllowlistEntry(V6("::1/128"), 8080)),
        ("fd00::/8", AllowlistEntry(V6("fd00::/8"))),
        ("[fd00::/8]:443", AllowlistEntry(V6("fd00::/8"), 443)),
        ("Hooks.Internal.", AllowlistEntry("hooks.internal")),
        ("hooks.internal:8443", AllowlistEntry("hooks.internal", 8443)),
        ("*.internal", AllowlistEntry(".internal")),
        ("*.internal:443", AllowlistEntry(".internal", 443)),
        ("my_service:80", AllowlistEntry("my_service", 80)),
    ],
)
def test_entries_are_parsed(text: str, expected: AllowlistEntry) -> None:
    assert parse_allowlist_entry(text) == expected


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("127.0.0.1:99999", "port '99999' is not a number from 1 to 65535"),
        ("127.0.0.1:", "port '' is not a number from 1 to 65535"),
        ("localhost:http", "port 'http' is not a number from 1 to 65535"),
        ("10.0.0.0/99", "not a valid CIDR range"),
        ("[::1", "write an IPv6 address with a port as [address]:port"),
        ("[::1]8080", "write an IPv6 address with a port as [address]:port"),
        ("[127.0.0.1]:80", "brackets are only for IPv6 addresses"),
        ("[intranet]:80", "not a valid IPv6 address"),
        ("::1:8080:x", "not a valid IPv6 address"),
        ("127.1", "write an IPv4 address as four decimal numbers"),
        ("0x7f000001:80", "write an IPv4 address as four decimal numbers"),
        ("two words", "not a host name, IP address or CIDR range"),
        ("http://hooks.internal", "not a URL"),
    ],
)
def test_malformed_entries_name_the_entry(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=r"^entry ") as info:
        parse_allowlist_entry(text)
    assert repr(text.lower()) in str(info.value)
    assert reason in str(info.value)


# --- ports ----------------------------------------------------------------------------------------


async def test_an_entry_with_a_port_reaches_that_port(local_server: LocalServer) -> None:
    settings = make_settings(f"127.0.0.1:{local_server.port}")
    async with SafeHttpClient(settings) as client:
        response = await client.request("GET", local_server.url("/json"))
    assert response.status == 200


async def test_an_entry_with_a_port_opens_no_other_port(local_server: LocalServer) -> None:
    # the API's own port is allowed; Redis on the same loopback address is not
    settings = make_settings(f"127.0.0.1:{local_server.port}", f"localhost:{local_server.port}")
    async with SafeHttpClient(settings) as client:
        for url in ("http://127.0.0.1:6379/", "http://localhost:6379/", "http://127.0.0.1/"):
            with pytest.raises(PermanentStepError, match="refused to connect") as info:
                await client.request("GET", url)
            port = info.value.details["port"]
            assert f"add 127.0.0.1:{port} to HTTP_ALLOWLIST" in str(info.value)


async def test_an_entry_without_a_port_opens_every_port(local_server: LocalServer) -> None:
    async with SafeHttpClient(make_settings("127.0.0.1")) as client:
        assert (await client.request("GET", local_server.url("/json"))).status == 200
        destination = await client.check_url(httpx.URL("http://127.0.0.1:6379/"))
    assert destination.port == 6379


@pytest.mark.parametrize(
    ("entry", "allowed", "port", "refused"),
    [
        ("127.0.0.1:80", "http://127.0.0.1/", 80, "https://127.0.0.1/"),
        ("127.0.0.1:443", "https://127.0.0.1/", 443, "http://127.0.0.1/"),
        ("10.0.0.0/8:443", "https://10.1.2.3/", 443, "https://10.1.2.3:8443/"),
        ("[::1]:8080", "http://[::1]:8080/", 8080, "http://[::1]:8081/"),
        ("[fd00::/8]:443", "https://[fd12::1]/", 443, "http://[fd12::1]/"),
        ("*.internal:443", "https://hooks.internal/", 443, "http://hooks.internal/"),
    ],
)
async def test_the_destination_port_defaults_from_the_scheme(
    entry: str, allowed: str, port: int, refused: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def resolve(host: str, port: int) -> list[str]:
        return ["10.9.8.7"]

    monkeypatch.setattr(http_module, "_resolve", resolve)
    async with SafeHttpClient(make_settings(entry)) as client:
        assert (await client.check_url(httpx.URL(allowed))).port == port
        with pytest.raises(PermanentStepError, match="refused to connect"):
            await client.check_url(httpx.URL(refused))


async def test_a_redirect_to_another_port_is_refused(local_server: LocalServer) -> None:
    other = free_port()
    target = f"http://127.0.0.1:{other}/json"
    settings = make_settings(f"127.0.0.1:{local_server.port}")
    async with SafeHttpClient(settings) as client:
        with pytest.raises(PermanentStepError, match="refused to connect") as info:
            await client.request("GET", local_server.url(f"/redirect?to={target}"))
    assert info.value.details["port"] == other
    assert [seen.path.split("?")[0] for seen in local_server.requests] == ["/redirect"]


async def test_a_connection_to_an_unchecked_port_is_refused() -> None:
    session = transport.PinnedSession(1, user_agent="t")
    token = transport.PINS.set({("127.0.0.1", 8080): ("127.0.0.1",)})
    try:
        with pytest.raises(
            transport.UncheckedDestination, match=r"unchecked host '127\.0\.0\.1' port 6379"
        ):
            await session.send("GET", URL("http://127.0.0.1:6379/"), CIMultiDict(), None)
        with pytest.raises(OSError, match=r"unchecked host 'localhost' port 6379"):
            await transport.PinnedResolver().resolve("localhost", 6379)
    finally:
        transport.PINS.reset(token)
        await session.aclose()


async def test_allowed_verdicts_are_kept_per_port_refusals_never(
    local_server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = make_settings(f"127.0.0.1:{local_server.port}")
    async with SafeHttpClient(settings) as client:
        for _ in range(2):  # the second request is answered from the kept verdict
            assert (await client.request("GET", local_server.url("/json"))).status == 200
        assert ("127.0.0.1", local_server.port) in client._allowed
        for _ in range(2):  # the same address on another port: refused each time
            with pytest.raises(PermanentStepError, match="refused to connect"):
                await client.check_url(httpx.URL("http://127.0.0.1:6379/"))
        assert ("127.0.0.1", 6379) not in client._allowed
        # kept by resolved address, not by name: a name re-pointed at a refused address is
        # refused although the same name was allowed a moment ago (no DNS cache here)
        answers = ["127.0.0.1"]

        async def resolve(host: str, port: int) -> list[str]:
            return list(answers)

        monkeypatch.setattr(http_module, "_resolve", resolve)
        monkeypatch.setattr(client.dns, "ttl_s", 0.0)
        named = httpx.URL(f"http://hooks.test:{local_server.port}/")
        assert (await client.check_url(named)).addresses == ("127.0.0.1",)
        answers[:] = ["10.1.2.3"]
        with pytest.raises(PermanentStepError, match=r"10\.1\.2\.3 is a private address"):
            await client.check_url(named)
        # bounded: a client that has seen many destinations forgets them all and goes on
        monkeypatch.setattr(http_module, "_ALLOWED_MAX", 3)
        for port in range(1, 6):
            client._check_address("public.example", "93.184.215.14", port)
        assert 1 <= len(client._allowed) <= 3
