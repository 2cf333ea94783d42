"""Migrations: they build exactly the declared schema; out-of-date schemas are refused;
``conveyor migrate`` works as a command (subprocess) and is idempotent; 0002 rewrites six-field
cron expressions seconds first (and back on downgrade) and adds ``executions.scheduled_for``."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect, select, text
from sqlalchemy.engine import Connection

import conveyor.store.migrations
from conveyor.cron import next_fire, parse_cron
from conveyor.errors import SchemaOutOfDate
from conveyor.settings import load_settings
from conveyor.store import Store, TenantLimits, head_revisions
from conveyor.store.partitions import include_name, include_object
from conveyor.store.schema import (
    executions,
    metadata,
    schedules,
    step_runs,
    tenants,
    workflows,
)
from tests.helpers import env_for


def _diff(connection: Connection) -> list[object]:
    opts = {"compare_type": True, "include_name": include_name, "include_object": include_object}
    context = MigrationContext.configure(connection, opts=opts)
    diff = list(compare_metadata(context, metadata))
    if connection.dialect.name == "postgresql":  # partitioned: the key index is not unique
        changed = [d for d in diff if getattr(d[1], "name", None) == "uq_executions_idempotency"]
        assert [(kind, index.unique) for kind, index in changed] == [
            ("remove_index", False),
            ("add_index", True),
        ]
        diff = [d for d in diff if d not in changed]
    return diff


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
    assert head_revisions() == ("0014",)
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


MIGRATIONS = Path(conveyor.store.migrations.__file__).resolve().parent
T0 = datetime(2025, 1, 1, tzinfo=UTC)
# (as stored before 0002, as stored after): only six-field expressions move their seconds.
CRONS = [
    ("* * * * * */10", "*/10 * * * * *"),
    ("*/5 * * * * 30", "30 */5 * * * *"),
    ("  0  9 * *  1-5   15 ", "15 0 9 * * 1-5"),
    ("* * * * * *", "* * * * * *"),
    ("0 9 * * 1-5", "0 9 * * 1-5"),
    ("@hourly", "@hourly"),
]


def _alembic(connection: Connection, action: str, revision: str) -> None:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    getattr(command, action)(config, revision)


async def _at(store: Store, action: str, revision: str) -> None:
    async with store.engine.begin() as conn:
        await conn.run_sync(_alembic, action, revision)


def _columns(connection: Connection, table: str) -> set[str]:
    return {c["name"] for c in inspect(connection).get_columns(table)}


async def _seed_0001(store: Store) -> list[str]:
    """A tenant, a workflow, an execution and one schedule per ``CRONS`` (0001's columns)."""
    ids = [f"s{i}" for i in range(len(CRONS))]
    async with store.engine.begin() as conn:
        await conn.execute(tenants.insert().values(id="t", name="t", created_at=T0))
        await conn.execute(workflows.insert().values(
            id="w", tenant_id="t", name="w", region="us", current_version=1, created_at=T0,
            updated_at=T0))  # fmt: skip
        await conn.execute(executions.insert().values(
            id="e", tenant_id="t", workflow_id="w", workflow_version=1, status="queued",
            region="us", triggered_by="api", created_at=T0, queued_at=T0, updated_at=T0))  # fmt: skip
        await conn.execute(schedules.insert(), [
            dict(id=sid, tenant_id="t", workflow_id="w", cron=old, timezone="UTC",
                 next_fire_at=T0, created_at=T0, updated_at=T0)
            for sid, (old, _new) in zip(ids, CRONS, strict=True)
        ])  # fmt: skip
    return ids


async def _crons(store: Store) -> list[str]:
    async with store.engine.connect() as conn:
        rows = (await conn.execute(select(schedules.c.cron).order_by(schedules.c.id))).all()
    return [r.cron for r in rows]


async def _assert_0002_reorders_cron(url: str) -> None:
    async with Store(load_settings({}, database_url=url), pool_size=1) as store:
        await _at(store, "upgrade", "0001")
        with pytest.raises(SchemaOutOfDate, match="revision 0001, expected 0014"):
            await store.check_schema()
        await _seed_0001(store)

        await store.migrate()  # 0001 -> head, as `conveyor migrate` does
        await store.check_schema()  # the new head is accepted
        assert await _crons(store) == [new for _old, new in CRONS]
        for old, new in CRONS:  # the same instants as croniter read the old expression
            assert next_fire(parse_cron(new), T0) == _croniter_next(old), (old, new)
        execution = await store.executions.get("t", "e")
        assert execution.scheduled_for is None

        await _at(store, "downgrade", "0001")
        assert await _crons(store) == [" ".join(old.split()) for old, _new in CRONS]
        async with store.engine.connect() as conn:
            columns = await conn.run_sync(_columns, "executions")
        assert "scheduled_for" not in columns and "updated_at" in columns
        async with store.engine.connect() as conn:  # step runs etc. untouched: the row is kept
            assert (await conn.execute(text("SELECT count(*) FROM executions"))).scalar() == 1
        await store.migrate()
        assert await _crons(store) == [new for _old, new in CRONS]


def _croniter_next(expression: str) -> datetime:
    """Croniter's own reading (seconds last) of a pre-0002 expression."""
    from croniter import croniter

    expression = {"@hourly": "0 * * * *"}.get(expression, expression)
    naive: datetime = croniter(expression, T0.replace(tzinfo=None)).get_next(datetime)
    return naive.replace(tzinfo=UTC)


async def test_0002_reorders_six_field_cron_sqlite(tmp_path: Path) -> None:
    await _assert_0002_reorders_cron(f"sqlite:///{tmp_path}/upgrade.db")


async def test_0002_reorders_six_field_cron_postgres(fresh_pg_url: str) -> None:
    await _assert_0002_reorders_cron(fresh_pg_url)


async def _assert_0003_adds_tick_outcome(url: str) -> None:
    async with Store(load_settings({}, database_url=url), pool_size=1) as store:
        await _at(store, "upgrade", "0002")
        await _seed_0001(store)
        async with store.engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO schedule_ticks (schedule_id, fire_time, tenant_id, created_at) "
                    "SELECT id, :at, tenant_id, :at FROM schedules"
                ),
                {"at": T0},
            )
        await store.migrate()
        await store.check_schema()
        async with store.engine.connect() as conn:
            outcomes = (await conn.execute(text("SELECT outcome FROM schedule_ticks"))).all()
        assert outcomes and {o for (o,) in outcomes} == {"fired"}  # existing ticks fired
        await _at(store, "downgrade", "0002")
        async with store.engine.connect() as conn:
            columns = await conn.run_sync(_columns, "schedule_ticks")
        assert "outcome" not in columns and "fire_time" in columns
        await store.migrate()


