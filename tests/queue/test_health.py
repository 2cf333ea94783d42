"""Readiness and the health probe, against the shared Redis and throwaway servers."""

from __future__ import annotations

import logging
import signal
import time

import pytest

from conveyor.errors import QueueNotReady
from conveyor.queue import QueueFactory
from conveyor.queue.health import ServerFacts, check_facts, parse_version
from tests.helpers import redis_server
from tests.queue.conftest import make_settings


async def test_health_reports_a_ready_redis(bull_qf: QueueFactory) -> None:
    report = await bull_qf.health()
    assert (
        report["driver"] == "bullmq" and report["status"] == "ready" and report["durable"] is True
    )
    assert isinstance(report["latencyMs"], float) and 0 <= report["latencyMs"] < 1000
    assert parse_version(report["redisVersion"]) >= (5, 0, 0)  # type: ignore[operator]
    assert set(report["persistence"]) == {"aof", "rdb"}
    assert all(isinstance(v, bool) for v in report["persistence"].values())
    assert report["evictionPolicy"] == "noeviction" and report["warnings"] == []
    assert "error" not in report


@pytest.mark.slow
async def test_health_turns_unreachable_when_redis_stops(redis_prefix: str) -> None:
    with redis_server("--appendonly", "yes") as server:
        async with QueueFactory(
            make_settings(redis_prefix, QUEUE_REDIS_PORT=str(server.port))
        ) as qf:
            report = await qf.health(timeout_s=1.0)
            assert report["status"] == "ready" and report["persistence"]["aof"] is True
            assert report["persistence"]["rdb"] is False

            server.stop()
            begin = time.monotonic()
            report = await qf.health(timeout_s=1.0)
            assert time.monotonic() - begin < 1.2
            assert report["status"] == "unreachable" and report["durable"] is False
            assert report["latencyMs"] is None and "unreachable" in report["error"]

            server.start()
            assert (await qf.health(timeout_s=2.0))["status"] == "ready"


async def test_health_never_hangs_longer_than_its_timeout(redis_prefix: str) -> None:
    """A frozen Redis (SIGSTOP) accepts TCP connections but never answers."""
    with redis_server() as server:
        assert server.proc is not None
        async with QueueFactory(
            make_settings(redis_prefix, QUEUE_REDIS_PORT=str(server.port))
        ) as qf:
            server.proc.send_signal(signal.SIGSTOP)
            try:
                begin = time.monotonic()
                report = await qf.health(timeout_s=0.5)
                assert time.monotonic() - begin < 0.8
                assert (
                    report["status"] == "unreachable"
                    and "did not answer within 0.5 s" in report["error"]
                )
            finally:
                server.proc.send_signal(signal.SIGCONT)
            assert (await qf.health(timeout_s=2.0))["status"] == "ready"


async def test_eviction_policy_is_a_loud_warning(
    redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    with redis_server("--maxmemory-policy", "allkeys-lru") as server:
        async with QueueFactory(
            make_settings(redis_prefix, QUEUE_REDIS_PORT=str(server.port))
        ) as qf:
            with caplog.at_level(logging.INFO, logger="conveyor.queue"):
                await qf.assert_queue_is_ready()
            warning = next(r for r in caplog.records if r.levelno == logging.WARNING)
            assert "maxmemory-policy is 'allkeys-lru'" in warning.getMessage()
            assert "noeviction" in warning.getMessage()
            assert any(r.getMessage() == "queue.ready" for r in caplog.records)
            report = await qf.health()
            assert report["evictionPolicy"] == "allkeys-lru"
            assert report["warnings"] == [
                "maxmemory-policy is allkeys-lru; BullMQ needs noeviction"
            ]


def test_version_rules(caplog: pytest.LogCaptureFixture) -> None:
    def facts(version: str | None) -> ServerFacts:
        return {
            "redisVersion": version,
            "evictionPolicy": "noeviction",
            "persistence": {"aof": None, "rdb": None},
        }

    with pytest.raises(QueueNotReady, match=r"version 4\.0\.14; BullMQ needs >= 5\.0\.0"):
        check_facts(facts("4.0.14"), "redis://old:6379/0")
    with caplog.at_level(logging.WARNING, logger="conveyor.queue.health"):
        check_facts(facts("6.0.9"), "redis://x:6379/0")
        check_facts(facts(None), "redis://x:6379/0")
        check_facts(facts("7.2.4"), "redis://x:6379/0")
    assert [r.getMessage() for r in caplog.records] == [
        "queue.redis_version_old",
        "queue.redis_version_unknown",
    ]


def test_parse_version() -> None:
    assert parse_version("7.0.15") == (7, 0, 15)
    assert parse_version("6.2") == (6, 2)
    assert parse_version("") is None and parse_version(None) is None
    assert parse_version("4.0.9")[:2] < (5, 0)  # type: ignore[index]
