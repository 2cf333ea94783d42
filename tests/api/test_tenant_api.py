"""Tenant API: workflows, executions, schedules, webhooks; isolation between tenants."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from tests.api.conftest import NOOP_WORKFLOW, Api


def _error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["success"] is False and body["error"]["code"] == code, body
    return body["error"]  # type: ignore[no-any-return]


async def test_workflow_crud_and_versions(api: Api) -> None:
    auth = await api.tenant()
    r = await api.client.post("/api/workflows", json=NOOP_WORKFLOW, headers=auth)
    assert r.status_code == 201
    wf = r.json()["data"]
    assert wf["version"] == 1 and wf["region"] == "us" and wf["enabled"] is True
    assert wf["webhookSecret"].startswith("whs_")
    assert wf["webhook"] == {"url": f"/api/webhooks/{wf['id']}", "hasSecret": True}

    got = (await api.client.get(f"/api/workflows/{wf['id']}", headers=auth)).json()["data"]
    assert got["definition"]["steps"][0]["id"] == "a"
    assert "webhookSecret" not in got

    v2 = {"name": "noop2", "region": "eu", "steps": [{"id": "b", "type": "noop"}]}
    r = await api.client.put(f"/api/workflows/{wf['id']}", json=v2, headers=auth)
    assert r.status_code == 200 and r.json()["data"]["version"] == 2
    assert r.json()["data"]["region"] == "eu"
    r = await api.client.get(f"/api/workflows/{wf['id']}/versions/1", headers=auth)
    assert r.json()["data"]["definition"]["steps"][0]["id"] == "a"

    r = await api.client.patch(f"/api/workflows/{wf['id']}", json={"enabled": False},
                               headers=auth)  # fmt: skip
    assert r.json()["data"]["enabled"] is False
    r = await api.client.post(f"/api/workflows/{wf['id']}/executions", json={}, headers=auth)
    _error(r, 409, "conflict")

    listed = (await api.client.get("/api/workflows", headers=auth)).json()["data"]
    assert [w["id"] for w in listed["items"]] == [wf["id"]]
    assert "definition" not in listed["items"][0]

    assert (await api.client.delete(f"/api/workflows/{wf['id']}", headers=auth)).status_code == 204
    _error(await api.client.get(f"/api/workflows/{wf['id']}", headers=auth), 404, "not_found")


async def test_invalid_definition_points_at_step_and_field(api: Api) -> None:
    auth = await api.tenant()
    doc = {"name": "bad", "steps": [{"id": "a", "type": "noop"}, {"id": "b", "type": "http"}]}
    err = _error(await api.client.post("/api/workflows", json=doc, headers=auth),
                 422, "workflow_invalid")  # fmt: skip
    assert err["details"][0]["step"] == "b"
    assert err["details"][0]["field"] == "url"
    err = _error(await api.client.post("/api/workflows", json=[1], headers=auth),
                 422, "validation_error")  # fmt: skip
    assert err["details"][0]["location"] == "body"


async def test_trigger_get_list_cancel_retry(api: Api) -> None:
    auth = await api.tenant()
    wf = await api.workflow(auth)
    r = await api.client.post(f"/api/workflows/{wf}/executions", json={"input": {"x": 1}},
                              headers=auth)  # fmt: skip
    assert r.status_code == 202
    ex = r.json()["data"]
    assert ex["status"] == "queued" and ex["input"] == {"x": 1} and ex["triggeredBy"] == "api"
    state = await api.ctx.execution_queue("us").get_job_state(ex["id"])
    assert state in ("waiting", "prioritized"), "job id = execution id, on the region's queue"

    got = (await api.client.get(f"/api/executions/{ex['id']}", headers=auth)).json()["data"]
    assert got["id"] == ex["id"] and got["steps"] == []

    r = await api.client.post(f"/api/executions/{ex['id']}/cancel", headers=auth)
    assert r.status_code == 200 and r.json()["data"]["status"] == "cancelled"
    r = await api.client.post(f"/api/executions/{ex['id']}/retry", headers=auth)
    assert r.status_code == 202
    retried = r.json()["data"]
    assert retried["retryOf"] == ex["id"] and retried["status"] == "queued"
    _error(await api.client.post(f"/api/executions/{retried['id']}/retry", headers=auth),
           409, "conflict")  # fmt: skip

    r = await api.client.get("/api/executions", params={"status": "cancelled"}, headers=auth)
    assert [e["id"] for e in r.json()["data"]["items"]] == [ex["id"]]
    r = await api.client.get(
        "/api/executions", params=[("status", "queued"), ("status", "cancelled")], headers=auth
    )
    assert len(r.json()["data"]["items"]) == 2
    _error(await api.client.get("/api/executions", params={"status": "bogus"}, headers=auth),
           422, "validation_error")  # fmt: skip


async def test_execution_pagination_with_workflow_filter(api: Api) -> None:
    auth = await api.tenant()
    wf, other = await api.workflow(auth), await api.workflow(auth)
    ids = []
    for _ in range(5):
        r = await api.client.post(f"/api/workflows/{wf}/executions", headers=auth)
        ids.append(r.json()["data"]["id"])
    await api.client.post(f"/api/workflows/{other}/executions", headers=auth)
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 2, "workflowId": wf}
        if cursor:
            params["cursor"] = cursor
        page = (await api.client.get("/api/executions", params=params, headers=auth)).json()
        seen += [e["id"] for e in page["data"]["items"]]
        cursor = page["data"]["nextCursor"]
        pages += 1
        if not cursor:
            break
    assert pages == 3
    assert seen == list(reversed(ids)), "newest first, no gaps, no duplicates"


async def test_idempotency_key_returns_the_same_execution(api: Api) -> None:
    auth = await api.tenant()
    wf = await api.workflow(auth)
    headers = {**auth, "Idempotency-Key": "order-42"}
    first = await api.client.post(f"/api/workflows/{wf}/executions", json={"input": 1},
                                  headers=headers)  # fmt: skip
    again = await api.client.post(f"/api/workflows/{wf}/executions", json={"input": 1},
                                  headers=headers)  # fmt: skip
    assert first.status_code == 202 and again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert first.json()["data"]["id"] == again.json()["data"]["id"]
    counts = await api.ctx.execution_queue("us").get_job_counts("waiting", "prioritized")
    assert sum(counts.values()) == 1
    other = await api.workflow(auth)
    _error(await api.client.post(f"/api/workflows/{other}/executions", headers=headers),
           409, "conflict")  # fmt: skip
    # another tenant may use the same key independently
    auth2 = await api.tenant("other")
    wf2 = await api.workflow(auth2)
    r = await api.client.post(f"/api/workflows/{wf2}/executions",
                              headers={**auth2, "Idempotency-Key": "order-42"})  # fmt: skip
    assert r.status_code == 202


async def test_webhook_secret(api: Api) -> None:
    auth = await api.tenant()
    r = await api.client.post("/api/workflows", json=NOOP_WORKFLOW, headers=auth)
    wf, secret = r.json()["data"]["id"], r.json()["data"]["webhookSecret"]

    r = await api.client.post(f"/api/webhooks/{wf}", json={"event": "x"},
                              headers={"X-Webhook-Secret": secret})  # fmt: skip
    assert r.status_code == 202
    ex = r.json()["data"]
    assert ex["input"] == {"event": "x"} and ex["triggeredBy"] == "webhook"
    r = await api.client.post(
        f"/api/webhooks/{wf}/{secret}",
        content=b"a=1",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code == 202
    assert r.json()["data"]["input"] == {"contentType": "application/x-www-form-urlencoded",
                                         "body": "a=1"}  # fmt: skip

    for headers in ({}, {"X-Webhook-Secret": secret + "x"}, {"X-Webhook-Secret": "whs_nope"}):
        _error(await api.client.post(f"/api/webhooks/{wf}", json={}, headers=headers),
               401, "unauthorized")  # fmt: skip
    _error(await api.client.post(f"/api/webhooks/{wf}/wrong", json={}), 401, "unauthorized")
    _error(
        await api.client.post("/api/webhooks/nope", json={}, headers={"X-Webhook-Secret": secret}),
        401,
        "unauthorized",
    )
    _error(await api.client.post(f"/api/webhooks/{wf}", content=b"{nope",
                                 headers={"X-Webhook-Secret": secret,
                                          "Content-Type": "application/json"}),
           400, "malformed_json")  # fmt: skip

    rotated = await api.client.post(f"/api/workflows/{wf}/webhook/rotate", headers=auth)
    new_secret = rotated.json()["data"]["secret"]
    assert new_secret != secret
    _error(
        await api.client.post(f"/api/webhooks/{wf}", json={}, headers={"X-Webhook-Secret": secret}),
        401,
        "unauthorized",
    )
    r = await api.client.post(f"/api/webhooks/{wf}", json={},
                              headers={"X-Webhook-Secret": new_secret})  # fmt: skip
    assert r.status_code == 202


async def test_schedules_crud_and_validation(api: Api) -> None:
    auth = await api.tenant()
    wf = await api.workflow(auth)
    body = {"workflowId": wf, "cron": "0 9 * * 1-5", "timezone": "Europe/Berlin",
            "input": {"a": 1}}  # fmt: skip
    r = await api.client.post("/api/schedules", json=body, headers=auth)
    assert r.status_code == 201, r.text
    sched = r.json()["data"]
    assert sched["nextFireAt"] and sched["enabled"] is True

    err = _error(await api.client.post("/api/schedules", json={**body, "cron": "61 * * * *"},
                                       headers=auth), 422, "schedule_invalid")  # fmt: skip
    assert err["details"]["field"] == "cron"
    err = _error(await api.client.post("/api/schedules", json={**body, "timezone": "Mars/Base"},
                                       headers=auth), 422, "schedule_invalid")  # fmt: skip
    assert err["details"]["field"] == "timezone"

    r = await api.client.patch(
        f"/api/schedules/{sched['id']}",
        json={"cron": "*/5 * * * *", "enabled": False},
        headers=auth,
    )
    assert r.status_code == 200
    assert r.json()["data"]["cron"] == "*/5 * * * *" and r.json()["data"]["nextFireAt"] is None
    _error(await api.client.patch(f"/api/schedules/{sched['id']}", json={"timezone": "x/y"},
                                  headers=auth), 422, "schedule_invalid")  # fmt: skip
    listed = (await api.client.get("/api/schedules", params={"workflowId": wf},
                                   headers=auth)).json()["data"]  # fmt: skip
    assert [s["id"] for s in listed["items"]] == [sched["id"]]
    assert (
        await api.client.delete(f"/api/schedules/{sched['id']}", headers=auth)
    ).status_code == 204
    _error(await api.client.get(f"/api/schedules/{sched['id']}", headers=auth), 404, "not_found")


async def test_tenant_routes_need_an_api_key(api: Api) -> None:
    for headers in ({}, {"Authorization": "Bearer cvk_000000000000_nope"},
                    {"Authorization": "Bearer test-admin-token-0123456789"}):  # fmt: skip
        _error(await api.client.get("/api/workflows", headers=headers), 401, "unauthorized")
        _error(await api.client.get("/api/executions/x", headers=headers), 401, "unauthorized")


async def test_concurrent_triggers_with_one_idempotency_key(api: Api) -> None:
    auth = await api.tenant()
    wf = await api.workflow(auth)
    headers = {**auth, "Idempotency-Key": "burst"}
    answers = await asyncio.gather(
        *(api.client.post(f"/api/workflows/{wf}/executions", headers=headers) for _ in range(8))
    )
    assert len({r.json()["data"]["id"] for r in answers}) == 1
    assert sorted(r.status_code for r in answers) == [200] * 7 + [202]