async def test_0003_adds_tick_outcome_sqlite(tmp_path: Path) -> None:
    await _assert_0003_adds_tick_outcome(f"sqlite:///{tmp_path}/upgrade.db")


async def test_0003_adds_tick_outcome_postgres(fresh_pg_url: str) -> None:
    await _assert_0003_adds_tick_outcome(fresh_pg_url)


def _index_names(connection: Connection, table: str) -> set[str]:
    return {str(i["name"]) for i in inspect(connection).get_indexes(table)}


async def test_0004_keeps_console_indexes_created_by_hand(fresh_pg_url: str) -> None:
    """On a large table operators build 0004's indexes CONCURRENTLY before migrating (as its
    docstring says); the migration then keeps them, and downgrades drop them."""
    async with Store(load_settings({}, database_url=fresh_pg_url), pool_size=1) as store:
        await _at(store, "upgrade", "0003")
        async with store.engine.connect() as conn:
            autocommit = await conn.execution_options(isolation_level="AUTOCOMMIT")
            await autocommit.execute(
                text(
                    "CREATE INDEX CONCURRENTLY ix_executions_created ON executions (created_at, id)"
                )
            )
        await store.migrate()
        await store.check_schema()
        async with store.engine.connect() as conn:
            names = await conn.run_sync(_index_names, "executions")
        assert {"ix_executions_created", "ix_executions_status_created"} <= names
        await _at(store, "downgrade", "0003")
        async with store.engine.connect() as conn:
            names = await conn.run_sync(_index_names, "executions")
        assert not {"ix_executions_created", "ix_executions_status_created"} & names


