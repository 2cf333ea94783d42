"""Health and readiness, including Redis going away and coming back."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from tests.api._support import restartable_redis
from tests.api.conftest import Api, make_settings, running_api


async def test_health_reports_queue_and_database(api: Api) -> None:
    r = await api.client.get("/api/health")
    assert r.status_code == 200
    data = r.json()["data"]
    assert data["status"] == "ok"
    assert data["queue"]["driver"] == "bullmq"
    assert data["queue"]["status"] == "ready"
    assert data["queue"]["durable"] is True
    assert "persistence" in data["queue"] and "evictionPolicy" in data["queue"]
    assert data["database"]["status"] == "ready"
    assert data["database"]["latencyMs"] >= 0


async def test_ready_is_200_with_redis_and_database(api: Api) -> None:
    r = await api.client.get("/api/health/ready")
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert data["ready"] is True
    assert data["checks"] == {"redis": True, "durable": True, "database": True}
    queues = {q["queue"]: q for q in data["queues"]}
    assert queues["workflow.execute.us"]["status"] == "idle"


async def test_ready_follows_redis_going_away_and_back(api_env: dict[str, str]) -> None:
    with restartable_redis() as server:
        settings = make_settings(**{**api_env, "QUEUE_REDIS_PORT": str(server.port)})
        async with running_api(settings) as api:
            assert (await api.client.get("/api/health/ready")).status_code == 200

            server.stop()
            started = time.monotonic()
            r = await api.client.get("/api/health/ready")
            assert r.status_code == 503
            assert time.monotonic() - started < 3.0
            body = r.json()
            assert body["success"] is False
            assert body["error"]["code"] == "not_ready"
            assert body["error"]["details"]["checks"]["redis"] is False

            started = time.monotonic()
            r = await api.client.get("/api/health")
            assert time.monotonic() - started < 3.0, "health must answer within its budget"
            assert r.status_code == 200
            assert r.json()["data"]["queue"]["status"] == "unreachable"
            assert r.json()["data"]["status"] == "degraded"

            server.start()
            deadline = time.monotonic() + 15
            status = 0
            while time.monotonic() < deadline:
                status = (await api.client.get("/api/health/ready")).status_code
                if status == 200:
                    break
                await asyncio.sleep(0.2)
            assert status == 200, "readiness must recover without a restart"


async def test_inmemory_driver_is_never_ready(api_env: dict[str, str]) -> None:
    settings = make_settings(**{**api_env, "QUEUE_DRIVER": "inmemory"})
    async with running_api(settings) as api:
        r = await api.client.get("/api/health/ready")
        assert r.status_code == 503
        details = r.json()["error"]["details"]
        assert details["checks"]["durable"] is False
        health = (await api.client.get("/api/health")).json()["data"]
        assert health["queue"]["driver"] == "inmemory"
        assert health["queue"]["durable"] is False


async def test_health_answers_in_budget_when_redis_hangs(api_env: dict[str, str]) -> None:
    with restartable_redis() as server:
        settings = make_settings(**{**api_env, "QUEUE_REDIS_PORT": str(server.port)})
        async with running_api(settings) as api:
            assert (await api.client.get("/api/health/ready")).status_code == 200
            assert server.proc is not None
            os.kill(server.proc.pid, signal.SIGSTOP)  # accepts connections, never answers
            try:
                for path, expected in (("/api/health", 200), ("/api/health/ready", 503)):
                    started = time.monotonic()
                    r = await api.client.get(path)
                    assert r.status_code == expected
                    assert time.monotonic() - started < 3.0, path
            finally:
                os.kill(server.proc.pid, signal.SIGCONT)
