"""The SSRF-guarded HTTP client and the ``http`` step (against local servers only)."""

from __future__ import annotations

import asyncio
import base64
import logging
import select
import socket
import threading
import time
import tracemalloc
from collections.abc import Iterator
from typing import Any, Literal

import pytest
from aiohttp.abc import ResolveResult
from multidict import CIMultiDict
from yarl import URL

from conveyor.errors import PermanentStepError, RetryableStepError
from conveyor.settings import load_settings
from conveyor.workflows import http as http_module
from conveyor.workflows import transport
from conveyor.workflows.definition import HttpStep, parse_definition
from conveyor.workflows.http import SafeHttpClient, address_refusal, parse_ip_literal
from conveyor.workflows.steps import StepContext, run_step
from tests.helpers import free_port
from tests.workflows.conftest import LocalServer, gzipped_json_pad, make_settings


def http_step(**fields: Any) -> HttpStep:
    definition = parse_definition(
        {"name": "t", "steps": [{"id": "call", "type": "http", **fields}]}
    )
    step = definition.steps[0]
    assert isinstance(step, HttpStep)
    return step


def ctx(*allowlist: str, input: Any = None, http: SafeHttpClient | None = None) -> StepContext:
    return StepContext(
        input=input,
        steps={},
        execution_id="e1",
        workflow_id="w1",
        tenant_id="t1",
        settings=make_settings(*allowlist),
        http=http,
    )