async def _assert_0005_adds_retention(url: str) -> None:
    async with Store(load_settings({}, database_url=url), pool_size=1) as store:
        await _at(store, "upgrade", "0004")
        await _seed_0001(store)
        await store.migrate()
        await store.check_schema()
        async with store.engine.connect() as conn:
            row = (
                await conn.execute(
                    text("SELECT retention_s, retention_max_executions FROM tenants")
                )
            ).one()
            indexes = await conn.run_sync(
                lambda c: {i["name"] for i in inspect(c).get_indexes("executions")}
            )
        assert tuple(row) == (None, None)  # existing tenants follow the settings
        assert "ix_executions_tenant_finished" in indexes
        assert (await store.executions.get("t", "e")).status == "queued"  # rows kept
        await _at(store, "downgrade", "0004")
        async with store.engine.connect() as conn:
            columns = await conn.run_sync(_columns, "tenants")
        assert "retention_s" not in columns and "name" in columns
        await store.migrate()


async def test_0005_adds_retention_sqlite(tmp_path: Path) -> None:
    await _assert_0005_adds_retention(f"sqlite:///{tmp_path}/upgrade.db")


async def test_0005_adds_retention_postgres(fresh_pg_url: str) -> None:
    await _assert_0005_adds_retention(fresh_pg_url)


async def _assert_0006_adds_reused_from(url: str) -> None:
    async with Store(load_settings({}, database_url=url), pool_size=1) as store:
        await _at(store, "upgrade", "0005")
        await _seed_0001(store)
        async with store.engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO step_runs (execution_id, seq, tenant_id, step_id, step_type, "
                    "status, attempts, output, output_truncated, started_at, finished_at) "
                    "VALUES ('e', 0, 't', 'a', 'noop', 'succeeded', 1, NULL, false, :at, :at)"
                ),
                {"at": T0},
            )
        await store.migrate()
        await store.check_schema()
        async with store.engine.connect() as conn:
            rows = (await conn.execute(select(step_runs.c.step_id, step_runs.c.reused_from))).all()
        assert [tuple(r) for r in rows] == [("a", None)]  # the step run kept; it ran
        (kept,) = (await store.executions.get("t", "e", with_steps=True)).steps
        assert (kept.step_id, kept.reused_from) == ("a", None)
        await _at(store, "downgrade", "0005")
        async with store.engine.connect() as conn:
            columns = await conn.run_sync(_columns, "step_runs")
            count = (await conn.execute(text("SELECT count(*) FROM step_runs"))).scalar()
        assert "reused_from" not in columns and "step_id" in columns and count == 1
        await store.migrate()


async def test_0006_adds_reused_from_sqlite(tmp_path: Path) -> None:
    await _assert_0006_adds_reused_from(f"sqlite:///{tmp_path}/upgrade.db")


async def test_0006_adds_reused_from_postgres(fresh_pg_url: str) -> None:
    await _assert_0006_adds_reused_from(fresh_pg_url)


