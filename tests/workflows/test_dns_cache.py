"""A client reuses a host's DNS answer for ``HTTP_DNS_CACHE_S`` and shares concurrent lookups,
while every request still checks the addresses it connects to."""

from __future__ import annotations

import asyncio

import pytest

from conveyor.errors import PermanentStepError, RetryableStepError
from conveyor.settings import load_settings
from conveyor.workflows import http as http_module
from conveyor.workflows.http import DnsCache, SafeHttpClient
from tests.workflows.conftest import LocalServer


class FakeDns:
    """``_resolve`` with answers set by the test, counting lookups."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, answer: list[str]) -> None:
        self.answer: list[str] | OSError = answer
        self.lookups: list[str] = []
        self.delay_s = 0.0
        self.cancelled: list[str] = []
        monkeypatch.setattr(http_module, "_resolve", self.resolve)

    async def resolve(self, host: str, port: int) -> list[str]:
        self.lookups.append(host)
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled.append(host)
            raise
        if isinstance(self.answer, OSError):
            raise self.answer
        return list(self.answer)


def client_for(server: LocalServer, cache_s: float) -> SafeHttpClient:
    settings = load_settings(
        {}, http_allowlist=f"127.0.0.1:{server.port}", http_dns_cache_s=cache_s
    )
    return SafeHttpClient(settings)


def url(server: LocalServer, host: str = "svc.example") -> str:
    return f"http://{host}:{server.port}/json"


@pytest.mark.parametrize(("cache_s", "lookups"), [(10, 1), (0, 3)])
async def test_a_name_is_looked_up_once_while_its_answer_is_kept(
    local_server: LocalServer, monkeypatch: pytest.MonkeyPatch, cache_s: float, lookups: int
) -> None:
    """``HTTP_DNS_CACHE_S=0`` looks every request up."""
    dns = FakeDns(monkeypatch, ["127.0.0.1"])
    async with client_for(local_server, cache_s) as client:
        for _ in range(3):
            assert (await client.request("GET", url(local_server))).status == 200
        assert (await client.request("GET", url(local_server, "other.example"))).status == 200
    assert dns.lookups == ["svc.example"] * lookups + ["other.example"]
    assert len(local_server.requests) == 4


async def test_an_expired_answer_is_looked_up_and_checked_again(
    local_server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The name now points inside (rebinding): the new answer is refused like any other."""
    dns = FakeDns(monkeypatch, ["127.0.0.1"])
    async with client_for(local_server, 0.2) as client:
        assert (await client.request("GET", url(local_server))).status == 200
        dns.answer = ["10.0.0.7"]
        assert (await client.request("GET", url(local_server))).status == 200  # kept answer
        await asyncio.sleep(0.3)
        with pytest.raises(PermanentStepError, match="refused to connect"):
            await client.request("GET", url(local_server))
    assert dns.lookups == ["svc.example"] * 2
    assert len(local_server.requests) == 2


async def test_concurrent_requests_share_one_lookup(
    local_server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    dns = FakeDns(monkeypatch, ["127.0.0.1"])
    dns.delay_s = 0.05
    async with client_for(local_server, 0) as client:  # even without keeping answers
        replies = await asyncio.gather(
            *(client.request("GET", url(local_server)) for _ in range(10))
        )
    assert [r.status for r in replies] == [200] * 10
    assert dns.lookups == ["svc.example"]


async def test_a_caller_giving_up_does_not_cancel_the_shared_lookup(
    local_server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    dns = FakeDns(monkeypatch, ["127.0.0.1"])
    dns.delay_s = 0.1
    async with client_for(local_server, 10) as client:
        impatient = asyncio.ensure_future(client.request("GET", url(local_server)))
        patient = asyncio.ensure_future(client.request("GET", url(local_server)))
        await asyncio.sleep(0.02)
        impatient.cancel()
        assert (await patient).status == 200
        with pytest.raises(asyncio.CancelledError):
            await impatient
    assert dns.lookups == ["svc.example"]


async def test_the_last_caller_giving_up_cancels_the_lookup(
    local_server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A name whose DNS does not answer holds no resolver thread after its callers timed out
    (the thread pool is shared by every lookup of the process)."""
    dns = FakeDns(monkeypatch, ["127.0.0.1"])
    dns.delay_s = 5
    async with client_for(local_server, 10) as client:
        with pytest.raises(RetryableStepError, match="timed out"):
            await client.request("GET", url(local_server, "slow.example"), timeout_s=0.05)
        await asyncio.sleep(0)
        assert dns.cancelled == ["slow.example"]
        dns.delay_s = 0
        assert (await client.request("GET", url(local_server, "slow.example"))).status == 200
    assert dns.lookups == ["slow.example"] * 2


async def test_closing_the_client_cancels_its_lookups(
    local_server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    dns = FakeDns(monkeypatch, ["127.0.0.1"])
    dns.delay_s = 5
    client = client_for(local_server, 10)
    async with client:
        pending = asyncio.ensure_future(client.request("GET", url(local_server)))
        await asyncio.sleep(0.02)
    await asyncio.sleep(0)
    assert dns.cancelled == ["svc.example"]
    with pytest.raises((asyncio.CancelledError, RetryableStepError)):
        await pending


async def test_a_failed_lookup_is_not_kept(
    local_server: LocalServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    dns = FakeDns(monkeypatch, ["127.0.0.1"])
    dns.answer = OSError(-3, "Temporary failure in name resolution")
    async with client_for(local_server, 10) as client:
        with pytest.raises(RetryableStepError, match="could not resolve"):
            await client.request("GET", url(local_server))
        dns.answer = []
        with pytest.raises(RetryableStepError, match="has no addresses"):
            await client.request("GET", url(local_server))
        dns.answer = ["127.0.0.1"]
        assert (await client.request("GET", url(local_server))).status == 200
    assert dns.lookups == ["svc.example"] * 3


async def test_the_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeDns(monkeypatch, ["192.0.2.1"])
    now = [0.0]
    cache = DnsCache(10, clock=lambda: now[0])
    monkeypatch.setattr(DnsCache, "MAX_ENTRIES", 3)
    for n in range(5):
        await cache.resolve(f"h{n}.example", 80)
        now[0] += 1
    assert cache.misses == 5
    await cache.resolve("h4.example", 80)  # the newest are kept
    await cache.resolve("h0.example", 80)  # the oldest went first
    assert cache.misses == 6
