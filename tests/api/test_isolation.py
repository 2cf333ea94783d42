"""Tenant isolation: tenant B gets 404 for every one of tenant A's objects, on every route."""

from __future__ import annotations

import re

from tests.api.conftest import NOOP_WORKFLOW, Api

TENANT_PREFIXES = ("/api/workflows", "/api/executions", "/api/schedules", "/api/secrets")


def _shape(path: str) -> str:
    """A route's path with its parameters blanked (``{executionId}`` and ``{execution_id}``
    alike)."""
    return re.sub(r"\{[^}]*\}", "{}", path)


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
        ("GET", "/api/executions/{execution_id}/events", None),
        ("POST", "/api/executions/{execution_id}/events/{name}", {"amount": 1}),
        ("GET", "/api/schedules/{schedule_id}", None),
        ("PATCH", "/api/schedules/{schedule_id}", {"enabled": False}),
        ("DELETE", "/api/schedules/{schedule_id}", None),
        ("GET", "/api/schedules/{schedule_id}/ticks", None),
    ]
    ids = {"workflow_id": wf, "execution_id": ex["id"], "schedule_id": sched["id"], "version": 1,
           "name": "approved"}  # fmt: skip
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

    # every tenant route of the app (its OpenAPI document: routers included or not) is
    # covered above — the secrets' routes by test_secrets_api's
    # test_tenants_see_only_their_own_secrets (they need SECRETS_KEY)
    covered = {(m, _shape(t)) for m, t, _ in single} | {("POST", "/api/schedules")}
    covered |= {("GET", p) for p, _ in lists} | {("POST", "/api/workflows")}
    covered |= {("GET", "/api/secrets"), ("POST", "/api/secrets"),
                ("PUT", "/api/secrets/{}"), ("DELETE", "/api/secrets/{}")}  # fmt: skip
    routes = [
        (method.upper(), _shape(path))
        for path, operations in api.app.openapi()["paths"].items()
        if path.startswith(TENANT_PREFIXES)
        for method in operations
    ]
    assert len(routes) >= len(single) + 5, routes  # the document lists the routes
    for route in routes:
        assert route in covered, f"isolation untested: {route}"

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