async def _assert_0009_adds_step_attempts(url: str) -> None:
    async with Store(load_settings({}, database_url=url), pool_size=1) as store:
        await _at(store, "upgrade", "0008")
        await _seed_0001(store)
        await store.migrate()
        await store.check_schema()
        execution = await store.executions.get("t", "e")  # an existing row: no retry wait
        assert (execution.step_attempt, execution.step_errors) == (0, None)
        async with store.engine.connect() as conn:
            started = (
                await conn.execute(
                    select(executions.c.step_started_at).where(executions.c.id == "e")
                )
            ).scalar()
        assert started is None
        await _at(store, "downgrade", "0008")
        async with store.engine.connect() as conn:
            columns = await conn.run_sync(_columns, "executions")
            count = (await conn.execute(text("SELECT count(*) FROM executions"))).scalar()
        assert not {"step_attempt", "step_errors", "step_started_at"} & set(columns)
        assert "scheduled_for" in columns and count == 1
        await store.migrate()


async def test_0009_adds_step_attempts_sqlite(tmp_path: Path) -> None:
    await _assert_0009_adds_step_attempts(f"sqlite:///{tmp_path}/upgrade.db")


async def test_0009_adds_step_attempts_postgres(fresh_pg_url: str) -> None:
    await _assert_0009_adds_step_attempts(fresh_pg_url)


async def _assert_0008_adds_tenant_limits(url: str) -> None:
    async with Store(load_settings({}, database_url=url), pool_size=1) as store:
        await _at(store, "upgrade", "0007")
        await _seed_0001(store)
        await store.migrate()
        await store.check_schema()
        assert (await store.limits.get("t")).empty  # existing tenants follow the settings
        await store.limits.set(TenantLimits("t", concurrency=3, start_rate=0.5))
        assert await store.limits.all() == [TenantLimits("t", 3, 0.5, None)]
        await _at(store, "downgrade", "0007")
        async with store.engine.connect() as conn:
            names = await conn.run_sync(lambda c: set(inspect(c).get_table_names()))
        assert "tenant_limits" not in names and "tenants" in names
        await store.migrate()
        assert (await store.limits.get("t")).empty


async def test_0008_adds_tenant_limits_sqlite(tmp_path: Path) -> None:
    await _assert_0008_adds_tenant_limits(f"sqlite:///{tmp_path}/upgrade.db")


async def test_0008_adds_tenant_limits_postgres(fresh_pg_url: str) -> None:
    await _assert_0008_adds_tenant_limits(fresh_pg_url)


async def _assert_0011_adds_parents(url: str) -> None:
    async with Store(load_settings({}, database_url=url), pool_size=1) as store:
        await _at(store, "upgrade", "0010")
        await _seed_0001(store)
        await store.migrate()
        await store.check_schema()
        execution = await store.executions.get("t", "e")  # an existing row: a top-level one
        assert (execution.parent_execution_id, execution.parent_seq, execution.depth) == (
            None,
            None,
            0,
        )
        await _at(store, "downgrade", "0010")
        async with store.engine.connect() as conn:
            columns = await conn.run_sync(_columns, "executions")
            indexes = await conn.run_sync(
                lambda c: {i["name"] for i in inspect(c).get_indexes("executions")}
            )
            count = (await conn.execute(text("SELECT count(*) FROM executions"))).scalar()
        assert not {"parent_execution_id", "parent_seq", "depth"} & set(columns)
        assert "ix_executions_parent" not in indexes
        assert "step_attempt" in columns and count == 1
        await store.migrate()


async def test_0011_adds_parents_sqlite(tmp_path: Path) -> None:
    await _assert_0011_adds_parents(f"sqlite:///{tmp_path}/upgrade.db")


async def test_0011_adds_parents_postgres(fresh_pg_url: str) -> None:
    await _assert_0011_adds_parents(fresh_pg_url)


