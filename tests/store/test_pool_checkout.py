"""The SQLAlchemy pool on PostgreSQL: a checkout costs no round trip (no ``pool_pre_ping``:
its ``BEGIN`` / empty query / ``ROLLBACK`` tripled the cost of every short read), and a
connection whose backend was killed while idle in the pool is replaced at checkout, not used
(what ``pool_pre_ping`` was there for)."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import text

from conveyor.store import Store, asyncpg_dsn
from conveyor.store._db import autocommit
from tests.store._fixtures import settings_for


async def test_checkouts_ping_nothing(store_pg_url: str) -> None:
    async with Store(settings_for(store_pg_url, database_pool_size=1)) as store:
        dialect: Any = store.engine.dialect
        pings: list[object] = []
        ping = dialect.do_ping

        def counted(dbapi_connection: object) -> bool:
            pings.append(dbapi_connection)
            return bool(ping(dbapi_connection))

        dialect.do_ping = counted
        engine = autocommit(store.engine)
        for i in range(3):
            async with engine.connect() as conn:
                assert (await conn.execute(text(f"SELECT {i}"))).scalar_one() == i
        async with store.engine.begin() as conn:
            await conn.execute(text("SELECT 1"))
        assert pings == []


async def test_a_connection_killed_while_idle_is_replaced_at_checkout(store_pg_url: str) -> None:
    async with Store(settings_for(store_pg_url, database_pool_size=1)) as store:
        engine = autocommit(store.engine)
        async with engine.connect() as conn:
            killed = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        admin = await asyncpg.connect(asyncpg_dsn(store_pg_url))
        try:
            assert await admin.fetchval("SELECT pg_terminate_backend($1)", killed)
        finally:
            await admin.close()
        await asyncio.sleep(0.1)  # the pool's connection sees its socket close
        async with engine.connect() as conn:  # no error: a new connection
            pid = (await conn.execute(text("SELECT pg_backend_pid()"))).scalar_one()
        assert pid != killed
        # and a transaction on the same pool works too
        async with store.engine.begin() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar_one() == 1
