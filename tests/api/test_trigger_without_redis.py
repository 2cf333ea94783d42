"""Redis down at trigger time: the database is the source of truth, so a committed execution is a
successful trigger (202, ``queued``) — clients that retry 5xx must never create a second one —
and the reconciler puts it on the queue within seconds of Redis being back."""

from __future__ import annotations

import time

import pytest

from conveyor.store import migrate
from tests.api.conftest import ADMIN, ADMIN_TOKEN, make_settings, running_api
from tests.helpers import env_for, redis_server
from tests.scheduler._support import async_wait_until, base_env, processes

pytestmark = pytest.mark.slow

RECONCILE_MS = 500


async def test_redis_down_at_trigger_answers_202_and_the_reconciler_runs_it(
    fresh_pg_url: str, redis_prefix: str
) -> None:
    await migrate(make_settings(DATABASE_URL=fresh_pg_url))
    with redis_server() as server:
        env = base_env(
            env_for(QUEUE_REDIS_HOST="127.0.0.1", QUEUE_REDIS_PORT=str(server.port),
                    QUEUE_PREFIX=redis_prefix, ADMIN_TOKEN=ADMIN_TOKEN,
                    QUEUE_REDIS_CONNECT_TIMEOUT_MS="500"),
            fresh_pg_url,
            RECONCILE_INTERVAL_MS=str(RECONCILE_MS), RECONCILE_MIN_AGE_MS=str(RECONCILE_MS),
        )  # fmt: skip
        async with running_api(make_settings(**env)) as api:
            r = await api.client.post("/api/admin/tenants", json={"name": "t"}, headers=ADMIN)
            tenant = r.json()["data"]["id"]
            r = await api.client.post(f"/api/admin/tenants/{tenant}/api-keys", headers=ADMIN)
            auth = {"Authorization": f"Bearer {r.json()['data']['key']}"}
            noop = {"name": "n", "steps": [{"id": "n", "type": "noop"}]}
            wf = (await api.client.post("/api/workflows", json=noop, headers=auth)).json()
            url = f"/api/workflows/{wf['data']['id']}/executions"
            headers = {**auth, "Idempotency-Key": "once"}

            server.stop()
            started = time.monotonic()
            r = await api.client.post(url, json={"input": 1}, headers=headers)
            assert time.monotonic() - started < 4.0, "a down Redis must not hold the request"
            assert r.status_code == 202, r.text
            accepted = r.json()["data"]
            assert accepted["status"] == "queued"
            again = await api.client.post(url, json={"input": 1}, headers=headers)  # a retry
            assert again.status_code == 200 and again.json()["data"]["id"] == accepted["id"]
            r = await api.client.post(url, json={"input": 2}, headers=auth)  # no key: also 202
            assert r.status_code == 202, r.text
            second = r.json()["data"]["id"]

            server.start()
            back = time.monotonic()
            with processes() as start:
                start("conveyor.workers.scheduler", env, "scheduler")
                start("conveyor.workers.execution", env, "worker")

                async def all_succeeded() -> bool:
                    for execution_id in (accepted["id"], second):
                        got = await api.client.get(f"/api/executions/{execution_id}", headers=auth)
                        if got.json()["data"]["status"] != "succeeded":
                            return False
                    return True

                await async_wait_until(all_succeeded, 20, interval=0.1)
                picked_up_s = time.monotonic() - back
    # process start-up (~1-2 s each) + one reconcile pass
    assert picked_up_s < 10, picked_up_s
