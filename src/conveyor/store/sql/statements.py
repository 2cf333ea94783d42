"""The hot per-request statements on SQLAlchemy Core (SQLite; the Postgres baseline).

The trigger is two statements in one transaction here (the workflow check, then the insert);
its contract is :meth:`conveyor.store.statements.Statements.trigger`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, bindparam, exists, literal, or_, select, text, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.store._db import autocommit
from conveyor.store._errors import translate_errors
from conveyor.store.records import EXECUTION_COLUMNS, STEP_RUN_COLUMNS, Execution, StepRun
from conveyor.store.schema import (
    TERMINAL_STATUSES,
    api_keys,
    event_waits,
    events,
    executions,
    step_runs,
    workflows,
)
from conveyor.store.statements import TriggerRequest
from conveyor.store.triggers import insert_values, new_execution

__all__ = ["SqlStatements"]

_API_KEY = select(
    api_keys.c.id,
    api_keys.c.tenant_id,
    api_keys.c.name,
    api_keys.c.prefix,
    api_keys.c.created_at,
    api_keys.c.revoked_at,
    api_keys.c.key_hash,
).where(api_keys.c.prefix == bindparam("prefix"))
_TRIGGER_TARGET = select(
    workflows.c.current_version, workflows.c.region, workflows.c.enabled
).where(
    workflows.c.tenant_id == bindparam("tid"),
    workflows.c.id == bindparam("wid"),
    workflows.c.deleted_at.is_(None),
)


_EXECUTION = select(*(executions.c[name] for name in EXECUTION_COLUMNS))
"""The columns of an :class:`Execution` in field order: ``Execution(*row)``."""
_STEPS = (
    select(*(step_runs.c[name] for name in STEP_RUN_COLUMNS))
    .where(step_runs.c.tenant_id == bindparam("tid"), step_runs.c.execution_id == bindparam("eid"))
    .order_by(step_runs.c.seq)
)


class SqlStatements:
    """:class:`~conveyor.store.statements.Statements` on SQLAlchemy Core."""

    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._autocommit = autocommit(engine)
        dialect = postgresql if engine.dialect.name == "postgresql" else sqlite
        self._insert = dialect.insert

    async def _first(self, statement: Any, params: Mapping[str, Any] | None = None) -> Any:
        with translate_errors():
            async with self._autocommit.connect() as conn:
                return (await conn.execute(statement, params or {})).mappings().first()

    async def api_key(self, prefix: str) -> Mapping[str, Any] | None:
        row: Mapping[str, Any] | None = await self._first(_API_KEY, {"prefix": prefix})
        return row

    async def trigger_target(self, tenant_id: str, workflow_id: str) -> Mapping[str, Any] | None:
        row: Mapping[str, Any] | None = await self._first(
            _TRIGGER_TARGET, {"tid": tenant_id, "wid": workflow_id}
        )
        return row

    def _insert_statement(self, execution: Execution) -> Any:
        statement = self._insert(executions).values(insert_values(execution))
        if self._engine.dialect.name != "postgresql":  # PostgreSQL: the key trigger (0013)
            statement = statement.on_conflict_do_nothing(
                index_elements=["tenant_id", "idempotency_key"],
                index_where=executions.c.idempotency_key.is_not(None),
            )
        return statement.returning(executions.c.id)

    async def trigger(
        self,
        execution_id: str,
        tenant_id: str,
        workflow_id: str,
        version: int,
        *,
        triggered_by: str,
        input: Any,
        input_json: str | None,
        idempotency_key: str | None,
        now: datetime,
    ) -> Mapping[str, Any] | None:
        with translate_errors():
            async with self._engine.begin() as conn:
                params = {"tid": tenant_id, "wid": workflow_id}
                found = (await conn.execute(_TRIGGER_TARGET, params)).mappings().first()
                if found is None:
                    return None
                row = dict(found)
                row["inserted"] = False
                if row["enabled"] and int(row["current_version"]) == version:
                    execution = new_execution(
                        tenant_id=tenant_id,
                        workflow_id=workflow_id,
                        version=version,
                        region=str(row["region"]),
                        input=input,
                        triggered_by=triggered_by,
                        now=now,
                        idempotency_key=idempotency_key,
                        execution_id=execution_id,
                    )
                    inserted = await conn.execute(self._insert_statement(execution))
                    row["inserted"] = inserted.first() is not None
                return row

    async def trigger_many(
        self, requests: Sequence[TriggerRequest]
    ) -> list[Mapping[str, Any] | None]:
        """:meth:`trigger` for each of ``requests`` in ONE transaction (one commit)."""
        answers: list[Mapping[str, Any] | None] = []
        with translate_errors():
            async with self._engine.begin() as conn:
                targets: dict[tuple[str, str], Mapping[str, Any] | None] = {}
                for r in requests:
                    target = (r.tenant_id, r.workflow_id)
                    if target not in targets:
                        params = {"tid": r.tenant_id, "wid": r.workflow_id}
                        found = (await conn.execute(_TRIGGER_TARGET, params)).mappings().first()
                        targets[target] = None if found is None else dict(found)
                    workflow = targets[target]
                    if workflow is None:
                        answers.append(None)
                        continue
                    row = dict(workflow)
                    row["inserted"] = False
                    if row["enabled"] and int(row["current_version"]) == r.version:
                        execution = new_execution(
                            tenant_id=r.tenant_id,
                            workflow_id=r.workflow_id,
                            version=r.version,
                            region=str(row["region"]),
                            input=r.input,
                            triggered_by=r.triggered_by,
                            now=r.now,
                            idempotency_key=r.idempotency_key,
                            execution_id=r.execution_id,
                        )
                        inserted = await conn.execute(self._insert_statement(execution))
                        row["inserted"] = inserted.first() is not None
                    answers.append(row)
        return answers

    async def insert_execution(self, execution: Execution) -> bool:
        with translate_errors():
            async with self._autocommit.connect() as conn:
                return (await conn.execute(self._insert_statement(execution))).first() is not None

    async def child_end(
        self,
        tenant_id: str,
        execution_id: str,
        *,
        event_id: str,
        name: str,
        payload: Any,
        now: datetime,
        idempotency_key: str,
        lock_key: str,
    ) -> tuple[bool, Execution | None]:
        """The lock (PostgreSQL; SQLite's ``BEGIN IMMEDIATE`` serialises writers anyway),
        the insert, the wake: three statements in one transaction."""
        x, e = executions.c, events.c
        stored = (
            self._insert(events)
            .from_select(
                ["id", "tenant_id", "workflow_id", "execution_id", "name", "payload", "source",
                 "received_at", "idempotency_key"],
                select(
                    literal(event_id, e.id.type), x.tenant_id, x.workflow_id, x.id,
                    literal(name, e.name.type), literal(payload, e.payload.type),
                    literal("workflow", e.source.type), literal(now, e.received_at.type),
                    literal(idempotency_key, e.idempotency_key.type),
                ).where(
                    x.id == execution_id, x.tenant_id == tenant_id,
                    x.status.not_in(TERMINAL_STATUSES),
                ),
            )
            .on_conflict_do_nothing()
            .returning(e.id)
        )  # fmt: skip
        parked = exists().where(
            event_waits.c.execution_id == execution_id, event_waits.c.name == name
        )
        wake = (
            update(executions)
            .where(x.id == execution_id, x.tenant_id == tenant_id, x.status == "waiting", parked)
            .values(wake_at=now)
            .returning(*_EXECUTION.selected_columns)
        )
        with translate_errors():
            async with self._engine.begin() as conn:
                if self._engine.dialect.name == "postgresql":
                    lock = text("SELECT pg_advisory_xact_lock(hashtext(:key))")
                    await conn.execute(lock, {"key": lock_key})
                if (await conn.execute(stored)).scalar() is None:
                    return False, None
                row = (await conn.execute(wake)).first()
        return True, None if row is None else Execution(*row)

    async def execution(self, tenant_id: str, execution_id: str) -> Execution | None:
        return await self._one(executions.c.id == execution_id, tenant_id)

    async def execution_by_key(self, tenant_id: str, key: str) -> Execution | None:
        return await self._one(executions.c.idempotency_key == key, tenant_id)

    async def execution_with_steps(self, tenant_id: str, execution_id: str) -> Execution | None:
        statement = _EXECUTION.where(
            executions.c.tenant_id == tenant_id, executions.c.id == execution_id
        )
        with translate_errors():
            async with self._autocommit.connect() as conn:
                row = (await conn.execute(statement)).first()
                if row is None:
                    return None
                steps = (await conn.execute(_STEPS, {"tid": tenant_id, "eid": execution_id})).all()
        values: list[Any] = [*row, tuple(StepRun(*r) for r in steps)]  # steps: the last field
        return Execution(*values)

    async def execution_page(
        self,
        tenant_id: str,
        *,
        statuses: Sequence[str] | None,
        workflow_id: str | None,
        limit: int,
        after: tuple[datetime, str] | None,
    ) -> tuple[list[Execution], bool]:
        query = _EXECUTION.where(executions.c.tenant_id == tenant_id)
        if statuses:
            query = query.where(
                executions.c.status == statuses[0]
                if len(statuses) == 1
                else executions.c.status.in_(list(statuses))
            )
        if workflow_id is not None:
            query = query.where(executions.c.workflow_id == workflow_id)
        if after is not None:
            at, row_id = after
            created, ident = executions.c.created_at, executions.c.id
            query = query.where(and_(created <= at, or_(created < at, ident < row_id)))
        query = query.order_by(executions.c.created_at.desc(), executions.c.id.desc())
        with translate_errors():
            async with self._autocommit.connect() as conn:
                rows = (await conn.execute(query.limit(limit + 1))).all()
        return [Execution(*r) for r in rows[:limit]], len(rows) > limit

    async def executions_by_keys(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], Execution]:
        pairs = tuple_(executions.c.tenant_id, executions.c.idempotency_key)
        statement = select(executions).where(pairs.in_(list(keys)))
        with translate_errors():
            async with self._autocommit.connect() as conn:
                rows = (await conn.execute(statement)).all()
        found = (Execution.from_mapping(row._mapping) for row in rows)
        return {(e.tenant_id, str(e.idempotency_key)): e for e in found}

    async def _one(self, condition: Any, tenant_id: str) -> Execution | None:
        statement = select(executions).where(executions.c.tenant_id == tenant_id, condition)
        with translate_errors():
            async with self._autocommit.connect() as conn:
                row = (await conn.execute(statement)).first()
        return None if row is None else Execution.from_mapping(row._mapping)
