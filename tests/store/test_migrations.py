"""Migrations: they build exactly the declared schema; out-of-date schemas are refused;
``conveyor migrate`` works as a command (subprocess) and is idempotent."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import text
from sqlalchemy.engine import Connection

from conveyor.errors import SchemaOutOfDate
from conveyor.settings import load_settings
from conveyor.store import Store, head_revisions
from conveyor.store.schema import metadata
from tests.helpers import env_for


def _diff(connection: Connection) -> list[object]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, metadata))


async def test_migrations_match_the_declared_schema(store: Store) -> None:
    await store.check_schema()
    async with store.engine.connect() as conn:
        diff = await conn.run_sync(_diff)
    assert diff == []


async def _assert_refused(url: str) -> None:
    async with Store(load_settings({}, database_url=url), pool_size=1) as store:
        with pytest.raises(SchemaOutOfDate) as caught:
            await store.check_schema()
        assert "conveyor migrate" in str(caught.value)
        await store.migrate()
        await store.check_schema()
        # A revision this code does not know (a newer Conveyor migrated it during a rolling
        # upgrade): accepted with a warning, so the running release keeps working.
        async with store.engine.begin() as conn:
            await conn.execute(text("UPDATE alembic_version SET version_num = 'ffff'"))
        await store.check_schema()
        async with store.engine.begin() as conn:
            await conn.execute(text("DELETE FROM alembic_version"))
        with pytest.raises(SchemaOutOfDate, match="conveyor migrate"):
            await store.check_schema()


async def test_check_refuses_out_of_date_schema_sqlite(tmp_path: Path) -> None:
    await _assert_refused(f"sqlite:///{tmp_path}/fresh.db")


async def test_check_refuses_out_of_date_schema_postgres(fresh_pg_url: str) -> None:
    await _assert_refused(fresh_pg_url)


def _migrate(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "conveyor.cli.migrate", *args],
        env=env_for(DATABASE_URL=url),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_migrate_command(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path}/nested/dir/conveyor.db"  # parent dirs are created
    else:
        url = request.getfixturevalue("fresh_pg_url")
    before = _migrate(url, "--check")
    assert before.returncode == 1 and "conveyor migrate" in before.stderr
    for _ in range(2):  # idempotent
        done = _migrate(url)
        assert done.returncode == 0, done.stderr
    assert head_revisions() == ("0001",)
    asyncio.run(_check(url))


async def _check(url: str) -> None:
    async with Store(load_settings({}, database_url=url), pool_size=1) as store:
        await store.check_schema()


@pytest.mark.slow
def test_conveyor_cli_migrate(tmp_path: Path) -> None:
    """The ``conveyor migrate`` subcommand is registered in the CLI."""
    url = f"sqlite:///{tmp_path}/cli.db"
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from conveyor.cli import main; raise SystemExit(main())",
            "migrate",
        ],
        env=env_for(DATABASE_URL=url),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    unreachable = subprocess.run(
        [sys.executable, "-m", "conveyor.cli.migrate"],
        env=env_for(DATABASE_URL="postgresql://postgres@127.0.0.1:1/nope"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert unreachable.returncode == 1 and "database unavailable" in unreachable.stderr
