"""``GET /api/admin/storage`` (shape, auth, both databases, Redis down) and the per-tenant
retention overrides (``GET``/``PUT /api/admin/tenants/{tenantId}/retention``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conveyor.store import migrate
from tests.api.conftest import ADMIN, Api, make_settings, running_api
from tests.helpers import free_port

TABLES = {
    "tenants", "api_keys", "workflows", "workflow_versions", "executions", "step_runs",
    "timers", "schedules", "schedule_ticks",
}  # fmt: skip


def _assert_storage(data: dict[str, Any], dialect: str) -> None:
    db = data["database"]
    assert db["dialect"] == dialect and db["totalBytes"] > 0
    tables = {t["name"]: t for t in db["tables"]}
    assert set(tables) == TABLES
    executions = tables["executions"]
    assert executions["rows"] >= 1 and executions["rowsExact"] is True
    assert executions["bytes"] > 0 and executions["oldest"] is not None
    assert tables["tenants"]["rows"] >= 1
    retention = data["retention"]
    assert retention["executionRetentionS"] == 14 * 86400
    assert retention["queueKeepCompleted"] == {"count": 1000, "ageS": 86400}
    assert retention["queueKeepFailed"] == {"count": 10000, "ageS": 7 * 86400}
    assert retention["queueEventsMaxLen"] == 10000


async def _one_execution(api: Api) -> None:
    auth = await api.tenant()
    wf = await api.workflow(auth)
    r = await api.client.post(f"/api/workflows/{wf}/executions", headers=auth)
    assert r.status_code == 202, r.text


async def test_storage_on_postgres(api: Api) -> None:
    await _one_execution(api)
    r = await api.client.get("/api/admin/storage", headers=ADMIN)
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    _assert_storage(data, "postgresql")
    redis = data["redis"]
    assert redis["status"] == "ready" and redis["usedMemory"] > 0
    queues = {q["queue"]: q for q in redis["queues"]}
    assert set(queues) >= {"workflow.execute.us", "workflow.execute.eu"}
    us = queues["workflow.execute.us"]
    assert (us["completed"], us["failed"]) == (0, 0) and us["events"] >= 1  # "waiting" event
    assert all(t["bytes"] > 0 for t in data["database"]["tables"])  # partitioned or not
    # the daily partitions (today's holds the execution; its bytes count in the table's)
    partitions = data["database"]["partitions"]
    names = {p["name"] for p in partitions}
    assert {"executions_default", "step_runs_default"} <= names
    days = [p for p in partitions if p["table"] == "executions" and p["day"] is not None]
    assert len(days) >= 4 and all(p["lower"] < p["upper"] for p in days)
    assert sum(p["bytes"] for p in partitions if p["table"] == "executions") == next(
        t["bytes"] for t in data["database"]["tables"] if t["name"] == "executions"
    )


async def test_storage_on_sqlite(api_env: dict[str, str], tmp_path: Path) -> None:
    settings = make_settings(**{**api_env, "DATABASE_URL": f"sqlite:///{tmp_path}/c.db"})
    await migrate(settings)
    async with running_api(settings) as api:
        await _one_execution(api)
        r = await api.client.get("/api/admin/storage", headers=ADMIN)
        assert r.status_code == 200, r.text
        _assert_storage(r.json()["data"], "sqlite")
        assert r.json()["data"]["database"]["partitions"] == []  # plain tables


async def test_storage_answers_when_redis_is_down(api_env: dict[str, str]) -> None:
    settings = make_settings(**{**api_env, "QUEUE_REDIS_PORT": str(free_port())})
    async with running_api(settings) as api:
        r = await api.client.get("/api/admin/storage", headers=ADMIN)
        assert r.status_code == 200, r.text
        redis = r.json()["data"]["redis"]
        assert redis["status"] == "unreachable" and redis["error"]
        assert r.json()["data"]["database"]["tables"]


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/admin/storage"),
        ("GET", "/api/admin/tenants/x/retention"),
        ("PUT", "/api/admin/tenants/x/retention"),
    ],
)
async def test_storage_and_retention_need_the_admin_token(api: Api, method: str, path: str) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        r = await api.client.request(method, path, headers=headers, json={})
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "unauthorized"
    auth = await api.tenant()  # a tenant's API key is not an admin token
    r = await api.client.request(method, path, headers=auth, json={})
    assert r.status_code == 401


async def test_tenant_retention_override(api: Api) -> None:
    r = await api.client.post("/api/admin/tenants", json={"name": "t"}, headers=ADMIN)
    tenant = r.json()["data"]["id"]
    path = f"/api/admin/tenants/{tenant}/retention"
    got = (await api.client.get(path, headers=ADMIN)).json()["data"]
    assert got == {"tenantId": tenant, "retentionS": None, "maxExecutions": None,
                   "effectiveRetentionS": 14 * 86400, "effectiveMaxExecutions": None}  # fmt: skip

    r = await api.client.put(path, json={"retention": "36h", "maxExecutions": 500}, headers=ADMIN)
    assert r.status_code == 200, r.text
    assert r.json()["data"]["retentionS"] == 36 * 3600
    got = (await api.client.get(path, headers=ADMIN)).json()["data"]
    assert (got["retentionS"], got["maxExecutions"]) == (129600, 500)
    assert (got["effectiveRetentionS"], got["effectiveMaxExecutions"]) == (129600, 500)
    storage = (await api.client.get("/api/admin/storage", headers=ADMIN)).json()["data"]
    assert storage["retention"]["tenantsOverriding"] >= 1

    r = await api.client.put(path, json={"retention": 7200}, headers=ADMIN)  # seconds; cap cleared
    assert r.json()["data"]["retentionS"] == 7200 and r.json()["data"]["maxExecutions"] is None
    r = await api.client.put(path, json={}, headers=ADMIN)  # back to the settings
    assert r.json()["data"]["retentionS"] is None


@pytest.mark.parametrize(
    "body",
    [
        {"retention": "14x"},
        {"retention": "10s"},  # below the minimum
        {"retention": 0},
        {"retention": "4000d"},
        {"maxExecutions": 0},
        {"retention": "1d", "extra": 1},
        {"retention": True},
    ],
)
async def test_bad_retention_is_422(api: Api, body: dict[str, Any]) -> None:
    r = await api.client.post("/api/admin/tenants", json={"name": "t"}, headers=ADMIN)
    tenant = r.json()["data"]["id"]
    r = await api.client.put(f"/api/admin/tenants/{tenant}/retention", json=body, headers=ADMIN)
    assert r.status_code == 422, r.text
    assert r.json()["success"] is False


async def test_unknown_tenant_is_404(api: Api) -> None:
    for method in ("GET", "PUT"):
        r = await api.client.request(
            method, "/api/admin/tenants/nope/retention", json={"retention": "1d"}, headers=ADMIN
        )
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "not_found"
