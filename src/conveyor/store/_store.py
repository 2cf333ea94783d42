"""The :class:`Store`: one per process, owns the database engine and pools, exposes services."""

from __future__ import annotations

import asyncio
import logging
import time
from types import TracebackType
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.errors import DatabaseUnavailable
from conveyor.settings import Settings
from conveyor.store import _migrate
from conveyor.store._db import close_pg_pool, create_engine, create_pg_pool, dialect_of
from conveyor.store._errors import translate_errors
from conveyor.store.children import ChildService
from conveyor.store.events import EventService
from conveyor.store.executions import ExecutionService
from conveyor.store.insights import InsightService
from conveyor.store.limits import TenantLimitsService
from conveyor.store.partitions import PartitionService
from conveyor.store.pg import PgRunStore, PgStatements
from conveyor.store.retention import RetentionService
from conveyor.store.runs import RunStore
from conveyor.store.schedules import ScheduleService
from conveyor.store.secrets import SecretService
from conveyor.store.sql import SqlRunStore, SqlStatements
from conveyor.store.statements import Statements
from conveyor.store.tenants import ApiKeyService, TenantService
from conveyor.store.timers import TimerService
from conveyor.store.usage import StorageService
from conveyor.store.workflows import DefinitionCache, WorkflowService

log = logging.getLogger(__name__)

__all__ = ["Store", "migrate"]


class Store:
    """Conveyor's database: ``async with Store(settings) as store: ...``.

    Opening creates the engine and pools (connections open on first use); it does not check
    the schema — processes call :meth:`check_schema` right after, ``conveyor migrate`` calls
    :meth:`migrate`. Services: :attr:`tenants`, :attr:`api_keys`, :attr:`workflows`,
    :attr:`executions`, :attr:`schedules`, :attr:`timers`, :attr:`insights` (operators'
    cross-tenant reads), :attr:`retention` (overrides and pruning), :attr:`limits` (per-tenant
    execution limits), :attr:`storage` (rows and bytes per table), :attr:`secrets` (tenants'
    encrypted secrets), :attr:`events` (``wait`` steps' events); the engine's hot path:
    :attr:`runs`.

    The drivers are chosen here, once: on Postgres the engine's hot path (:attr:`runs`) and
    the API's hottest statements (API key lookup, trigger, get) run on a raw asyncpg pool
    (:mod:`conveyor.store.pg`), everything else on SQLAlchemy Core (asyncpg driver). Each pool
    opens connections on demand, up to ``DATABASE_POOL_SIZE``. ``fast_path=False`` uses
    SQLAlchemy Core for everything (:mod:`conveyor.store.sql`; the benchmark baseline); SQLite
    always does.
    """

    engine: AsyncEngine
    runs: RunStore
    tenants: TenantService
    api_keys: ApiKeyService
    workflows: WorkflowService
    executions: ExecutionService
    schedules: ScheduleService
    timers: TimerService
    insights: InsightService
    retention: RetentionService
    limits: TenantLimitsService
    storage: StorageService
    partitions: PartitionService
    secrets: SecretService
    events: EventService
    children: ChildService

    def __init__(
        self, settings: Settings, *, pool_size: int | None = None, fast_path: bool = True
    ) -> None:
        self.settings = settings
        self.dialect = dialect_of(settings.database_url)
        self.definitions = DefinitionCache(settings.workflow_cache_size)
        self._pool_size = pool_size
        self._fast_path = fast_path
        self._pg_pool: Any = None

    @property
    def is_postgres(self) -> bool:
        return self.dialect == "postgresql"

    async def __aenter__(self) -> Store:
        self.engine = create_engine(self.settings, pool_size=self._pool_size)
        if self.is_postgres and self._fast_path:
            try:
                self._pg_pool = await create_pg_pool(self.settings, pool_size=self._pool_size)
            except BaseException:
                await self.engine.dispose()
                raise
            self.runs = PgRunStore(self._pg_pool)
            statements: Statements = PgStatements(self._pg_pool)
        else:
            self.runs = SqlRunStore(self.engine)
            statements = SqlStatements(self.engine)
        self.statements = statements
        s, engine = self.settings, self.engine
        self.tenants = TenantService(engine, s, statements)
        self.api_keys = ApiKeyService(engine, s, statements)
        self.workflows = WorkflowService(engine, s, statements, self.definitions)
        self.executions = ExecutionService(engine, s, statements, self.workflows)
        self.schedules = ScheduleService(engine, s, statements)
        self.timers = TimerService(engine, s, statements)
        self.insights = InsightService(engine, s, statements)
        self.retention = RetentionService(engine, s, statements)
        self.limits = TenantLimitsService(engine, s, statements)
        self.storage = StorageService(engine, s, statements)
        self.partitions = PartitionService(engine, s, statements)
        self.secrets = SecretService(engine, s, statements)
        self.events = EventService(engine, s, statements)
        self.children = ChildService(engine, s, statements, self.workflows, self.events)
        self.executions.children = self.children
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        pool, self._pg_pool = self._pg_pool, None
        try:
            if pool is not None:
                await close_pg_pool(pool)
        finally:
            await self.engine.dispose()

    async def check_schema(self) -> None:
        """Raise ``SchemaOutOfDate`` ("run `conveyor migrate`") unless the schema is current;
        ``DatabaseUnavailable`` if the database cannot be reached."""
        with translate_errors():
            await _migrate.check_schema(self.engine)

    async def migrate(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Apply pending migrations; returns (revisions before, after)."""
        with translate_errors():
            return await _migrate.upgrade(self.engine)

    async def ping(self, timeout_s: float = 2.0) -> float:
        """Round-trip latency in ms of ``SELECT 1``; raises DatabaseUnavailable."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(timeout_s):
                with translate_errors():
                    async with self.engine.connect() as conn:
                        await conn.execute(text("SELECT 1"))
        except TimeoutError as exc:
            raise DatabaseUnavailable(f"database did not answer within {timeout_s}s") from exc
        return (time.perf_counter() - started) * 1000.0


async def migrate(settings: Settings) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Bring the schema of ``settings.database_url`` up to date (``conveyor migrate``)."""
    async with Store(settings, pool_size=1, fast_path=False) as store:
        return await store.migrate()
