"""``/api/secrets``: create, list, rotate, delete — values never returned; validation in the
error shape; 409/404; tenants isolated; 503 without ``SECRETS_KEY``."""

from __future__ import annotations

import asyncio
import base64
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from conveyor.settings import load_settings
from conveyor.store import migrate
from tests.api.conftest import Api, running_api

VALUE = "sk_live_0123456789abcdef"


@pytest.fixture
def secrets_env(api_env: dict[str, str], fresh_pg_url: str) -> dict[str, str]:
    """The API's environment on a database of this test's own (secrets left in the shared
    session database would stop other tests' APIs, started without ``SECRETS_KEY``)."""
    asyncio.run(migrate(load_settings({"DATABASE_URL": fresh_pg_url})))
    key = base64.b64encode(os.urandom(32)).decode()
    return {**api_env, "DATABASE_URL": fresh_pg_url, "SECRETS_KEY": key}


@pytest.fixture
async def sapi(secrets_env: dict[str, str]) -> AsyncIterator[Api]:
    async with running_api(load_settings(secrets_env)) as running:
        yield running


def _error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["success"] is False and body["error"]["code"] == code, body
    assert set(body["error"]) == {"code", "message", "details"}
    return body["error"]  # type: ignore[no-any-return]


async def test_crud_never_returns_the_value(sapi: Api) -> None:
    auth = await sapi.tenant()
    c = sapi.client
    r = await c.post("/api/secrets", json={"name": "STRIPE_KEY", "value": VALUE}, headers=auth)
    assert r.status_code == 201, r.text
    created = r.json()["data"]
    assert set(created) == {"name", "createdAt", "updatedAt"} and created["name"] == "STRIPE_KEY"
    _error(
        await c.post("/api/secrets", json={"name": "STRIPE_KEY", "value": "other"}, headers=auth),
        409,
        "conflict",
    )
    await c.post("/api/secrets", json={"name": "A_FIRST", "value": "another"}, headers=auth)
    listed = (await c.get("/api/secrets", headers=auth)).json()["data"]
    assert [s["name"] for s in listed] == ["A_FIRST", "STRIPE_KEY"]
    r = await c.put("/api/secrets/STRIPE_KEY", json={"value": VALUE + "-rotated"}, headers=auth)
    assert r.status_code == 200, r.text
    rotated = r.json()["data"]
    assert rotated["createdAt"] == created["createdAt"]
    assert rotated["updatedAt"] >= created["updatedAt"]
    _error(await c.put("/api/secrets/NOPE", json={"value": "abcd"}, headers=auth), 404, "not_found")
    assert (await c.delete("/api/secrets/STRIPE_KEY", headers=auth)).status_code == 204
    _error(await c.delete("/api/secrets/STRIPE_KEY", headers=auth), 404, "not_found")
    listed = (await c.get("/api/secrets", headers=auth)).json()["data"]
    assert [s["name"] for s in listed] == ["A_FIRST"]
    openapi = (await c.get("/openapi.json")).text
    assert "/api/secrets" in openapi and VALUE not in openapi
    # unauthenticated
    _error(await c.get("/api/secrets"), 401, "unauthorized")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "bad-name", "value": VALUE}, "name"),
        ({"name": "1ABC", "value": VALUE}, "name"),
        ({"name": "X" * 65, "value": VALUE}, "name"),
        ({"name": "OK", "value": "abc"}, "value"),
        ({"name": "OK", "value": "x" * (16 * 1024 + 1)}, "value"),
        ({"name": "OK", "value": 12345}, "value"),
        ({"name": "OK"}, "value"),
        ({"name": "OK", "value": VALUE, "extra": 1}, "extra"),
    ],
)
async def test_validation_is_422_in_the_error_shape(
    sapi: Api, body: dict[str, Any], field: str
) -> None:
    auth = await sapi.tenant()
    error = _error(await sapi.client.post("/api/secrets", json=body, headers=auth), 422,
                   "validation_error")  # fmt: skip
    assert error["details"][0]["field"] == field
    assert VALUE not in json.dumps(error)


async def test_a_value_over_16_kib_of_utf8_is_refused(sapi: Api) -> None:
    auth = await sapi.tenant()
    value = "\u00e9" * (8 * 1024 + 1)  # fewer characters than the limit, more bytes
    r = await sapi.client.post("/api/secrets", json={"name": "WIDE", "value": value}, headers=auth)
    assert _error(r, 422, "invalid_value")["details"] == {"field": "value"}
    r = await sapi.client.put("/api/secrets/bad-name", json={"value": VALUE}, headers=auth)
    _error(r, 422, "validation_error")


async def test_tenants_see_only_their_own_secrets(sapi: Api) -> None:
    a, b = await sapi.tenant("a"), await sapi.tenant("b")
    c = sapi.client
    assert (await c.post("/api/secrets", json={"name": "TOKEN", "value": VALUE},
                         headers=a)).status_code == 201  # fmt: skip
    assert (await c.get("/api/secrets", headers=b)).json()["data"] == []
    _error(await c.put("/api/secrets/TOKEN", json={"value": "bbbb"}, headers=b), 404, "not_found")
    _error(await c.delete("/api/secrets/TOKEN", headers=b), 404, "not_found")
    # b may have its own of the same name
    assert (await c.post("/api/secrets", json={"name": "TOKEN", "value": "b-value"},
                         headers=b)).status_code == 201  # fmt: skip
    assert [s["name"] for s in (await c.get("/api/secrets", headers=a)).json()["data"]] == ["TOKEN"]
    assert (await c.delete("/api/secrets/TOKEN", headers=b)).status_code == 204
    assert [s["name"] for s in (await c.get("/api/secrets", headers=a)).json()["data"]] == ["TOKEN"]


async def test_without_secrets_key_creating_is_503(api: Api) -> None:
    auth = await api.tenant()
    r = await api.client.post("/api/secrets", json={"name": "T", "value": VALUE}, headers=auth)
    assert "SECRETS_KEY" in _error(r, 503, "secrets_unavailable")["message"]
    assert (await api.client.get("/api/secrets", headers=auth)).json()["data"] == []
