"""Tenant isolation: tenant B gets 404 for every one of tenant A's objects, on every route."""

from __future__ import annotations

from fastapi.routing import APIRoute

from tests.api.conftest import NOOP_WORKFLOW, Api

TENANT_PREFIXES = ("/api/workflows", "/api/executions", "/api/schedules")


async def test_every_tenant_route_is_isolated(api: Api) -> None:
    a, b = await api.tenant("a"), await api.tenant("b")
    wf = await api.workflow(a)
    ex = (await api.client.post(f"/api/workflows/{wf}/executions", headers=a)).json()["data"]
    await api.client.post(f"/api/executions/{ex['id']}/cancel", headers=a)
    sched = (await api.client.post("/api/schedules", json={"workflowId": wf, "cron": "* * * * *"},
                                   headers=a)).json()["data"]  # fmt: skip
    b_wf = await api.workflow(b)

    single = [
        ("GET", "/api/workflows/{workflow_id}", None),
        ("PUT", "/api/workflows/{workflow_id}", NOOP_WORKFLOW),
        ("PATCH", "/api/workflows/{workflow_id}", {"enabled": False}),
        ("DELETE", "/api/workflows/{workflow_id}", None),
        ("GET", "/api/workflows/{workflow_id}/versions/{version}", None),
        ("POST", "/api/workflows/{workflow_id}/webhook/rotate", None),
        ("POST", "/api/workflows/{workflow_id}/executions", {"input": 1}),
        ("GET", "/api/executions/{execution_id}", None),
        ("POST", "/api/executions/{execution_id}/cancel", None),
        ("POST", "/api/executions/{execution_id}/retry", None),
        ("GET", "/api/schedules/{schedule_id}", None),
        ("PATCH", "/api/schedules/{schedule_id}", {"enabled": False}),
        ("DELETE", "/api/schedules/{schedule_id}", None),
    ]
    ids = {"workflow_id": wf, "execution_id": ex["id"], "schedule_id": sched["id"], "version": 1}
    for method, template, body in single:
        r = await api.client.request(method, template.format(**ids), json=body, headers=b)
        assert r.status_code == 404, (method, template, r.text)
        assert r.json()["error"]["code"] == "not_found"

    r = await api.client.post("/api/schedules", json={"workflowId": wf, "cron": "* * * * *"},
                              headers=b)  # fmt: skip
    assert r.status_code == 404
    lists = [
        ("/api/workflows", {}),
        ("/api/executions", {}),
        ("/api/executions", {"workflowId": wf}),
        ("/api/schedules", {}),
        ("/api/schedules", {"workflowId": wf}),
    ]
    for path, params in lists:
        r = await api.client.get(path, params=params, headers=b)
        assert r.status_code == 200
        found = {item["id"] for item in r.json()["data"]["items"]}
        assert not found & {wf, ex["id"], sched["id"]}, path
    assert {w["id"] for w in (await api.client.get("/api/workflows", headers=b)).json()["data"]
            ["items"]} == {b_wf}  # fmt: skip

    # every tenant route of the app is covered above
    covered = {(m, t) for m, t, _ in single} | {("POST", "/api/schedules")}
    covered |= {("GET", p) for p, _ in lists} | {("POST", "/api/workflows")}
    for route in api.app.routes:
        if isinstance(route, APIRoute) and route.path.startswith(TENANT_PREFIXES):
            for method in route.methods or ():
                assert (method, route.path) in covered, f"isolation untested: {method} {route.path}"

    # tenant A's objects are untouched
    got = (await api.client.get(f"/api/workflows/{wf}", headers=a)).json()["data"]
    assert got["version"] == 1 and got["enabled"] is True
    got = (await api.client.get(f"/api/executions/{ex['id']}", headers=a)).json()["data"]
    assert got["status"] == "cancelled"
    got = (await api.client.get(f"/api/schedules/{sched['id']}", headers=a)).json()["data"]
    assert got["enabled"] is True


async def test_webhook_of_another_workflow_is_refused(api: Api) -> None:
    a, b = await api.tenant("a"), await api.tenant("b")
    wa = (await api.client.post("/api/workflows", json=NOOP_WORKFLOW, headers=a)).json()["data"]
    wb = (await api.client.post("/api/workflows", json=NOOP_WORKFLOW, headers=b)).json()["data"]
    r = await api.client.post(f"/api/webhooks/{wa['id']}",
                              headers={"X-Webhook-Secret": wb["webhookSecret"]})  # fmt: skip
    assert r.status_code == 401
