"""Fixtures for the API tests: a migrated session database, an in-process API client.

``api`` runs the real application (lifespan included) over ``httpx.ASGITransport`` against the
real Redis (unique key prefix) and Postgres (the session database, migrated once).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from conveyor.api.app import create_app
from conveyor.api.context import ApiContext, open_context
from conveyor.settings import Settings, load_settings
from conveyor.store import migrate
from tests.conftest import REDIS_HOST, REDIS_PORT

ADMIN_TOKEN = "test-admin-token-0123456789"
ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="session")
def migrated_pg(pg_url: str) -> str:
    asyncio.run(migrate(load_settings({"DATABASE_URL": pg_url})))
    return pg_url


def make_settings(**env: str) -> Settings:
    return load_settings(env)


@pytest.fixture
def api_env(redis_prefix: str, migrated_pg: str) -> dict[str, str]:
    return {
        "QUEUE_REDIS_HOST": REDIS_HOST,
        "QUEUE_REDIS_PORT": str(REDIS_PORT),
        "QUEUE_PREFIX": redis_prefix,
        "DATABASE_URL": migrated_pg,
        "ADMIN_TOKEN": ADMIN_TOKEN,
        "EXECUTION_REGIONS": "us,eu",
    }


@dataclass
class Api:
    client: httpx.AsyncClient
    ctx: ApiContext
    settings: Settings
    app: FastAPI

    async def tenant(self, name: str = "acme") -> dict[str, str]:
        """Create a tenant and an API key; the tenant's auth headers."""
        r = await self.client.post("/api/admin/tenants", json={"name": name}, headers=ADMIN)
        assert r.status_code == 201, r.text
        tenant_id = r.json()["data"]["id"]
        r = await self.client.post(f"/api/admin/tenants/{tenant_id}/api-keys", headers=ADMIN)
        assert r.status_code == 201, r.text
        return {"Authorization": f"Bearer {r.json()['data']['key']}"}

    async def workflow(self, headers: dict[str, str], doc: dict[str, Any] | None = None) -> str:
        r = await self.client.post("/api/workflows", json=doc or NOOP_WORKFLOW, headers=headers)
        assert r.status_code == 201, r.text
        return str(r.json()["data"]["id"])


NOOP_WORKFLOW: dict[str, Any] = {"name": "noop", "steps": [{"id": "a", "type": "noop"}]}


@contextlib.asynccontextmanager
async def running_api(settings: Settings) -> AsyncIterator[Api]:
    """The application with its own context (no heartbeat), served in-process."""
    async with open_context(settings, heartbeat=False) as ctx:
        app = create_app(settings, context=ctx)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
                yield Api(client, ctx, settings, app)


@pytest.fixture
async def api(api_env: dict[str, str]) -> AsyncIterator[Api]:
    async with running_api(make_settings(**api_env)) as running:
        yield running
