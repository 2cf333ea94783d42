"""Connecting to Redis: fail fast with a clear message; ACL users; TLS; the ``check`` command."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio.sentinel import SentinelConnectionPool

from conveyor.errors import QueueNotReady, QueueUnavailable
from conveyor.queue import JobContext, QueueFactory, connection
from tests.helpers import (
    env_for,
    free_port,
    port_open,
    redis_server,
    self_signed_cert,
    wait_for,
)
from tests.queue.conftest import TEST_QUEUE, eventually, make_settings, running
from tests.queue.payload import Probe


async def roundtrip(qf: QueueFactory) -> None:
    """Enqueue one job and have a worker of the same factory process it."""
    seen: list[int] = []

    async def process(payload: Probe, ctx: JobContext) -> None:
        seen.append(payload.n)

    await qf.create_queue(TEST_QUEUE).add(Probe(n=7))
    async with running(qf.create_worker(TEST_QUEUE, process)):
        await eventually(lambda: seen == [7], within=5)


async def test_unreachable_port_fails_fast(redis_prefix: str) -> None:
    port = free_port()
    settings = make_settings(redis_prefix, QUEUE_REDIS_PORT=str(port))
    async with QueueFactory(settings) as qf:
        begin = time.monotonic()
        with pytest.raises(QueueUnavailable, match=rf"127\.0\.0\.1:{port}/0 is unreachable"):
            await qf.assert_queue_is_ready()
        with pytest.raises(QueueUnavailable, match="unreachable"):
            await qf.create_queue(TEST_QUEUE).add(Probe(n=1))
        assert time.monotonic() - begin < 3


async def test_enqueue_fails_fast_when_redis_hangs(redis_prefix: str) -> None:
    """A server that accepts connections but never answers: enqueue gives up in seconds."""
    with redis_server() as server:
        assert server.proc is not None
        settings = make_settings(redis_prefix, QUEUE_REDIS_PORT=str(server.port))
        async with QueueFactory(settings) as qf:
            server.proc.send_signal(19)  # SIGSTOP
            try:
                begin = time.monotonic()
                with pytest.raises(QueueUnavailable):
                    await qf.create_queue(TEST_QUEUE).add(Probe(n=1))
                assert time.monotonic() - begin < settings.queue_redis_socket_timeout_ms / 1000 + 1
            finally:
                server.proc.send_signal(18)  # SIGCONT


async def test_wrong_or_missing_password_fails_fast(redis_prefix: str) -> None:
    with redis_server("--requirepass", "s3cret") as server:
        port = str(server.port)
        for env in ({"QUEUE_REDIS_PASSWORD": "wrong"}, {}):
            settings = make_settings(redis_prefix, QUEUE_REDIS_PORT=port, **env)
            async with QueueFactory(settings) as qf:
                begin = time.monotonic()
                with pytest.raises(QueueUnavailable, match="refused the credentials") as info:
                    await qf.assert_queue_is_ready()
                assert time.monotonic() - begin < 3
                assert "s3cret" not in str(info.value) and "wrong" not in str(info.value)
        good = make_settings(redis_prefix, QUEUE_REDIS_PORT=port, QUEUE_REDIS_PASSWORD="s3cret")
        async with QueueFactory(good) as qf:
            await qf.assert_queue_is_ready()
            await roundtrip(qf)


async def test_acl_username_and_password(redis_prefix: str) -> None:
    acl = ["--user", "conveyor", "on", ">pw-1", "~*", "&*", "+@all"]
    limited = ["--user", "limited", "on", ">pw-2", "~*", "&*", "+@all", "-info", "-config"]
    with redis_server(*acl, *limited) as server:
        port = str(server.port)
        settings = make_settings(
            redis_prefix,
            QUEUE_REDIS_PORT=port,
            QUEUE_REDIS_USERNAME="conveyor",
            QUEUE_REDIS_PASSWORD="pw-1",
        )
        async with QueueFactory(settings) as qf:
            await qf.assert_queue_is_ready()
            await roundtrip(qf)
        wrong = make_settings(
            redis_prefix,
            QUEUE_REDIS_PORT=port,
            QUEUE_REDIS_USERNAME="conveyor",
            QUEUE_REDIS_PASSWORD="nope",
        )
        async with QueueFactory(wrong) as qf:
            with pytest.raises(
                QueueUnavailable, match="refused the credentials for user 'conveyor'"
            ):
                await qf.assert_queue_is_ready()
        # A user without INFO/CONFIG: still usable, the health fields it cannot read are None.
        restricted = make_settings(
            redis_prefix,
            QUEUE_REDIS_PORT=port,
            QUEUE_REDIS_USERNAME="limited",
            QUEUE_REDIS_PASSWORD="pw-2",
        )
        async with QueueFactory(restricted) as qf:
            await qf.assert_queue_is_ready()
            report = await qf.health()
            assert report["status"] == "ready"
            assert report["redisVersion"] is None and report["evictionPolicy"] is None
            assert report["persistence"] == {"aof": None, "rdb": None}
            await roundtrip(qf)


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A self-signed certificate for 127.0.0.1/localhost, made with the openssl CLI."""
    yield self_signed_cert(tmp_path_factory.mktemp("tls"))


