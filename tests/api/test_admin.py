"""Admin API: auth matrix, the status document, tenants and API keys."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from conveyor.queue import WorkflowExecute
from conveyor.runtime import Heartbeat
from tests.api.conftest import ADMIN, Api, make_settings, running_api


def _assert_error(body: dict[str, Any], code: str) -> None:
    assert body["success"] is False
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    assert "details" in body["error"]


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "unauthorized"),
        ({"Authorization": "Bearer wrong-token"}, 401, "unauthorized"),
        ({"Authorization": "Bearer test-admin-token-012345678"}, 401, "unauthorized"),
        ({"Authorization": "Basic dGVzdDp0ZXN0"}, 401, "unauthorized"),
        ({"Authorization": "Bearer "}, 401, "unauthorized"),
        (ADMIN, 200, None),
    ],
)
async def test_admin_auth_matrix(
    api: Api, headers: dict[str, str], status: int, code: str | None
) -> None:
    for method, path in (("GET", "/api/admin/workers/status"), ("GET", "/api/admin/tenants")):
        r = await api.client.request(method, path, headers=headers)
        assert r.status_code == status, (path, r.text)
        if code:
            _assert_error(r.json(), code)
            assert r.headers["www-authenticate"] == "Bearer"


async def test_admin_disabled_without_token(api_env: dict[str, str]) -> None:
    env = {k: v for k, v in api_env.items() if k != "ADMIN_TOKEN"}
    async with running_api(make_settings(**env)) as api:
        for headers in ({}, ADMIN, {"Authorization": "Bearer "}):
            r = await api.client.get("/api/admin/workers/status", headers=headers)
            assert r.status_code == 503
            _assert_error(r.json(), "admin_disabled")
            assert "admin API disabled" in r.json()["error"]["message"]
            r = await api.client.post("/api/admin/tenants", json={"name": "x"}, headers=headers)
            assert r.status_code == 503


def _payload(n: int, region: str = "us") -> WorkflowExecute:
    return WorkflowExecute(
        execution_id=f"exec-{n}", tenant_id="t1", workflow_id="wf1", region=region
    )


async def test_status_document_counts_jobs_without_a_worker(api: Api) -> None:
    await api.ctx.dispatcher.enqueue(_payload(1))
    await api.ctx.dispatcher.enqueue(_payload(2))
    await api.ctx.dispatcher.enqueue(_payload(2))  # duplicate job id: harmless
    await api.ctx.dispatcher.enqueue(_payload(3), delay_ms=60_000)
    await api.ctx.dispatcher.enqueue(_payload(4, "eu"))

    r = await api.client.get("/api/admin/workers/status", headers=ADMIN)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["success"] is True
    data = body["data"]
    assert data["timestamp"].endswith("Z")
    worker = data["executionWorker"]
    assert worker["started"] is False
    assert worker["queueDriver"] == "bullmq"
    us = worker["metrics"]["queueDepths"]["workflow.execute.us"]
    assert (us["waiting"], us["active"], us["delayed"], us["total"]) == (2, 0, 1, 3)
    eu = worker["metrics"]["queueDepths"]["workflow.execute.eu"]
    assert (eu["waiting"], eu["active"], eu["total"]) == (1, 0, 1)
    assert data["scheduler"]["preferredStrategy"] == "postgres"
    assert data["scheduler"]["redis"]["status"] == "ready"
    assert data["processes"] == []
    regions = {q["region"]: q["status"] for q in data["regions"]}
    assert regions == {"us": "unconsumed", "eu": "unconsumed"}
    assert data["errors"] == []


async def test_status_lists_live_processes(api: Api) -> None:
    settings = api.settings
    worker = Heartbeat(
        api.ctx.queues, role="worker", settings=settings, regions=["us"],
        info_fn=lambda: {"concurrency": 4, "activeJobs": 1, "jobsDone": 7, "jobsFailed": 1},
    )  # fmt: skip
    scheduler = Heartbeat(
        api.ctx.queues, role="scheduler", settings=settings, regions=[],
        info_fn=lambda: {"strategy": "postgres", "lockHeld": True,
                         "lastTick": "2024-05-15T18:19:00.000Z", "lagMs": 3},
    )  # fmt: skip
    standby = Heartbeat(
        api.ctx.queues,
        role="scheduler",
        settings=settings,
        regions=[],
        info_fn=lambda: {"strategy": "postgres", "lockHeld": False},
    )
    timers = Heartbeat(
        api.ctx.queues,
        role="timers",
        settings=settings,
        regions=[],
        info_fn=lambda: {"nextDueAt": "2030-01-01T00:00:00.000Z", "backlog": 2, "lagMs": 1},
    )
    for beat in (worker, scheduler, standby, timers):
        await beat.beat()

    data = (await api.client.get("/api/admin/workers/status", headers=ADMIN)).json()["data"]
    assert data["executionWorker"]["started"] is True
    assert data["executionWorker"]["instances"] == 1
    assert data["executionWorker"]["concurrency"] == 4
    assert data["executionWorker"]["activeJobs"] == 1
    assert data["scheduler"]["lockHolder"] == scheduler.process_id
    assert data["scheduler"]["lastTick"] == "2024-05-15T18:19:00.000Z"
    assert data["scheduler"]["instances"] == 2
    assert data["timerDispatcher"]["nextDueAt"] == "2030-01-01T00:00:00.000Z"
    assert data["timerDispatcher"]["backlog"] == 2
    roles = sorted(p["role"] for p in data["processes"])
    assert roles == ["scheduler", "scheduler", "timers", "worker"]
    proc = next(p for p in data["processes"] if p["role"] == "worker")
    for key in ("id", "regions", "pid", "host", "startedAt", "lastHeartbeat", "concurrency"):
        assert key in proc
    regions = {q["region"]: q["status"] for q in data["regions"]}
    assert regions["us"] == "consumed"

    ready = (await api.client.get("/api/health/ready")).json()["data"]
    assert {q["region"]: q["workers"] for q in ready["queues"]}["us"] == 1

    await worker.remove()
    data = (await api.client.get("/api/admin/workers/status", headers=ADMIN)).json()["data"]
    assert data["executionWorker"]["started"] is False


async def test_tenants_and_api_keys(api: Api) -> None:
    r = await api.client.post("/api/admin/tenants", json={"name": "acme"}, headers=ADMIN)
    assert r.status_code == 201
    tenant = r.json()["data"]
    assert tenant["name"] == "acme" and tenant["id"]

    r = await api.client.get(f"/api/admin/tenants/{tenant['id']}", headers=ADMIN)
    assert r.json()["data"]["id"] == tenant["id"]
    r = await api.client.get("/api/admin/tenants/nope", headers=ADMIN)
    assert r.status_code == 404
    _assert_error(r.json(), "not_found")

    r = await api.client.post(
        f"/api/admin/tenants/{tenant['id']}/api-keys", json={"name": "ci"}, headers=ADMIN
    )
    assert r.status_code == 201
    issued = r.json()["data"]
    assert issued["key"].startswith("cvk_") and issued["active"] is True
    auth = {"Authorization": f"Bearer {issued['key']}"}
    assert (await api.client.get("/api/workflows", headers=auth)).status_code == 200

    keys = (await api.client.get(f"/api/admin/tenants/{tenant['id']}/api-keys",
                                 headers=ADMIN)).json()["data"]  # fmt: skip
    assert [k["id"] for k in keys] == [issued["id"]]
    assert "key" not in keys[0]

    r = await api.client.delete(
        f"/api/admin/tenants/{tenant['id']}/api-keys/{issued['id']}", headers=ADMIN
    )
    assert r.status_code == 200 and r.json()["data"]["active"] is False
    r = await api.client.get("/api/workflows", headers=auth)
    assert r.status_code == 401
    _assert_error(r.json(), "unauthorized")

    r = await api.client.post("/api/admin/tenants/nope/api-keys", json={"name": "x"}, headers=ADMIN)
    assert r.status_code == 404


async def test_tenant_list_pagination(api: Api) -> None:
    for i in range(3):
        await api.client.post("/api/admin/tenants", json={"name": f"t{i}"}, headers=ADMIN)
    r = await api.client.get("/api/admin/tenants", params={"limit": 2}, headers=ADMIN)
    page = r.json()["data"]
    assert len(page["items"]) == 2 and page["nextCursor"]
    r = await api.client.get(
        "/api/admin/tenants", params={"limit": 2, "cursor": page["nextCursor"]}, headers=ADMIN
    )
    second = r.json()["data"]
    assert not {t["id"] for t in second["items"]} & {t["id"] for t in page["items"]}
    r = await api.client.get("/api/admin/tenants", params={"cursor": "garbage!"}, headers=ADMIN)
    assert r.status_code == 400
    _assert_error(r.json(), "invalid_cursor")


@pytest.mark.parametrize(
    "at", ["0001-01-01T00:30:00+01:00", "9999-12-31T23:59:59-01:00", "0001-01-01T00:00:00Z"]
)
async def test_a_crafted_cursor_is_a_400_on_every_list(api: Api, at: str) -> None:
    """A cursor no list makes (a time whose conversion to UTC, or a day before it, is out of
    range) is 400 ``invalid_cursor`` on every paginated list, not a 500."""
    auth = await api.tenant()
    cursor = base64.urlsafe_b64encode(json.dumps([at, "x"]).encode()).decode().rstrip("=")
    lists = [
        ("/api/admin/tenants", ADMIN),
        ("/api/executions", auth),
        ("/api/workflows", auth),
        ("/api/schedules", auth),
    ]
    for path, headers in lists:
        r = await api.client.get(path, params={"cursor": cursor}, headers=headers)
        assert r.status_code == 400, (path, r.text)
        _assert_error(r.json(), "invalid_cursor")
