"""Redis Sentinel: every client of a process finds the master through the sentinels and follows a
failover; readiness, health, ``check`` and ``status`` report the master and the sentinels' view.

Each test starts its own group (master, replica, three sentinels on free ports, see
:mod:`tests.redis_ha._sentinels`) and SIGKILLs the master where a failover is needed.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import bullmq
import pytest
import redis.asyncio as aioredis
from redis.asyncio.sentinel import SentinelConnectionPool

from conveyor.cli.tables import render
from conveyor.errors import QueueUnavailable
from conveyor.queue import JobContext, QueueEvent, QueueFactory
from conveyor.queue.bullmq import BullQueue, BullQueueEvents, BullWorker
from tests.api.conftest import ADMIN, running_api
from tests.helpers import env_for, free_port, self_signed_cert
from tests.queue.conftest import TEST_QUEUE, eventually, make_settings, running
from tests.queue.payload import Probe
from tests.redis_ha._sentinels import MASTER_NAME, sentinel_group

pytestmark = pytest.mark.slow

RESUME_WITHIN_S = 10.0


def _pool(client: Any) -> Any:
    return client.connection_pool


def _bull_clients(qf: QueueFactory, queue: BullQueue, worker: BullWorker,
                  events: BullQueueEvents) -> dict[str, Any]:  # fmt: skip
    """Every Redis client bullmq and Conveyor hold for this queue (tests may look inside)."""
    bull_worker = worker.bullmq_worker
    return {
        "conveyor keys": qf.redis,
        "queue": queue.bullmq_queue.client,
        "worker commands": bull_worker.backend.connection.conn,
        "worker blocking": bull_worker.backend.blocking_connection.conn,
        "events": events._client,
    }


async def _add_until_accepted(queue: Any, n: int, within: float) -> float:
    """Enqueue ``Probe(n)``, retrying while Redis fails over; seconds it took."""
    begin = time.monotonic()
    while True:
        try:
            await queue.add(Probe(n=n))
            return time.monotonic() - begin
        except QueueUnavailable:
            if time.monotonic() - begin > within:
                raise
            await asyncio.sleep(0.1)


async def test_every_client_follows_a_failover(redis_prefix: str) -> None:
    with sentinel_group() as group:
        settings = make_settings(redis_prefix, **group.env())
        async with QueueFactory(settings) as qf:
            await qf.assert_queue_is_ready()
            before = await qf.health()
            assert before["status"] == "ready"
            assert before["address"] == f"127.0.0.1:{group.master.port}"
            view = before["sentinel"]
            assert view["master"] == MASTER_NAME and view["masterAddress"] == before["address"]
            assert (view["sentinels"], view["reachable"], view["quorum"]) == (3, 3, 2)
            assert view["quorumOk"] is True and view["masterDown"] is False
            assert before["warnings"] == []

            done: list[tuple[int, float]] = []
            completed: list[str] = []

            async def process(payload: Probe, ctx: JobContext) -> None:
                done.append((payload.n, time.monotonic()))

            queue = qf.create_queue(TEST_QUEUE)
            worker = qf.create_worker(TEST_QUEUE, process)
            events = qf.create_queue_events(TEST_QUEUE)

            def on_completed(event: QueueEvent) -> None:
                completed.append(str(event.job_id))

            events.on("completed", on_completed)
            assert isinstance(queue, BullQueue) and isinstance(worker, BullWorker)
            assert isinstance(events, BullQueueEvents)
            clients = _bull_clients(qf, queue, worker, events)
            for role, client in clients.items():
                assert isinstance(_pool(client), SentinelConnectionPool), role
            # The blocking fetch has a client (and pool) of its own, Sentinel-managed too.
            assert _pool(clients["worker blocking"]) is not _pool(clients["worker commands"])

            events.start()
            async with running(worker):
                first = await queue.add(Probe(n=1))
                await eventually(lambda: [n for n, _ in done] == [1] and first in completed, 10)
                await asyncio.sleep(0.3)  # the worker is now blocked in BZPOPMIN on the master
                old = group.master.port
                group.master.kill()
                killed = time.monotonic()
                await _add_until_accepted(queue, 2, within=RESUME_WITHIN_S)
                await eventually(lambda: len(done) == 2, within=RESUME_WITHIN_S)
                resumed = done[-1][1] - killed
                assert resumed < RESUME_WITHIN_S
                new = group.wait_failover(old, timeout=5)
                # The event stream reconnected to the new master and sees new completions.
                third = await queue.add(Probe(n=3))
                await eventually(lambda: third in completed, within=RESUME_WITHIN_S)
            for role, client in clients.items():
                if role != "events":  # closed with the worker / stream
                    address = _pool(client).master_address
                    assert address == ("127.0.0.1", new), role
            after = await qf.health()
            assert after["status"] == "ready" and after["address"] == f"127.0.0.1:{new}"
            assert after["sentinel"]["masterAddress"] == f"127.0.0.1:{new}"
            assert after["sentinel"]["reachable"] == 3 and after["sentinel"]["quorumOk"] is True
            # Conveyor's own keys (fairness counters, heartbeats, locks) go to the new master.
            await qf.redis.set(f"{redis_prefix}:probe", "1")
            assert await qf.redis.get(f"{redis_prefix}:probe") == "1"

            # Two of three sentinels gone: Redis still serves, but a failover could not happen.
            group.sentinels[0].stop()
            group.sentinels[1].stop()
            degraded = await qf.health()
            assert degraded["status"] == "ready", degraded
            assert degraded["sentinel"]["reachable"] == 1
            # The last sentinel counts its peers down after down-after-milliseconds.
            await asyncio.sleep(group.down_after_ms / 1000)

            async def no_quorum() -> dict[str, Any] | None:
                report = await qf.health()
                return report if report["sentinel"]["quorumOk"] is False else None

            degraded = await eventually(no_quorum, within=10, interval=0.2)
            assert degraded["status"] == "ready", degraded
            view = degraded["sentinel"]
            assert view["reachable"] == 1, view
            assert len(view["errors"]) >= 2
            assert "1 of 3 sentinels answered" in degraded["warnings"]
            assert any("cannot reach their quorum" in w for w in degraded["warnings"])


async def test_bullmq_reuses_the_client_it_is_given_for_blocking(redis_prefix: str) -> None:
    """bullmq 3.4.4 does not duplicate a client it is given: its blocking connection wraps the
    same Sentinel-managed client (and pool) as its commands. A plain ``bullmq.Worker`` on such a
    client (bullmq's own loop, no Conveyor wrapper) resolves the master and, once the master is
    killed, reconnects to the promoted replica and consumes again."""
    with sentinel_group() as group:
        settings = make_settings(redis_prefix, **group.env())
        async with QueueFactory(settings) as qf:
            client = qf._client("worker")
            seen: list[int] = []

            async def process(job: Any, token: str) -> None:
                seen.append(int(job.data["n"]))

            opts = {"connection": client, "prefix": redis_prefix, "autorun": False,
                    "runRetryDelay": 500, "drainDelay": 1}  # fmt: skip
            worker = bullmq.Worker("plain", process, opts)
            assert worker.blockingRedisConnection.conn is client
            assert worker.backend.connection.conn is client
            producer = bullmq.Queue("plain", {"connection": qf.redis, "prefix": redis_prefix})
            task = asyncio.create_task(worker.run())
            try:
                await producer.add("j", {"n": 1})
                await eventually(lambda: seen == [1], within=10)
                await asyncio.sleep(0.3)
                old = group.master.port
                group.master.kill()
                killed = time.monotonic()
                while True:
                    try:
                        await producer.add("j", {"n": 2})
                        break
                    except (ConnectionError, OSError, aioredis.RedisError):
                        assert time.monotonic() - killed < RESUME_WITHIN_S
                        await asyncio.sleep(0.1)
                await eventually(lambda: seen == [1, 2], within=RESUME_WITHIN_S)
                new = group.wait_failover(old, timeout=5)
                assert _pool(client).master_address == ("127.0.0.1", new)
            finally:
                await worker.close(force=True)
                await asyncio.wait({task}, timeout=5)
                await producer.close()


async def test_sentinel_credentials_and_misconfiguration_fail_fast(redis_prefix: str) -> None:
    with sentinel_group(sentinel_auth=("watcher", "s3ntinel")) as group:
        good = {**group.env(), "QUEUE_REDIS_SENTINEL_USERNAME": "watcher",
                "QUEUE_REDIS_SENTINEL_PASSWORD": "s3ntinel"}  # fmt: skip
        async with QueueFactory(make_settings(redis_prefix, **good)) as qf:
            await qf.assert_queue_is_ready()
            report = await qf.health()
            assert report["address"] == f"127.0.0.1:{group.master.port}"
            assert report["sentinel"]["reachable"] == 3 and report["sentinel"]["quorumOk"]
            seen: list[int] = []

            async def process(payload: Probe, ctx: JobContext) -> None:
                seen.append(payload.n)

            await qf.create_queue(TEST_QUEUE).add(Probe(n=5))
            async with running(qf.create_worker(TEST_QUEUE, process)):
                await eventually(lambda: seen == [5], within=5)

        cases = [
            ({**good, "QUEUE_REDIS_SENTINEL_PASSWORD": "nope"}, "sentinels refused the credentials"),
            ({**group.env()}, "sentinels refused the credentials"),
            ({**good, "QUEUE_REDIS_SENTINEL_MASTER": "other"}, "no sentinel answered"),
            ({**good, "QUEUE_REDIS_SENTINELS": f"127.0.0.1:{free_port()},127.0.0.1:{free_port()}"},
             "no sentinel answered"),
        ]  # fmt: skip
        for env, message in cases:
            async with QueueFactory(make_settings(redis_prefix, **env)) as qf:
                begin = time.monotonic()
                with pytest.raises(QueueUnavailable, match=message) as info:
                    await qf.assert_queue_is_ready()
                assert time.monotonic() - begin < 3
                assert "s3ntinel" not in str(info.value) and "nope" not in str(info.value)
                assert "+sentinel://" in str(info.value)
                report = await qf.health(timeout_s=1.5)
                assert report["status"] == "unreachable" and report["sentinel"]["quorumOk"] is False
                assert report["warnings"], report


def _check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "conveyor.cli", "check"],
        env=env_for(**env), capture_output=True, text=True, timeout=30,
    )  # fmt: skip


async def _wait_ready(client: Any, within: float) -> dict[str, Any]:
    async def ready() -> dict[str, Any] | None:
        r = await client.get("/api/health/ready")
        return dict(r.json()["data"]) if r.status_code == 200 else None

    result: dict[str, Any] = await eventually(ready, within=within, interval=0.1)
    return result


async def test_api_check_and_status_report_the_master_across_a_failover(
    api_env: dict[str, str], redis_prefix: str
) -> None:
    with sentinel_group() as group:
        env = {**api_env, **group.env()}
        check = await asyncio.to_thread(_check, {**group.env(), "QUEUE_PREFIX": redis_prefix})
        assert check.returncode == 0, check.stderr
        assert f"redis master 127.0.0.1:{group.master.port}" in check.stdout
        assert f"sentinel {MASTER_NAME}: 3/3 answering, quorum 2 ok" in check.stdout
        async with running_api(make_settings(redis_prefix, **env)) as api:
            ready = await _wait_ready(api.client, 5)
            assert ready["redis"]["address"] == f"127.0.0.1:{group.master.port}"
            assert ready["redis"]["sentinel"]["reachable"] == 3
            health = (await api.client.get("/api/health")).json()["data"]
            assert health["queue"]["address"] == f"127.0.0.1:{group.master.port}"
            assert health["queue"]["sentinel"]["quorumOk"] is True

            old = group.master.port
            group.master.kill()
            killed = time.monotonic()
            await asyncio.sleep(0.2)
            down = await api.client.get("/api/health")
            assert down.status_code == 200 and down.json()["data"]["status"] == "degraded"
            assert (await api.client.get("/api/health/ready")).status_code == 503
            ready = await _wait_ready(api.client, RESUME_WITHIN_S)
            assert time.monotonic() - killed < RESUME_WITHIN_S
            new = group.wait_failover(old, timeout=5)
            assert ready["redis"]["address"] == f"127.0.0.1:{new}"
            status = await api.client.get("/api/admin/workers/status", headers=ADMIN)
            assert status.status_code == 200, status.text
            text = render(status.json())
            assert f"redis master 127.0.0.1:{new} | sentinel {MASTER_NAME}: 3/3 answering" in text


async def test_sentinels_and_data_nodes_over_tls(redis_prefix: str, tmp_path: Path) -> None:
    """TLS everywhere (sentinels, master, replica): QUEUE_REDIS_SENTINEL_TLS for the sentinels,
    QUEUE_REDIS_TLS for the data nodes, one CA file verifying both; the failover is followed."""
    cert, key = self_signed_cert(tmp_path)
    with sentinel_group(tls=(cert, key)) as group:
        tls = {"QUEUE_REDIS_TLS": "true", "QUEUE_REDIS_SENTINEL_TLS": "true",
               "QUEUE_REDIS_TLS_CA_FILE": str(cert)}  # fmt: skip
        async with QueueFactory(make_settings(redis_prefix, **group.env(), **tls)) as qf:
            await qf.assert_queue_is_ready()
            report = await qf.health()
            assert report["address"] == f"127.0.0.1:{group.master.port}"
            assert report["sentinel"]["reachable"] == 3 and report["sentinel"]["quorumOk"]
            assert qf.sentinel is not None
            assert all(s.connection_pool.connection_kwargs.get("ssl_ca_certs") == str(cert)
                       for s in qf.sentinel.sentinels)  # fmt: skip
            seen: list[int] = []

            async def process(payload: Probe, ctx: JobContext) -> None:
                seen.append(payload.n)

            queue = qf.create_queue(TEST_QUEUE)
            async with running(qf.create_worker(TEST_QUEUE, process)):
                await queue.add(Probe(n=1))
                await eventually(lambda: seen == [1], within=5)
                old = group.master.port
                group.master.kill()
                await _add_until_accepted(queue, 2, within=RESUME_WITHIN_S)
                await eventually(lambda: seen == [1, 2], within=RESUME_WITHIN_S)
            new = group.wait_failover(old, timeout=5)
            assert (await qf.health())["address"] == f"127.0.0.1:{new}"
        # Sentinels over TLS reached in plain text: no master is found, said in one line.
        plain = make_settings(redis_prefix, **group.env(), QUEUE_REDIS_TLS="true",
                              QUEUE_REDIS_TLS_CA_FILE=str(cert))  # fmt: skip
        async with QueueFactory(plain) as qf:
            with pytest.raises(QueueUnavailable, match="no sentinel answered"):
                await qf.assert_queue_is_ready()
