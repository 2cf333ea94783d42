"""The hot per-request statements (API key check, trigger, execution by id or key), behind one
interface with two implementations chosen once when the :class:`~conveyor.store.Store` opens:

* :class:`~conveyor.store.sql.SqlStatements` — SQLAlchemy Core (SQLite; the Postgres baseline);
* :class:`~conveyor.store.pg.PgStatements` — prepared statements on the raw asyncpg pool, where
  the trigger is ONE round trip (workflow check and insert in one statement).

The services call them without knowing which is in use.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

from conveyor.store.records import Execution

__all__ = ["Statements", "TriggerRequest"]


@dataclass(frozen=True, slots=True)
class TriggerRequest:
    """The arguments of one :meth:`Statements.trigger` (an item of :meth:`Statements.
    trigger_many`)."""

    execution_id: str
    tenant_id: str
    workflow_id: str
    version: int
    triggered_by: str
    input: Any
    input_json: str | None
    idempotency_key: str | None
    now: datetime


class Statements(Protocol):
    async def api_key(self, prefix: str) -> Mapping[str, Any] | None:
        """The API key row with ``prefix`` (``id, tenant_id, name, prefix, created_at,
        revoked_at, key_hash``), revoked or not; ``None`` if there is none."""
        ...

    async def trigger_target(self, tenant_id: str, workflow_id: str) -> Mapping[str, Any] | None:
        """``current_version, region, enabled`` of the tenant's live workflow, or ``None``."""
        ...

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
        """Insert a ``queued`` execution of ``version`` only if the workflow is live, enabled
        and still at ``version`` (an idempotency key already used inserts nothing). Returns the
        workflow's ``current_version, region, enabled`` and whether the row was ``inserted``;
        ``None`` when the tenant has no such live workflow."""
        ...

    async def trigger_many(
        self, requests: Sequence[TriggerRequest]
    ) -> Sequence[Mapping[str, Any] | None]:
        """:meth:`trigger` for each of ``requests`` in ONE transaction (one commit; ONE
        statement on Postgres), one answer per request, in order. Requests sharing an
        idempotency key (of one tenant) insert one row: one of them answers
        ``inserted``, the others not (they read the row by key, as a replay). A database error
        stores nothing of the batch."""
        ...

    async def insert_execution(self, execution: Execution) -> bool:
        """Insert; False when its idempotency key was already used (nothing inserted)."""
        ...

    async def execution(self, tenant_id: str, execution_id: str) -> Execution | None: ...

    async def execution_with_steps(self, tenant_id: str, execution_id: str) -> Execution | None:
        """The execution with its step runs (``steps``, in ``seq`` order); ``None`` if the
        tenant has no such execution."""
        ...

    async def execution_page(
        self,
        tenant_id: str,
        *,
        statuses: Sequence[str] | None,
        workflow_id: str | None,
        limit: int,
        after: tuple[datetime, str] | None,
    ) -> tuple[list[Execution], bool]:
        """The tenant's executions newest first (``created_at DESC, id DESC``), filtered by
        ``statuses`` (any of) and ``workflow_id``, strictly after ``after`` (a cursor's
        ``(created_at, id)``): at most ``limit`` of them, and whether more follow."""
        ...

    async def execution_by_key(self, tenant_id: str, key: str) -> Execution | None: ...

    async def executions_by_keys(
        self, keys: Sequence[tuple[str, str]]
    ) -> dict[tuple[str, str], Execution]:
        """The executions with these ``(tenant_id, idempotency_key)`` pairs, in ONE statement,
        by pair (pairs with no execution are absent)."""
        ...

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
        """Store the event ``event_id`` (``name``, ``payload``, source ``workflow``) for the
        parent ``execution_id`` of ``tenant_id`` — only if it has not finished and the key is
        new — and make the parent due if it is parked on a wait for ``name``; in ONE
        transaction that first takes the advisory lock ``lock_key`` (the park's, so that one
        of the two sees the other). Returns whether the event was stored and the parent's row
        when it was woken."""
        ...
