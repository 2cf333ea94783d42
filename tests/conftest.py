"""Fixtures shared by every test tier.

* ``redis_prefix``: a unique BullMQ key prefix per test; its keys are deleted afterwards.
  Tests never FLUSHALL and never touch keys they did not create.
* ``pg_url``: a PostgreSQL database created for this test session (``conveyor_t_<random>``)
  on the machine's server and dropped at the end.
* ``settings_env``: the environment a Conveyor process under test should get.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.asyncio as aioredis

REDIS_HOST = os.environ.get("TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("TEST_REDIS_PORT", "6379"))
PG_ADMIN_DSN = os.environ.get("TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    prefix = f"cvt{uuid.uuid4().hex[:10]}"
    yield prefix

    async def cleanup() -> None:
        client = aioredis.Redis(host=REDIS_HOST, port=REDIS_PORT)
        try:
            keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
            for i in range(0, len(keys), 500):
                await client.delete(*keys[i : i + 500])
        finally:
            await client.aclose()

    asyncio.run(cleanup())


@pytest.fixture
async def redis_client() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis(host=REDIS_HOST, port=REDIS_PORT, decode_responses=True)
    yield client
    await client.aclose()


async def _pg_admin(sql: str) -> None:
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(PG_ADMIN_DSN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped afterwards."""
    name = f"conveyor_t_{uuid.uuid4().hex[:12]}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    base = PG_ADMIN_DSN.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def fresh_pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for one test, dropped afterwards."""
    name = f"conveyor_t_{uuid.uuid4().hex[:12]}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    base = PG_ADMIN_DSN.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def settings_env(redis_prefix: str) -> dict[str, str]:
    from tests.helpers import env_for

    return env_for(
        QUEUE_REDIS_HOST=REDIS_HOST,
        QUEUE_REDIS_PORT=str(REDIS_PORT),
        QUEUE_PREFIX=redis_prefix,
    )
