"""Per-tenant execution limits: ``GET``/``PUT /api/admin/tenants/{tenantId}/limits`` (auth,
fallback on the settings, replace semantics, validation in the error shape, unknown tenant)."""

from __future__ import annotations

from typing import Any

import pytest

from tests.api.conftest import ADMIN, Api


async def _tenant(api: Api) -> str:
    r = await api.client.post("/api/admin/tenants", json={"name": "t"}, headers=ADMIN)
    return str(r.json()["data"]["id"])


@pytest.mark.parametrize("method", ["GET", "PUT"])
async def test_limits_need_the_admin_token(api: Api, method: str) -> None:
    path = f"/api/admin/tenants/{await _tenant(api)}/limits"
    for headers in ({}, {"Authorization": "Bearer wrong"}, await api.tenant()):
        r = await api.client.request(method, path, headers=headers, json={})
        assert r.status_code == 401, r.text
        assert r.json()["error"]["code"] == "unauthorized"


async def test_tenant_limits_override(api: Api) -> None:
    tenant = await _tenant(api)
    path = f"/api/admin/tenants/{tenant}/limits"
    r = await api.client.get(path, headers=ADMIN)
    assert r.status_code == 200, r.text
    conc = api.settings.tenant_concurrency  # the setting (default: the worker concurrency)
    assert r.json()["data"] == {
        "tenantId": tenant, "concurrency": None, "startRate": None, "startBurst": None,
        "effectiveConcurrency": conc, "effectiveStartRate": None, "effectiveStartBurst": None,
    }  # fmt: skip

    body = {"concurrency": 3, "startRate": 2.5, "startBurst": 10}
    r = await api.client.put(path, json=body, headers=ADMIN)
    assert r.status_code == 200, r.text
    got = (await api.client.get(path, headers=ADMIN)).json()["data"]
    assert (got["concurrency"], got["startRate"], got["startBurst"]) == (3, 2.5, 10)
    assert (got["effectiveConcurrency"], got["effectiveStartRate"]) == (3, 2.5)
    assert got["effectiveStartBurst"] == 10

    r = await api.client.put(path, json={"startRate": 0.5}, headers=ADMIN)  # replaces all three
    got = r.json()["data"]
    assert (got["concurrency"], got["startRate"], got["startBurst"]) == (None, 0.5, None)
    assert (got["effectiveConcurrency"], got["effectiveStartBurst"]) == (conc, 1)  # 1 s' worth
    assert (await api.client.get(path, headers=ADMIN)).json()["data"] == got

    r = await api.client.put(path, json={"concurrency": None}, headers=ADMIN)  # back to settings
    assert r.json()["data"]["startRate"] is None
    assert all(x.tenant_id != tenant for x in await api.ctx.store.limits.all())  # row deleted


@pytest.mark.parametrize(
    "body",
    [
        {"concurrency": 0},
        {"concurrency": -1},
        {"concurrency": 1.5},
        {"concurrency": "many"},
        {"concurrency": 100_001},
        {"startRate": 0},
        {"startRate": -2},
        {"startRate": "fast"},
        {"startRate": True},
        {"startRate": 1e9},
        {"startBurst": 0},
        {"startBurst": True},
        {"rate": 5},  # unknown field
        [],
    ],
)
async def test_bad_limits_are_422(api: Api, body: Any) -> None:
    path = f"/api/admin/tenants/{await _tenant(api)}/limits"
    r = await api.client.put(path, json=body, headers=ADMIN)
    assert r.status_code == 422, r.text
    error = r.json()
    assert error["success"] is False and error["error"]["code"] == "validation_error"
    assert error["error"]["message"]


async def test_malformed_body_is_400(api: Api) -> None:
    path = f"/api/admin/tenants/{await _tenant(api)}/limits"
    headers = {**ADMIN, "Content-Type": "application/json"}
    r = await api.client.put(path, content=b'{"concurrency": NaN}', headers=headers)
    assert r.status_code in (400, 422), r.text
    assert r.json()["success"] is False
    r = await api.client.put(path, content=b'{"concurrency": 3', headers=headers)
    assert r.status_code == 400 and r.json()["error"]["code"] == "malformed_json"


async def test_unknown_tenant_is_404(api: Api) -> None:
    for method in ("GET", "PUT"):
        r = await api.client.request(
            method, "/api/admin/tenants/nope/limits", json={"concurrency": 2}, headers=ADMIN
        )
        assert r.status_code == 404, r.text
        assert r.json()["error"]["code"] == "not_found"