async def test_tls(redis_prefix: str, tls_files: tuple[Path, Path]) -> None:
    cert, key = tls_files
    port = free_port()
    args = [
        "--port",
        "0",
        "--tls-port",
        str(port),
        "--tls-cert-file",
        str(cert),
        "--tls-key-file",
        str(key),
        "--tls-ca-cert-file",
        str(cert),
        "--tls-auth-clients",
        "no",
    ]
    with redis_server(*args, port=port):
        wait_for(lambda: port_open(port), timeout=10)
        env = {"QUEUE_REDIS_PORT": str(port), "QUEUE_REDIS_TLS": "true"}
        verified = make_settings(redis_prefix, QUEUE_REDIS_TLS_CA_FILE=str(cert), **env)
        async with QueueFactory(verified) as qf:
            await qf.assert_queue_is_ready()
            assert (await qf.health())["status"] == "ready"
            await roundtrip(qf)
        untrusted = make_settings(redis_prefix, **env)  # system CAs do not know our cert
        async with QueueFactory(untrusted) as qf:
            with pytest.raises(QueueUnavailable, match="TLS handshake failed"):
                await qf.assert_queue_is_ready()
        insecure = make_settings(redis_prefix, QUEUE_REDIS_TLS_INSECURE="true", **env)
        async with QueueFactory(insecure) as qf:
            await qf.assert_queue_is_ready()
        plain = make_settings(redis_prefix, QUEUE_REDIS_PORT=str(port))
        async with QueueFactory(plain) as qf:
            with pytest.raises(QueueUnavailable):
                await qf.assert_queue_is_ready()


async def test_inmemory_driver_is_never_ready(redis_prefix: str) -> None:
    async with QueueFactory(make_settings(redis_prefix, QUEUE_DRIVER="inmemory")) as qf:
        assert not qf.durable
        with pytest.raises(QueueNotReady, match="inmemory"):
            await qf.assert_queue_is_ready()
        report = await qf.health()
        assert report["driver"] == "inmemory" and report["durable"] is False


def _check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "conveyor.cli", "check"],
        env=env_for(**env),
        capture_output=True,
        text=True,
        timeout=30,
    )


async def test_check_command(redis_prefix: str) -> None:
    ok, bad = await asyncio.gather(
        asyncio.to_thread(_check, {"QUEUE_PREFIX": redis_prefix}),
        asyncio.to_thread(_check, {"QUEUE_REDIS_PORT": str(free_port())}),
    )
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("conveyor check: ok") and "version" in ok.stdout
    assert bad.returncode == 1
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("conveyor check: Redis at redis://127.0.0.1:")
    assert "unreachable" in lines[0]


async def test_sentinel_client_configuration(redis_prefix: str) -> None:
    """With sentinels every role's client is Sentinel-managed and keeps its timeouts and retry
    policy; the sentinels get their own credentials and TLS. No I/O."""
    settings = make_settings(
        redis_prefix,
        QUEUE_REDIS_SENTINELS="10.0.0.1:26379,10.0.0.2:26379",
        QUEUE_REDIS_SENTINEL_MASTER="main",
        QUEUE_REDIS_SENTINEL_USERNAME="watcher",
        QUEUE_REDIS_SENTINEL_PASSWORD="spw",
        QUEUE_REDIS_SENTINEL_TLS="true",
        QUEUE_REDIS_TLS_CA_FILE="/etc/ca.pem",
        QUEUE_REDIS_PASSWORD="dpw",
        QUEUE_REDIS_DB="2",
    )
    with pytest.raises(ValueError, match="make_sentinel"):
        connection.make_client(settings, "command")
    sentinel = connection.make_sentinel(settings)
    try:
        roles: list[tuple[connection.ClientRole, int]] = [
            ("command", 2), ("worker", 3), ("blocking", 0), ("probe", 0),
        ]  # fmt: skip
        for role, retries in roles:
            client = connection.make_client(settings, role, sentinel)
            pool = client.connection_pool
            assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "main"
            kwargs = pool.connection_kwargs
            assert (kwargs["db"], kwargs["password"], kwargs["decode_responses"]) == (
                2,
                "dpw",
                True,
            )
            assert kwargs["retry"].get_retries() == retries, role
            assert "ssl_ca_certs" not in kwargs  # QUEUE_REDIS_TLS is off for the data nodes
            await client.aclose()
        hosts = [s.connection_pool.connection_kwargs for s in sentinel.sentinels]
        assert [(k["host"], k["port"]) for k in hosts] == [("10.0.0.1", 26379), ("10.0.0.2", 26379)]
        for k in hosts:
            assert (k["username"], k["password"]) == ("watcher", "spw")
            assert k["ssl_ca_certs"] == "/etc/ca.pem" and k["socket_timeout"] == 1.0
    finally:
        await sentinel.aclose()
    assert connection.location(settings) == (
        "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/main/2"
    )
