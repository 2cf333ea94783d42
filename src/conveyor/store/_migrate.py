"""Running the Alembic migrations shipped inside the package, and checking the schema version.

``conveyor migrate`` calls :func:`upgrade`; every other process calls :func:`check_schema`
(through :meth:`conveyor.store.Store.check_schema`) and refuses to start unless the database is
exactly at the head revision of the migrations this code ships.

Only :func:`upgrade` imports Alembic. The check reads the revision graph from the migration
files' ``revision``/``down_revision`` assignments (parsed, not imported) and the database's
``alembic_version`` table: Alembic and Mako cost every worker process ~9 MB of memory for a
check made once at start-up (``tests/store/test_migrations.py`` checks that the graph read
here is Alembic's).
"""

from __future__ import annotations

import ast
import logging
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import inspect, text
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.errors import SchemaOutOfDate

if TYPE_CHECKING:
    from alembic.config import Config

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
VERSION_TABLE = "alembic_version"
_MIGRATE_LOCK = 7_318_204_511  # pg_advisory_xact_lock key: one `conveyor migrate` at a time


def alembic_config() -> Config:
    """An Alembic config pointing at the packaged migrations (no ini file needed)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


@lru_cache(maxsize=1)
def revision_graph() -> dict[str, tuple[str, ...]]:
    """Each shipped revision and the revision(s) it revises, read from the migration files."""
    graph: dict[str, tuple[str, ...]] = {}
    for path in sorted((MIGRATIONS_DIR / "versions").glob("*.py")):
        found = _assignments(ast.parse(path.read_text(encoding="utf-8"), str(path)))
        revision = found.get("revision")
        if not isinstance(revision, str):
            continue  # not a revision file (Alembic skips it too)
        down = found.get("down_revision")
        if isinstance(down, str):
            graph[revision] = (down,)
        else:
            assert down is None or isinstance(down, (tuple, list)), path
            graph[revision] = tuple(str(d) for d in down or ())
    return graph


def _assignments(module: ast.Module) -> dict[str, object]:
    """``revision``/``down_revision`` as assigned at a module's top level (literals only)."""
    found: dict[str, object] = {}
    for node in module.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id in ("revision", "down_revision"):
            found[target.id] = ast.literal_eval(value)
    return found


@lru_cache(maxsize=1)
def head_revisions() -> tuple[str, ...]:
    """The head revision(s) of the migrations this code ships (revised by no other)."""
    graph = revision_graph()
    revised = {down for downs in graph.values() for down in downs}
    return tuple(sorted(rev for rev in graph if rev not in revised))


def _current(connection: Connection) -> tuple[str, ...]:
    """What Alembic's ``get_current_heads`` reads: the version table's rows, if it exists."""
    if not inspect(connection).has_table(VERSION_TABLE):
        return ()
    rows = connection.execute(text(f"SELECT version_num FROM {VERSION_TABLE}"))
    return tuple(sorted(str(row[0]) for row in rows))


async def current_revisions(engine: AsyncEngine) -> tuple[str, ...]:
    """The revision(s) the database is at (empty for a database never migrated)."""
    async with engine.connect() as connection:
        return await connection.run_sync(_current)


def _upgrade(connection: Connection) -> tuple[tuple[str, ...], tuple[str, ...]]:
    from alembic import command

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


def _all_revisions() -> tuple[str, ...]:
    return tuple(revision_graph())