def test_revision_graph_is_alembics() -> None:
    """The graph :func:`check_schema` reads from the files (without importing Alembic) is the
    one Alembic builds: same revisions, same parents, same heads."""
    from alembic.script import ScriptDirectory

    from conveyor.store._migrate import alembic_config, revision_graph

    script = ScriptDirectory.from_config(alembic_config())
    alembics = {rev.revision: tuple(rev._all_down_revisions) for rev in script.walk_revisions()}
    assert revision_graph() == alembics
    assert head_revisions() == tuple(sorted(script.get_heads()))


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_current_revisions_read_like_alembic(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The version table read directly gives what Alembic's ``get_current_heads`` gives,
    before (no table: nothing) and after migrating."""
    if backend == "sqlite":
        url = f"sqlite:///{tmp_path}/revisions.db"
    else:
        url = request.getfixturevalue("fresh_pg_url")
    asyncio.run(_compare_current_revisions(url))


async def _compare_current_revisions(url: str) -> None:
    from conveyor.store._migrate import current_revisions

    async with Store(load_settings({}, database_url=url), pool_size=1) as store:
        seen = [await current_revisions(store.engine), await _alembic_heads(store)]
        await store.migrate()
        seen += [await current_revisions(store.engine), await _alembic_heads(store)]
    assert seen == [(), (), head_revisions(), head_revisions()]


async def _alembic_heads(store: Store) -> tuple[str, ...]:
    def heads(connection: Connection) -> tuple[str, ...]:
        return tuple(sorted(MigrationContext.configure(connection).get_current_heads()))

    async with store.engine.connect() as connection:
        return await connection.run_sync(heads)


def _step_run_keys(connection: Connection) -> list[str | None]:
    """The keys of ``step_runs`` to ``executions`` (PostgreSQL keeps one more per partition)."""
    keys = inspect(connection).get_foreign_keys("step_runs")
    return [fk["name"] for fk in keys if fk["referred_table"] == "executions"]


async def _step_runs_of(store: Store) -> list[tuple[str, int]]:
    async with store.engine.connect() as conn:
        rows = (await conn.execute(select(step_runs.c.execution_id, step_runs.c.seq))).all()
    return sorted((r.execution_id, r.seq) for r in rows)


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_0014_drops_the_step_runs_key_and_keeps_every_row(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """0014 drops step_runs -> executions (each step run is written with its execution's
    locked row and deleted before it); downgrade removes step runs without an execution and
    puts the key, and its cascade, back."""
    url = (
        f"sqlite:///{tmp_path}/c.db"
        if backend == "sqlite"
        else request.getfixturevalue("fresh_pg_url")
    )
    asyncio.run(_assert_0014(url))


async def _assert_0014(url: str) -> None:
    from tests.store import _retention_seed as seed

    async with Store(load_settings({}, database_url=url), pool_size=1) as store:
        await _at(store, "upgrade", "0013")
        owner = await seed.tenant(store, "acme", T0)
        eid = await seed.execution(store, owner, "succeeded", created=T0, finished=T0, steps=3)
        async with store.engine.connect() as conn:
            assert await conn.run_sync(_step_run_keys) == ["fk_step_runs_execution_id_executions"]

        await store.migrate()
        await store.check_schema()
        async with store.engine.connect() as conn:
            assert await conn.run_sync(_step_run_keys) == []
        assert await _step_runs_of(store) == [(eid, 0), (eid, 1), (eid, 2)]
        async with store.engine.begin() as conn:  # what the key used to refuse
            await conn.execute(step_runs.insert().values(
                execution_id="gone", seq=0, tenant_id=owner.id, step_id="a", step_type="noop",
                status="succeeded", attempts=1, started_at=T0, finished_at=T0))  # fmt: skip

        await _at(store, "downgrade", "0013")
        assert await _step_runs_of(store) == [(eid, 0), (eid, 1), (eid, 2)]
        async with store.engine.begin() as conn:
            assert await conn.run_sync(_step_run_keys) == ["fk_step_runs_execution_id_executions"]
            await conn.execute(executions.delete().where(executions.c.id == eid))
        assert await _step_runs_of(store) == []  # the cascade is back
