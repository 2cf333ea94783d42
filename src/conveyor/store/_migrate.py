"""Running the Alembic migrations shipped inside the package, and checking the schema version.

``conveyor migrate`` calls :func:`upgrade`; every other process calls :func:`check_schema`
(through :meth:`conveyor.store.Store.check_schema`) and refuses to start unless the database is
exactly at the head revision of the migrations this code ships.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.errors import SchemaOutOfDate

log = logging.getLogger(__name__)

__all__ = [
    "MIGRATIONS_DIR",
    "alembic_config",
    "check_schema",
    "current_revisions",
    "head_revisions",
    "upgrade",
]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
_MIGRATE_LOCK = 7_318_204_511  # pg_advisory_xact_lock key: one `conveyor migrate` at a time


def alembic_config() -> Config:
    """An Alembic config pointing at the packaged migrations (no ini file needed)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


@lru_cache(maxsize=1)
def head_revisions() -> tuple[str, ...]:
    """The head revision(s) of the migrations this code ships."""
    return tuple(sorted(ScriptDirectory.from_config(alembic_config()).get_heads()))


def _current(connection: Connection) -> tuple[str, ...]:
    return tuple(sorted(MigrationContext.configure(connection).get_current_heads()))


async def current_revisions(engine: AsyncEngine) -> tuple[str, ...]:
    """The revision(s) the database is at (empty for a database never migrated)."""
    async with engine.connect() as connection:
        return await connection.run_sync(_current)


def _upgrade(connection: Connection) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if connection.dialect.name == "postgresql":
        connection.execute(text(f"SELECT pg_advisory_xact_lock({_MIGRATE_LOCK})"))
    before = _current(connection)
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")
    return before, _current(connection)


async def upgrade(engine: AsyncEngine) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Apply every pending migration in one transaction; return (revisions before, after)."""
    async with engine.begin() as connection:
        before, after = await connection.run_sync(_upgrade)
    log.debug("store.migrated", extra={"from": ",".join(before) or None, "to": ",".join(after)})
    return before, after


async def check_schema(engine: AsyncEngine) -> None:
    """Raise :class:`SchemaOutOfDate` unless the database is at this code's head revision.

    A revision this code does not know was written by a *newer* Conveyor (a rolling upgrade
    migrated the database first). Migrations are expand-then-contract, so the running release
    keeps working against it: that is allowed, with a warning, so old pods that restart during
    the rollout are not stuck. A missing schema or an older known revision is refused.
    """
    current = await current_revisions(engine)
    heads = head_revisions()
    if current == heads:
        return
    known = set(_all_revisions())
    if current and not set(current) <= known:
        log.warning(
            "store.schema_newer_than_code",
            extra={"current": ",".join(current), "expected": ",".join(heads)},
        )
        return
    if not current:
        message = "database schema is missing: run `conveyor migrate`"
    else:
        message = (
            f"database schema is at revision {','.join(current)}, expected {','.join(heads)}: "
            "run `conveyor migrate`"
        )
    raise SchemaOutOfDate(message, current=list(current), expected=list(heads))


@lru_cache(maxsize=1)
def _all_revisions() -> tuple[str, ...]:
    script = ScriptDirectory.from_config(alembic_config())
    return tuple(rev.revision for rev in script.walk_revisions())
