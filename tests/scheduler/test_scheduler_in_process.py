"""The scheduler's leader rounds in process, on real SQLite/Postgres and Redis, with the API.

* A schedule whose cron never fires (saved before validation refused it) is parked with a
  warning; the leader loop goes on firing the other schedules.
* A fired tick's execution carries the tick instant (``scheduledFor``); an API-triggered one
  has ``null``.
* The API refuses, on every save, an expression that never fires or that is only valid with
  seconds last (422 ``schedule_invalid``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update

from conveyor.api.app import create_app
from conveyor.api.context import open_context
from conveyor.queue import QueueFactory
from conveyor.runtime import Supervisor
from conveyor.settings import Settings
from conveyor.store import Store
from conveyor.store.schema import schedules
from conveyor.workers.scheduler import Scheduler
from tests.scheduler._support import (
    async_wait_until,
    base_env,
    migrate,
    seed_schedule,
    settings_for,
    ticks_of,
)

pytestmark = pytest.mark.slow

ADMIN_TOKEN = "test-admin-token-0123456789"
NOOP = {"name": "noop", "steps": [{"id": "a", "type": "noop"}]}


@pytest.fixture(params=["sqlite", "postgres"])
def env(
    request: pytest.FixtureRequest, settings_env: dict[str, str], tmp_path: Path
) -> dict[str, str]:
    """A migrated database (SQLite file or a Postgres database of this test's own)."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'c.db'}"
    else:
        url = request.getfixturevalue("fresh_pg_url")
    environment = base_env(settings_env, url, ADMIN_TOKEN=ADMIN_TOKEN)
    asyncio.run(migrate(environment))
    return environment


@asynccontextmanager
async def leading(settings: Settings) -> AsyncIterator[Scheduler]:
    """A scheduler leading (its election loop runs; its other loops are not started)."""
    async with Store(settings, pool_size=2) as store, QueueFactory(settings) as queues:
        scheduler = Scheduler(settings, store, queues, Supervisor("scheduler"))
        election = asyncio.create_task(scheduler.election.run(), name="election")
        try:
            await async_wait_until(lambda: scheduler.election.is_leader, 10)
            scheduler.election.changed.clear()  # as the leader loop does before each round
            yield scheduler
        finally:
            election.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await election
            await scheduler.election.release()


async def test_a_schedule_that_never_fires_is_skipped_and_the_loop_goes_on(
    env: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    _tenant, good = await seed_schedule(env, "* * * * * *")
    tenant, bad = await seed_schedule(env, "0 0 9 * * *")
    settings = settings_for(env)
    async with Store(settings, pool_size=1) as store, store.engine.begin() as conn:
        # saved before save-time validation refused it, and due now
        await conn.execute(
            update(schedules)
            .where(schedules.c.id == bad)
            .values(cron="0 0 30 2 *", next_fire_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    caplog.set_level(logging.WARNING, logger="conveyor.workers.scheduler")
    async with leading(settings) as scheduler:
        loop = asyncio.create_task(scheduler.lead_loop(), name="lead")
        try:
            # stops early if the loop dies (as it did on croniter's CroniterBadDateError)
            await async_wait_until(lambda: loop.done() or _ticks_at_least(env, good, 2), 10)
            assert not loop.done(), loop.exception()
        finally:
            scheduler.supervisor.stop()
            await asyncio.wait_for(loop, 5)
        parked = await scheduler.store.schedules.get(tenant, bad)
    assert parked.next_fire_at is None and parked.enabled  # not loaded again; a fix revives it
    assert await ticks_of(env, bad) == []
    warnings = [r for r in caplog.records if r.getMessage() == "scheduler.schedule_invalid"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "never fires" in warnings[0].__dict__["error"]


async def _ticks_at_least(env: dict[str, str], schedule_id: str, count: int) -> bool:
    return len(await ticks_of(env, schedule_id)) >= count


@asynccontextmanager
async def api_client(settings: Settings) -> AsyncIterator[tuple[httpx.AsyncClient, dict[str, str]]]:
    """The API in process, and the auth headers of a new tenant."""
    async with open_context(settings, heartbeat=False) as ctx:
        app = create_app(settings, context=ctx)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
                admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
                r = await client.post("/api/admin/tenants", json={"name": "t"}, headers=admin)
                assert r.status_code == 201, r.text
                tenant_id = r.json()["data"]["id"]
                r = await client.post(f"/api/admin/tenants/{tenant_id}/api-keys", headers=admin)
                assert r.status_code == 201, r.text
                yield client, {"Authorization": f"Bearer {r.json()['data']['key']}"}


def _data(response: httpx.Response, status: int) -> Any:
    assert response.status_code == status, response.text
    return response.json()["data"]


async def test_a_fired_tick_execution_carries_scheduled_for(env: dict[str, str]) -> None:
    settings = settings_for(env)
    async with api_client(settings) as (client, auth):
        wf = _data(await client.post("/api/workflows", json=NOOP, headers=auth), 201)["id"]
        sched = _data(await client.post("/api/schedules", headers=auth,
                                        json={"workflowId": wf, "cron": "* * * * * *"}), 201)  # fmt: skip
        triggered = _data(await client.post(f"/api/workflows/{wf}/executions", json={},
                                            headers=auth), 202)  # fmt: skip
        assert triggered["scheduledFor"] is None
        async with leading(settings) as scheduler:
            assert await scheduler.fire_due(1.5) >= 1
        listed = _data(await client.get("/api/executions", headers=auth), 200)["items"]
        ticks = await ticks_of(env, sched["id"])
        by_id = {e["id"]: e for e in listed}
        assert len(by_id) == len(ticks) + 1
        assert by_id[triggered["id"]]["scheduledFor"] is None
        for fire_time, _created, execution_id in ticks:
            for execution in (
                by_id[execution_id],
                _data(await client.get(f"/api/executions/{execution_id}", headers=auth), 200),
            ):
                assert execution["triggeredBy"] == "schedule"
                assert datetime.fromisoformat(execution["scheduledFor"]) == fire_time
        read = _data(await client.get(f"/api/executions/{triggered['id']}", headers=auth), 200)
        assert read["scheduledFor"] is None


async def test_the_api_refuses_a_cron_that_never_fires_on_every_save(env: dict[str, str]) -> None:
    async with api_client(settings_for(env)) as (client, auth):
        wf = _data(await client.post("/api/workflows", json=NOOP, headers=auth), 201)["id"]

        async def refused(response: httpx.Response) -> str:
            assert response.status_code == 422, response.text
            error = response.json()["error"]
            assert error["code"] == "schedule_invalid" and error["details"]["field"] == "cron"
            return str(error["message"])

        body = {"workflowId": wf, "cron": "0 0 30 2 *"}
        for enabled in (True, False):
            r = await client.post("/api/schedules", json={**body, "enabled": enabled},
                                  headers=auth)  # fmt: skip
            assert "never fires" in await refused(r)
        sched = _data(await client.post("/api/schedules", headers=auth,
                                        json={**body, "cron": "0 9 * * *", "enabled": False}), 201)  # fmt: skip
        path = f"/api/schedules/{sched['id']}"
        for patch in ({"cron": "0 0 30 2 *"}, {"cron": "0 0 30 2 *", "enabled": True}):
            assert "never fires" in await refused(
                await client.patch(path, json=patch, headers=auth)
            )
        message = await refused(await client.post("/api/schedules", headers=auth,
                                                  json={**body, "cron": "*/5 * * * * 30"}))  # fmt: skip
        assert message.endswith(
            "six fields are read seconds first (sec min hour day month weekday); "
            "did you mean '30 */5 * * * *'?"
        )
        enabled = _data(await client.patch(path, json={"enabled": True, "cron": "30 */5 * * * *"},
                                           headers=auth), 200)  # fmt: skip
        assert datetime.fromisoformat(enabled["nextFireAt"]).second == 30
