"""PostgreSQL connections killed under load (``pg_terminate_backend`` every 200 ms, as a failover
or an operator would): the API answers 503 ``database_unavailable`` at worst — never 500 — and a
retried trigger (same Idempotency-Key) loses nothing; the worker never runs a finished step again
(the fenced write of its result is retried, not the step); every execution succeeds once the
database is left alone.

Real processes and services: the API in-process on a fresh database, a ``conveyor worker``
subprocess, a local HTTP target counting the calls each execution makes.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest

from conveyor.store import migrate
from tests.api.conftest import ADMIN, ADMIN_TOKEN, Api, make_settings, running_api
from tests.conftest import PG_ADMIN_DSN, REDIS_HOST, REDIS_PORT
from tests.worker._support import (
    Recorder,
    WorkerProc,
    http_recorder,
    wait_started,
    worker_env,
    worker_process,
)

pytestmark = pytest.mark.slow

TRIGGERS = 240
KILL_EVERY_S = 0.2


@pytest.fixture
def recorder() -> Iterator[Recorder]:
    with http_recorder() as rec:
        yield rec


@pytest.fixture
def database(fresh_pg_url: str) -> str:
    asyncio.run(migrate(make_settings(DATABASE_URL=fresh_pg_url)))
    return fresh_pg_url


@pytest.fixture
def worker(database: str, redis_prefix: str, tmp_path: Path) -> Iterator[WorkerProc]:
    env = worker_env(
        redis_prefix,
        database,
        HTTP_ALLOWLIST="127.0.0.1",
        EXECUTION_WORKER_CONCURRENCY="8",
        DATABASE_POOL_SIZE="4",
    )
    with worker_process(env, tmp_path) as wp:
        wait_started(wp)
        yield wp


async def _kill_backends(database: str, until: float) -> int:
    """Terminate every backend of ``database`` (but our own) every ``KILL_EVERY_S``."""
    name = database.rsplit("/", 1)[1]
    admin = await asyncpg.connect(PG_ADMIN_DSN)
    killed = 0
    try:
        while time.monotonic() < until:
            await asyncio.sleep(KILL_EVERY_S)
            rows = await admin.fetch(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = $1 AND pid <> pg_backend_pid()",
                name,
            )
            killed += sum(1 for r in rows if r[0])
    finally:
        await admin.close()
    return killed


async def _trigger(api: Api, auth: dict[str, str], wf: str, key: str) -> tuple[str, list[int]]:
    """Trigger with an Idempotency-Key, retrying 503 as an HTTP client would; the execution id
    and every status code seen. Any other answer than 2xx/503 is a failure of the test."""
    seen: list[int] = []
    deadline = time.monotonic() + 30
    while True:
        r = await api.client.post(
            f"/api/workflows/{wf}/executions",
            headers={**auth, "Idempotency-Key": key},
            json={"input": {"key": key}},
        )
        seen.append(r.status_code)
        if r.status_code in (200, 202):
            return str(r.json()["data"]["id"]), seen
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "database_unavailable", r.text
        assert time.monotonic() < deadline, f"trigger {key} never got through: {seen}"
        await asyncio.sleep(0.05)


async def _statuses(api: Api, auth: dict[str, str], ids: list[str]) -> Counter[str]:
    counts: Counter[str] = Counter()
    for execution_id in ids:
        r = await api.client.get(f"/api/executions/{execution_id}", headers=auth)
        counts[r.json()["data"]["status"] if r.status_code == 200 else f"http {r.status_code}"] += 1
    return counts


async def test_killed_connections_under_load(
    database: str, redis_prefix: str, worker: WorkerProc, recorder: Recorder
) -> None:
    settings = make_settings(
        QUEUE_REDIS_HOST=REDIS_HOST,
        QUEUE_REDIS_PORT=str(REDIS_PORT),
        QUEUE_PREFIX=redis_prefix,
        DATABASE_URL=database,
        ADMIN_TOKEN=ADMIN_TOKEN,
        DATABASE_POOL_SIZE="4",
    )
    async with running_api(settings) as api:
        r = await api.client.post("/api/admin/tenants", json={"name": "t"}, headers=ADMIN)
        tenant = r.json()["data"]["id"]
        r = await api.client.post(f"/api/admin/tenants/{tenant}/api-keys", headers=ADMIN)
        auth = {"Authorization": f"Bearer {r.json()['data']['key']}"}
        call = {"id": "call", "type": "http", "url": recorder.url("/step/{{ execution.id }}")}
        steps: list[dict[str, Any]] = [
            call,
            {"id": "shape", "type": "transform", "expression": "steps.call.status"},
        ]
        r = await api.client.post(
            "/api/workflows", json={"name": "w", "steps": steps}, headers=auth
        )
        assert r.status_code == 201, r.text
        wf = r.json()["data"]["id"]

        killer = asyncio.create_task(_kill_backends(database, time.monotonic() + 6.0))
        codes: Counter[int] = Counter()
        ids: list[str] = []
        for batch in range(0, TRIGGERS, 16):
            results = await asyncio.gather(
                *(_trigger(api, auth, wf, f"k{i}") for i in range(batch, min(batch + 16, TRIGGERS)))
            )
            for execution_id, seen in results:
                ids.append(execution_id)
                codes.update(seen)
        killed = await killer
        assert killed > 0, "the test killed no connection"
        assert 500 not in codes, codes
        assert len(set(ids)) == TRIGGERS  # one execution per key, none lost or doubled

        deadline = time.monotonic() + 60
        while (counts := await _statuses(api, auth, ids))["succeeded"] < TRIGGERS:
            assert time.monotonic() < deadline, f"not all executions succeeded: {counts}"
            await asyncio.sleep(0.5)

    calls = Counter(path.removeprefix("/step/") for path in recorder.paths())
    repeated = {k: n for k, n in calls.items() if n > 1}
    assert not repeated, f"steps ran again after a database fault: {repeated}"
    assert set(calls) == set(ids)
    print(f"killed {killed} backends; answers {dict(codes)}")