@pytest.fixture
def no_dns(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Fail loudly if anything is resolved: literals must never reach DNS."""
    calls: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        calls.append(host)
        raise AssertionError(f"unexpected DNS lookup of {host!r}")

    monkeypatch.setattr(http_module, "_resolve", resolve)
    return calls


# --- refusals -------------------------------------------------------------------------------------

REFUSED = [
    "http://127.0.0.1/",
    "http://127.1/",
    "http://0x7f000001/",
    "http://2130706433/",
    "http://0x7f.1/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::1]/",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.1/",
    "http://172.16.5.4/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",
    "http://0.0.0.0/",
    "http://[::]/",
    "http://224.0.0.1/",
    "http://[fe80::1]/",
    "http://[fc00::1]/",
    "http://[64:ff9b::7f00:1]/",
    "http://[2002:7f00:1::]/",
    "http://[::127.0.0.1]/",
    "https://127.0.0.1:8443/",
]


@pytest.mark.parametrize("url", REFUSED)
async def test_refuses_internal_addresses(url: str, no_dns: list[str]) -> None:
    async with SafeHttpClient(make_settings()) as client:
        with pytest.raises(PermanentStepError, match="refused to connect"):
            await client.request("GET", url)
    assert no_dns == []


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "gopher://127.0.0.1:70/_x", "ftp://example.com/", "dict://x/"]
)
async def test_refuses_other_schemes(url: str, no_dns: list[str]) -> None:
    async with SafeHttpClient(make_settings()) as client:
        with pytest.raises(PermanentStepError, match=r"refused URL scheme|request refused"):
            await client.request("GET", url)


async def test_octal_form_is_refused_too(no_dns: list[str]) -> None:
    # httpx itself rejects the URL; parse_ip_literal also knows what the address would be
    assert str(parse_ip_literal("0177.0.0.1")) == "127.0.0.1"
    async with SafeHttpClient(make_settings()) as client:
        with pytest.raises(PermanentStepError):
            await client.request("GET", "http://0177.0.0.1/")


def test_public_addresses_pass() -> None:
    for address in ("8.8.8.8", "1.1.1.1", "2606:4700::1111", "64:ff9b::808:808"):
        literal = parse_ip_literal(address)
        assert literal is not None and address_refusal(literal) is None


async def test_refuses_a_name_that_resolves_inside(monkeypatch: pytest.MonkeyPatch) -> None:
    answers = {"internal.example": ["10.1.2.3"], "mixed.example": ["8.8.8.8", "127.0.0.1"]}

    async def resolve(host: str, port: int) -> list[str]:
        return answers[host]

    monkeypatch.setattr(http_module, "_resolve", resolve)
    async with SafeHttpClient(make_settings()) as client:
        for host in answers:
            with pytest.raises(PermanentStepError, match="refused to connect"):
                await client.request("GET", f"http://{host}/")


async def test_templated_url_is_checked_at_run_time(no_dns: list[str]) -> None:
    step = http_step(url="{{ input.target }}")
    for target in ("http://169.254.169.254/", "file:///etc/passwd", "gopher://127.0.0.1/"):
        with pytest.raises(PermanentStepError):
            await run_step(step, ctx(input={"target": target}))


async def test_unpinned_connections_are_refused() -> None:
    with pytest.raises(OSError, match="unchecked host"):
        await transport.PinnedResolver().resolve("example.com", 80)
    session = transport.PinnedSession(1, user_agent="t")
    try:
        with pytest.raises(transport.UncheckedDestination, match="unchecked host"):
            await session.send("GET", URL("http://127.0.0.1:80/"), CIMultiDict(), None)
    finally:
        await session.aclose()


# --- allow-list, redirects ------------------------------------------------------------------------


async def test_allowlisted_name_reaches_local_server(local_server: LocalServer) -> None:
    result = await run_step(http_step(url=local_server.url("/json", "localhost")), ctx("localhost"))
    assert result.output["status"] == 200
    assert result.output["body"] == {"hello": "world", "server": "127.0.0.1"}
    assert result.output["headers"]["content-type"] == "application/json"


async def test_allowlisted_cidr_reaches_local_server(local_server: LocalServer) -> None:
    result = await run_step(http_step(url=local_server.url("/text")), ctx("127.0.0.0/8"))
    assert result.output["body"] == "plain text ✓"


@pytest.mark.parametrize("target_host", ["127.0.0.1", "127.0.0.2", "::1"])
async def test_each_redirect_hop_is_checked(local_server: LocalServer, target_host: str) -> None:
    # "localhost" is allowed by name; the addresses a redirect points at are not.
    target = local_server.url("/json", target_host)
    start = local_server.url(f"/redirect?to={target}", "localhost")
    with pytest.raises(PermanentStepError, match="refused to connect") as info:
        await run_step(http_step(url=start), ctx("localhost"))
    assert info.value.details["address"] == target_host
    assert [seen.path.split("?")[0] for seen in local_server.requests] == ["/redirect"]


async def test_redirect_to_file_scheme_is_refused(local_server: LocalServer) -> None:
    start = local_server.url("/redirect?to=file:///etc/passwd", "localhost")
    with pytest.raises(PermanentStepError, match="refused URL scheme"):
        await run_step(http_step(url=start), ctx("localhost"))


async def test_allowed_redirect_is_followed(local_server: LocalServer) -> None:
    start = local_server.url("/redirect?to=/echo&code=303", "localhost")
    step = http_step(url=start, method="POST", body={"a": 1}, headers={"Authorization": "x"})
    result = await run_step(step, ctx("localhost"))
    assert result.output["body"]["method"] == "GET"  # 303: GET without the body
    assert result.output["body"]["headers"]["authorization"] == "x"  # same origin: kept
    assert result.output["url"].endswith("/echo")


async def test_redirect_limit(local_server: LocalServer) -> None:
    step = http_step(url=local_server.url("/loop", "localhost"), max_redirects=3)
    with pytest.raises(PermanentStepError, match="too many redirects"):
        await run_step(step, ctx("localhost"))
    assert len(local_server.requests) == 4


async def test_redirect_not_followed_when_disabled(local_server: LocalServer) -> None:
    step = http_step(
        url=local_server.url("/redirect?to=/json", "localhost"),
        follow_redirects=False,
        expect_status=[302],
    )
    result = await run_step(step, ctx("localhost"))
    assert result.output["status"] == 302
    assert result.output["headers"]["location"] == "/json"


# --- DNS rebinding --------------------------------------------------------------------------------


async def test_one_resolution_and_connect_to_checked_address(
    server_pair: tuple[LocalServer, LocalServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    checked, rebound = server_pair  # same port: 127.0.0.2 (allowed) and 127.0.0.1 (not)
    lookups: list[str] = []

    async def resolve(host: str, port: int) -> list[str]:
        lookups.append(host)
        return ["127.0.0.2"] if len(lookups) == 1 else ["127.0.0.1"]

    monkeypatch.setattr(http_module, "_resolve", resolve)
    step = http_step(url=f"http://rebind.test:{checked.port}/json")
    no_dns_cache = load_settings({}, http_allowlist="127.0.0.2/32", http_dns_cache_s=0)
    async with SafeHttpClient(no_dns_cache) as client:  # (a kept answer: test_dns_cache.py)
        result = await run_step(step, ctx(http=client))
        assert result.output["body"]["server"] == "127.0.0.2"
        assert lookups == ["rebind.test"]
        assert [seen.headers["host"] for seen in checked.requests] == [
            f"rebind.test:{checked.port}"
        ]
        # the next request resolves again, gets the loopback answer, and is refused
        with pytest.raises(PermanentStepError, match=r"127\.0\.0\.1"):
            await run_step(step, ctx(http=client))
    assert rebound.requests == []


async def test_connects_only_to_the_resolved_public_address(
    local_server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    lookups: list[str] = []
    connects: list[tuple[str, int]] = []

    async def resolve(host: str, port: int) -> list[str]:
        lookups.append(host)
        return ["93.184.216.34"] if len(lookups) == 1 else ["127.0.0.1"]

    real = transport.PinnedResolver.resolve

    async def pinned(
        self: transport.PinnedResolver, host: str, port: int = 0, family: Any = 0
    ) -> list[ResolveResult]:
        """What the connector is told to connect to (recorded; no internet in tests)."""
        connects.extend((r["host"], r["port"]) for r in await real(self, host, port, family))
        raise OSError("no internet in tests")

    monkeypatch.setattr(http_module, "_resolve", resolve)
    monkeypatch.setattr(transport.PinnedResolver, "resolve", pinned)
    step = http_step(url=f"http://public.example:{local_server.port}/json")
    with pytest.raises(RetryableStepError, match="ClientConnectorDNSError"):
        await run_step(step, ctx())
    assert lookups == ["public.example"]
    assert connects == [("93.184.216.34", local_server.port)]
    assert local_server.requests == []


# --- responses and error mapping ------------------------------------------------------------------


async def test_templated_request(local_server: LocalServer) -> None:
    step = http_step(
        method="POST",
        url=local_server.url("/echo?q={{ input.q }}&id={{ execution.id }}", "localhost"),
        headers={"X-User": "{{ input.user.name }}", "X-Count": "{{ length(input.items) }}"},
        body={"items": "{{ input.items }}", "note": "hi {{ input.user.name }}", "n": 3},
    )
    data = {"q": "a b/../c?&x=1", "user": {"name": "Ada"}, "items": [1, 2]}
    result = await run_step(step, ctx("localhost", input=data))
    echoed = result.output["body"]
    assert echoed["path"] == "/echo?q=a%20b%2F..%2Fc%3F%26x%3D1&id=e1"
    assert echoed["headers"]["x-user"] == "Ada"
    assert echoed["headers"]["x-count"] == "2"
    assert echoed["headers"]["content-type"] == "application/json"
    assert echoed["body"] == '{"items":[1,2],"note":"hi Ada","n":3}'


async def test_header_values_go_out_as_utf8(local_server: LocalServer) -> None:
    step = http_step(url=local_server.url("/echo", "localhost"), headers={"X-User": "Zoë · 東京"})
    await run_step(step, ctx("localhost"))
    (seen,) = local_server.requests  # http.server reads header bytes as ISO-8859-1
    assert seen.headers["x-user"].encode("latin-1").decode("utf-8") == "Zoë · 東京"


async def test_head_and_text_bodies(local_server: LocalServer) -> None:
    result = await run_step(
        http_step(url=local_server.url("/json", "localhost"), method="HEAD"), ctx("localhost")
    )
    assert result.output["status"] == 200 and result.output["body"] is None
    step = http_step(url=local_server.url("/echo", "localhost"), method="PUT", body="raw")
    echoed = (await run_step(step, ctx("localhost"))).output["body"]
    assert echoed["body"] == "raw"
    assert echoed["headers"]["content-type"] == "text/plain; charset=utf-8"


@pytest.mark.parametrize("path", ["/big?n=200000", "/chunked?n=5000000"])
async def test_response_size_cap(local_server: LocalServer, path: str) -> None:
    step = http_step(url=local_server.url(path, "localhost"), max_response_bytes=10_000)
    started = time.monotonic()
    with pytest.raises(PermanentStepError, match="larger than max_response_bytes"):
        await run_step(step, ctx("localhost"))
    assert time.monotonic() - started < 5


async def test_a_compressed_response_is_decoded(local_server: LocalServer) -> None:
    result = await run_step(
        http_step(url=local_server.url("/gzip?n=5", "localhost")), ctx("localhost")
    )
    assert result.output["body"] == {"pad": "zzzzz"}
    assert local_server.requests[0].headers["accept-encoding"].startswith("gzip")


async def test_a_decompression_bomb_stops_at_the_cap_without_inflating(
    local_server: LocalServer,
) -> None:
    """~50 KB on the wire, 50 MB decoded: the cap counts decoded bytes, and decoding stops
    there — the process never holds the 50 MB."""
    step = http_step(
        url=local_server.url("/gzip?n=50000000", "localhost"), max_response_bytes=100_000
    )
    assert len(gzipped_json_pad(50_000_000)) < 100_000  # made (and kept) before measuring
    tracemalloc.start()
    try:
        with pytest.raises(PermanentStepError, match="larger than max_response_bytes"):
            await run_step(step, ctx("localhost"))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 20_000_000


async def test_an_undecodable_body_fails_for_good(local_server: LocalServer) -> None:
    with pytest.raises(PermanentStepError, match="undecodable response"):
        await run_step(
            http_step(url=local_server.url("/gzip?bad=1", "localhost")), ctx("localhost")
        )


@pytest.mark.parametrize("host", ["127.1", "2130706433"])
async def test_a_legacy_ipv4_form_is_refused_for_good_even_when_allowed(
    local_server: LocalServer, host: str
) -> None:
    """Checked as 127.0.0.1 (allow-listed here), then refused by the connector, which wants the
    canonical form of an all-decimal host: nothing is sent. (``0x7f000001`` is a name to it:
    it connects to the checked address through the pin.)"""
    step = http_step(url=f"http://{host}:{local_server.port}/json")
    with pytest.raises(PermanentStepError, match="not a canonical IPv4 address"):
        await run_step(step, ctx(f"127.0.0.1:{local_server.port}"))
    assert local_server.requests == []


async def test_large_response_heads_are_read_as_httpx_read_them(local_server: LocalServer) -> None:
    for query in ("size=12000", "count=200"):
        step = http_step(url=local_server.url(f"/heads?{query}", "localhost"))
        assert (await run_step(step, ctx("localhost"))).output["status"] == 200
    step = http_step(url=local_server.url("/heads?size=20000", "localhost"))
    with pytest.raises(RetryableStepError, match=r"^invalid response: .*bytes") as info:
        await run_step(step, ctx("localhost"))
    assert "400" not in info.value.message  # not a status the server sent


async def test_response_under_cap(local_server: LocalServer) -> None:
    step = http_step(url=local_server.url("/big?n=10000", "localhost"), max_response_bytes=10_000)
    assert len((await run_step(step, ctx("localhost"))).output["body"]) == 10_000


@pytest.mark.parametrize("status", [500, 502, 503, 429, 408])
async def test_retryable_statuses(local_server: LocalServer, status: int) -> None:
    step = http_step(url=local_server.url(f"/status/{status}", "localhost"))
    with pytest.raises(RetryableStepError, match=f"HTTP {status}") as info:
        await run_step(step, ctx("localhost"))
    assert info.value.details["status"] == status
    if status in (429, 503):
        assert info.value.details["retry_after_s"] == 7


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
async def test_permanent_statuses(local_server: LocalServer, status: int) -> None:
    step = http_step(url=local_server.url(f"/status/{status}", "localhost"))
    with pytest.raises(PermanentStepError, match=f"HTTP {status}") as info:
        await run_step(step, ctx("localhost"))
    assert info.value.details["body"] == f'{{"error": "status {status}"}}'


async def test_userinfo_never_reaches_outputs_or_errors(local_server: LocalServer) -> None:
    """A password in the URL is sent as Basic auth but never stored: not in the output's
    ``url``, not in an error's message or details."""
    ok = local_server.url("/json", "localhost").replace("http://", "http://ada:hunter2@")
    result = await run_step(http_step(url=ok), ctx("localhost"))
    assert "hunter2" not in str(result.output) and "[redacted]@" in result.output["url"]
    (seen,) = local_server.requests
    assert seen.headers["authorization"] == "Basic " + base64.b64encode(b"ada:hunter2").decode()
    failing = local_server.url("/status/500", "localhost").replace("http://", "http://ada:hunter2@")
    with pytest.raises(RetryableStepError) as info:
        await run_step(http_step(url=failing), ctx("localhost"))
    assert "hunter2" not in info.value.message and "hunter2" not in str(info.value.details)


async def test_expected_status(local_server: LocalServer) -> None:
    step = http_step(url=local_server.url("/status/404", "localhost"), expect_status=[200, 404])
    result = await run_step(step, ctx("localhost"))
    assert result.output["status"] == 404
    assert result.output["body"] == {"error": "status 404"}
    step = http_step(url=local_server.url("/json", "localhost"), expect_status=[201])
    with pytest.raises(PermanentStepError, match="HTTP 200"):
        await run_step(step, ctx("localhost"))


async def test_connection_refused_is_retryable() -> None:
    step = http_step(url=f"http://localhost:{free_port()}/")
    with pytest.raises(RetryableStepError, match="ClientConnectorError"):
        await run_step(step, ctx("localhost"))


async def test_timeout_is_retryable(local_server: LocalServer) -> None:
    step = http_step(url=local_server.url("/slow?s=2", "localhost"), timeout_s=0.3)
    started = time.monotonic()
    with pytest.raises(RetryableStepError, match="timed out"):
        await run_step(step, ctx("localhost"))
    assert time.monotonic() - started < 1.5


async def test_unresolvable_host_is_retryable(monkeypatch: pytest.MonkeyPatch) -> None:
    async def resolve(host: str, port: int) -> list[str]:
        raise OSError(-2, "Name or service not known")

    monkeypatch.setattr(http_module, "_resolve", resolve)
    with pytest.raises(RetryableStepError, match="could not resolve"):
        await run_step(http_step(url="https://nowhere.invalid/"), ctx())


async def test_client_must_be_open() -> None:
    client = SafeHttpClient(make_settings())
    with pytest.raises(RuntimeError, match="async with"):
        await client.request("GET", "http://example.com/")


async def test_no_cookies_leak_between_requests(local_server: LocalServer) -> None:
    async with SafeHttpClient(make_settings("localhost")) as client:
        await run_step(http_step(url=local_server.url("/setcookie", "localhost")), ctx(http=client))
        echo = http_step(url=local_server.url("/echo", "localhost"))
        echoed = (await run_step(echo, ctx(http=client))).output["body"]
    assert "cookie" not in echoed["headers"]


async def test_non_ascii_header_values(local_server: LocalServer) -> None:
    step = http_step(url=local_server.url("/echo", "localhost"), headers={"X-Name": "{{ input }}"})
    echoed = (await run_step(step, ctx("localhost", input="Zoë"))).output["body"]
    assert echoed["headers"]["x-name"].encode("latin-1").decode() == "Zoë"


async def test_userinfo_does_not_hide_the_real_host(local_server: LocalServer) -> None:
    # "localhost" is allowed, but the host of this URL is 127.0.0.2
    url = f"http://localhost@127.0.0.2:{local_server.port}/json"
    with pytest.raises(PermanentStepError, match=r"refused to connect to '127\.0\.0\.2'"):
        await run_step(http_step(url=url), ctx("localhost"))


# --- stale kept-alive connections -----------------------------------------------------------------

Ending = Literal["reset", "eof", "unanswered", "partial", "idle"]


class KeepAliveServer:
    """A raw HTTP/1.1 server whose connections end badly, counting the requests it reads.

    Each connection answers its first request as if keeping the connection alive, then:

    * ``reset`` — closes it when the next request arrives, without reading it (the peer sees a
      reset), as a server whose idle timeout fires just as the request comes in;
    * ``eof`` — the same, but the bytes are taken off the socket (never parsed as a request)
      before the close, so the peer sees a clean end of stream: "Server disconnected without
      sending a response";
    * ``partial`` — reads the next request, sends half a status line and closes;
    * ``unanswered`` — does not answer even the first request: reads it and closes;
    * ``idle`` — closes it right after the answer (its idle timeout fired before the client's
      next request: the client can see the end of stream before it sends).
    """

    def __init__(self, ending: Ending) -> None:
        self.ending = ending
        self.requests: list[bytes] = []
        self.connections = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        threading.Thread(target=self._accept, name="keepalive-server", daemon=True).start()

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self._listener.close()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            if not self._read_request(conn) or self.ending == "unanswered":
                return
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
            )
            if self.ending == "idle":
                return
            select.select([conn], [], [], 10)  # the client's next request is here
            if self.ending == "eof":
                conn.recv(65536)
            elif self.ending == "partial" and self._read_request(conn):
                conn.sendall(b"HTTP/1.1 2")

    def _read_request(self, conn: socket.socket) -> bool:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                return False
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = next(
            (
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        while len(body) < length:
            body += conn.recv(65536)
        self.requests.append(head.split(b"\r\n", 1)[0])
        return True


@pytest.fixture
def keepalive_server(request: pytest.FixtureRequest) -> Iterator[KeepAliveServer]:
    server = KeepAliveServer(request.param)
    yield server
    server.close()


def post_step(server: KeepAliveServer, n: int) -> HttpStep:
    return http_step(url=server.url(f"/hook/{n}"), method="POST", body={"n": n})


def keyed_post_step(server: KeepAliveServer, n: int) -> HttpStep:
    return http_step(
        url=server.url(f"/hook/{n}"), method="POST", body={"n": n},
        headers={"Idempotency-Key": f"k{n}"},
    )  # fmt: skip


def get_step(server: KeepAliveServer, n: int) -> HttpStep:
    return http_step(url=server.url(f"/hook/{n}"))


@pytest.mark.parametrize("keepalive_server", ["reset", "eof"], indirect=True)
@pytest.mark.parametrize(("make_step", "method"), [(get_step, "GET"), (keyed_post_step, "POST")])
async def test_a_request_on_a_connection_the_server_closed_is_sent_again(
    keepalive_server: KeepAliveServer,
    caplog: pytest.LogCaptureFixture,
    make_step: Any,
    method: str,
) -> None:
    """A request that may arrive twice (idempotent method, or an Idempotency-Key) is sent once
    more on a fresh connection when the kept-alive one turns out closed."""
    caplog.set_level(logging.INFO, logger=transport.__name__)
    async with SafeHttpClient(make_settings(f"127.0.0.1:{keepalive_server.port}")) as client:
        for n in range(3):
            result = await run_step(make_step(keepalive_server, n), ctx(http=client))
            assert result.output["status"] == 200
    # one request per step call reached the server: no duplicate side effect
    assert keepalive_server.requests == [f"{method} /hook/{n} HTTP/1.1".encode() for n in range(3)]
    assert keepalive_server.connections == 3
    resent = [r for r in caplog.records if r.msg == "http.stale_connection"]
    assert len(resent) == 2


@pytest.mark.parametrize("keepalive_server", ["eof"], indirect=True)
async def test_a_post_without_an_idempotency_key_is_never_sent_twice(
    keepalive_server: KeepAliveServer,
) -> None:
    """A plain POST on a stale connection fails (retryable) rather than risk arriving twice:
    the server may have read it before closing."""
    async with SafeHttpClient(make_settings(f"127.0.0.1:{keepalive_server.port}")) as client:
        await run_step(post_step(keepalive_server, 0), ctx(http=client))
        with pytest.raises(RetryableStepError):
            await run_step(post_step(keepalive_server, 1), ctx(http=client))
    assert keepalive_server.requests == [b"POST /hook/0 HTTP/1.1"]


@pytest.mark.parametrize("keepalive_server", ["idle"], indirect=True)
async def test_a_connection_the_server_closed_while_idle_is_not_used(
    keepalive_server: KeepAliveServer,
) -> None:
    """The pool sees that an idle connection's server end closed (its socket reads the end of
    stream) and opens a new one: even a plain POST, never sent twice, goes through."""
    async with SafeHttpClient(make_settings(f"127.0.0.1:{keepalive_server.port}")) as client:
        for n in range(3):
            result = await run_step(post_step(keepalive_server, n), ctx(http=client))
            assert result.output["status"] == 200
            await asyncio.sleep(0.05)  # the server's close reaches the client's socket
    assert keepalive_server.requests == [f"POST /hook/{n} HTTP/1.1".encode() for n in range(3)]
    assert keepalive_server.connections == 3


@pytest.mark.parametrize("keepalive_server", ["unanswered"], indirect=True)
async def test_a_plain_post_the_server_read_is_not_sent_again(
    keepalive_server: KeepAliveServer,
) -> None:
    async with SafeHttpClient(make_settings(f"127.0.0.1:{keepalive_server.port}")) as client:
        with pytest.raises(RetryableStepError, match="ServerDisconnectedError"):
            await run_step(post_step(keepalive_server, 0), ctx(http=client))
    assert keepalive_server.requests == [b"POST /hook/0 HTTP/1.1"]
    assert keepalive_server.connections == 1


@pytest.mark.parametrize("keepalive_server", ["unanswered"], indirect=True)
@pytest.mark.parametrize(("make_step", "method"), [(get_step, "GET"), (keyed_post_step, "POST")])
async def test_a_request_on_a_new_connection_is_not_sent_again(
    keepalive_server: KeepAliveServer, make_step: Any, method: str
) -> None:
    """Closed without a byte of answer, but on a connection opened for it: not the stale
    kept-alive connection the resend is for — the server read it, and may have acted."""
    async with SafeHttpClient(make_settings(f"127.0.0.1:{keepalive_server.port}")) as client:
        with pytest.raises(RetryableStepError, match="ServerDisconnectedError"):
            await run_step(make_step(keepalive_server, 0), ctx(http=client))
    assert keepalive_server.requests == [f"{method} /hook/0 HTTP/1.1".encode()]
    assert keepalive_server.connections == 1


@pytest.mark.parametrize("keepalive_server", ["partial"], indirect=True)
@pytest.mark.parametrize(
    ("make_step", "method"),
    [(post_step, "POST"), (get_step, "GET"), (keyed_post_step, "POST")],
)
async def test_a_request_with_part_of_an_answer_is_not_sent_again(
    keepalive_server: KeepAliveServer, make_step: Any, method: str
) -> None:
    """Part of a status line came back: the server handled the request, whatever its method."""
    async with SafeHttpClient(make_settings(f"127.0.0.1:{keepalive_server.port}")) as client:
        await run_step(make_step(keepalive_server, 0), ctx(http=client))
        with pytest.raises(RetryableStepError, match="ServerDisconnectedError"):
            await run_step(make_step(keepalive_server, 1), ctx(http=client))
    assert keepalive_server.requests == [f"{method} /hook/{n} HTTP/1.1".encode() for n in (0, 1)]
    assert keepalive_server.connections == 1


# --- parsed URLs ----------------------------------------------------------------------------------


async def test_a_url_called_again_is_parsed_once(local_server: LocalServer) -> None:
    """The same short URL is parsed once and the parse reused (an ``httpx.URL`` is
    immutable): both calls reach the server and answer alike. A longer URL, or one that does
    not parse, is parsed (and refused) every time; the cache is bounded."""
    http_module._parse_cached.cache_clear()
    url = local_server.url("/json", "localhost")
    first = await run_step(http_step(url=url), ctx("localhost"))
    second = await run_step(http_step(url=url), ctx("localhost"))
    assert first.output == second.output and first.output["status"] == 200
    assert len(local_server.requests) == 2
    info = http_module._parse_cached.cache_info()
    assert (info.misses, info.hits) == (1, 1)
    assert http_module.parse_url(url) is http_module.parse_url(url)
    assert str(http_module.parse_url(url)) == url

    long = url + "?pad=" + "x" * http_module.PARSED_URL_MAX_CHARS
    assert http_module.parse_url(long) is not http_module.parse_url(long)
    assert http_module.parse_url(long) == http_module.parse_url(long)
    for _ in range(2):
        with pytest.raises(PermanentStepError, match="invalid URL"):
            await run_step(http_step(url="http://[::1/"), ctx("localhost"))
    assert http_module._parse_cached.cache_info().currsize == 1
    assert http_module._parse_cached.cache_info().maxsize == http_module.PARSED_URLS_CACHED
