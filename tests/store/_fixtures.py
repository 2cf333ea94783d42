"""Database fixtures shared by tests/store and tests/engine.

``db_url`` is parametrized: every test that uses it runs on SQLite (a copy of a migrated
template file per test) and on Postgres (a session database of its own, migrated once,
every Conveyor table truncated before each test).
"""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from sqlalchemy import text

from conveyor.settings import Settings, load_settings
from conveyor.store import Store, migrate
from conveyor.store.schema import metadata


def settings_for(url: str, **overrides: object) -> Settings:
    return load_settings({}, database_url=url, **overrides)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("conveyor-template") / "template.db"
    asyncio.run(migrate(settings_for(f"sqlite:///{path}")))
    return path


async def _truncate(url: str) -> None:
    import asyncpg  # type: ignore[import-untyped]

    from conveyor.store import asyncpg_dsn

    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        names = ", ".join(t.name for t in metadata.sorted_tables)
        await conn.execute(f"TRUNCATE {names} CASCADE")
    finally:
        await conn.close()


@pytest.fixture(params=["sqlite", "postgres"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database: SQLite file or Postgres."""
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path / "conveyor.db"
        shutil.copyfile(template, path)
        return f"sqlite:///{path}"
    url: str = request.getfixturevalue("store_pg_url")
    asyncio.run(_truncate(url))
    return url


@pytest.fixture(scope="session")
def store_pg_url() -> Iterator[str]:
    """A migrated Postgres database of our own for this session (like ``pg_url``, but not
    shared: these tests truncate it before each test), dropped at the end."""
    from tests.conftest import PG_ADMIN_DSN, _pg_admin

    name = f"conveyor_t_{uuid.uuid4().hex[:12]}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    url = f"{PG_ADMIN_DSN.rsplit('/', 1)[0]}/{name}"
    try:
        asyncio.run(migrate(settings_for(url)))
        yield url
    finally:
        asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def settings(db_url: str) -> Settings:
    return settings_for(db_url, step_output_max_bytes=4096)


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[Store]:
    async with Store(settings, pool_size=5) as opened:
        yield opened


@pytest.fixture
async def pg(fresh_pg_url: str) -> AsyncIterator[Store]:
    """A migrated PostgreSQL database of the test's own (partitions outlive a truncate)."""
    settings = settings_for(fresh_pg_url)
    await migrate(settings)
    async with Store(settings, pool_size=3) as store:
        yield store


@asynccontextmanager
async def row_trigger(store: Store, name: str, when: str, body: str) -> AsyncIterator[None]:
    """A PostgreSQL row trigger ``name`` (``when``: e.g. ``BEFORE INSERT ON executions``) that
    runs the PL/pgSQL ``body`` before ``RETURN NEW`` — a fault injected in the real database
    (a ``RAISE``, a backend terminated) — dropped afterwards (the session database outlives
    the test)."""
    async with store.engine.begin() as conn:
        await conn.execute(
            text(
                f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql "
                f"AS $$ BEGIN {body} RETURN NEW; END $$"
            )
        )
        await conn.execute(
            text(f"CREATE TRIGGER {name} {when} FOR EACH ROW EXECUTE FUNCTION {name}()")
        )
    try:
        yield
    finally:
        async with store.engine.begin() as conn:
            await conn.execute(text(f"DROP FUNCTION {name}() CASCADE"))
