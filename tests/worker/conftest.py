"""Fixtures of the worker tests: one migrated Postgres database per module, seeding helpers."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from sqlalchemy import func, select

from conveyor.dispatch import ExecutionDispatcher
from conveyor.queue import QueueFactory, WorkflowExecute
from conveyor.settings import Settings
from conveyor.store import Store, migrate, utcnow
from conveyor.store.schema import executions
from conveyor.store.triggers import insert_values, new_execution
from tests.conftest import PG_ADMIN_DSN, _pg_admin
from tests.worker._support import make_settings


@pytest.fixture(scope="module")
def worker_db() -> Iterator[str]:
    """A migrated PostgreSQL database shared by one test module (tenants keep tests apart)."""
    name = f"conveyor_t_{uuid.uuid4().hex[:12]}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    url = f"{PG_ADMIN_DSN.rsplit('/', 1)[0]}/{name}"
    asyncio.run(migrate(make_settings("unused", url)))
    yield url
    asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def wsettings(redis_prefix: str, worker_db: str) -> Settings:
    return make_settings(redis_prefix, worker_db)


class Seeder:
    """Creates tenants, workflows and executions, and dispatches them like the API does."""

    def __init__(self, store: Store, queues: QueueFactory, settings: Settings) -> None:
        self.store = store
        self.queues = queues
        self.settings = settings
        self.dispatcher = ExecutionDispatcher(queues, settings)

    async def tenant(self, name: str = "t") -> str:
        return (await self.store.tenants.create(f"{name}-{uuid.uuid4().hex[:6]}")).id

    async def workflow(self, tenant_id: str, steps: list[dict[str, Any]]) -> str:
        wf = await self.store.workflows.create(tenant_id, {"name": "wf", "steps": steps})
        return wf.id

    async def executions(
        self,
        tenant_id: str,
        workflow_id: str,
        inputs: list[Any],
        *,
        dispatch: bool = True,
        region: str = "us",
    ) -> list[str]:
        """Insert ``queued`` executions in one statement and (optionally) enqueue them."""
        now = utcnow()
        rows = [
            new_execution(
                tenant_id=tenant_id,
                workflow_id=workflow_id,
                version=1,
                region=region,
                input=inp,
                triggered_by="api",
                now=now,
            )
            for inp in inputs
        ]
        async with self.store.engine.begin() as conn:
            await conn.execute(executions.insert(), [insert_values(r) for r in rows])
        ids = [r.id for r in rows]
        if dispatch:
            await self.dispatch(tenant_id, workflow_id, ids, region=region)
        return ids

    async def dispatch(
        self, tenant_id: str, workflow_id: str, ids: list[str], *, region: str = "us"
    ) -> None:
        await self.dispatcher.enqueue_many(
            [
                WorkflowExecute(
                    execution_id=i, tenant_id=tenant_id, workflow_id=workflow_id, region=region
                )
                for i in ids
            ]
        )

    async def statuses(self, ids: list[str]) -> dict[str, str]:
        return await self.store.executions.status_of(ids)

    async def wait_status(
        self, ids: list[str], status: str = "succeeded", within: float = 30.0
    ) -> dict[str, str]:
        deadline = asyncio.get_running_loop().time() + within
        while True:
            found = await self.statuses(ids)
            if len(found) == len(ids) and all(s == status for s in found.values()):
                return found
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"not all {status} within {within}s: {found}")
            await asyncio.sleep(0.1)

    async def started_before(self, tenant_id: str, execution_id: str) -> int:
        """How many of ``tenant_id``'s executions started before ``execution_id`` did."""
        async with self.store.engine.connect() as conn:
            mark = (
                await conn.execute(
                    select(executions.c.started_at).where(executions.c.id == execution_id)
                )
            ).scalar_one()
            count = (
                await conn.execute(
                    select(func.count()).where(
                        executions.c.tenant_id == tenant_id, executions.c.started_at < mark
                    )
                )
            ).scalar_one()
        return int(count)


@asynccontextmanager
async def seeder(settings: Settings) -> AsyncIterator[Seeder]:
    async with Store(settings) as store, QueueFactory(settings) as queues:
        yield Seeder(store, queues, settings)
