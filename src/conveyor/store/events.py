"""Events for ``wait`` steps: stored, matched, delivered exactly once.

An event is sent to one execution (``POST /api/executions/{id}/events/{name}``,
:meth:`EventService.send`) or through a workflow's webhook with a correlation value
(:meth:`EventService.send_webhook`). It is stored first; then, if an execution is parked on
a ``wait`` step for that name (an ``event_waits`` row), the execution is made due
(``wake_at = now``) and the caller enqueues it. A webhook event goes to every execution of the
workflow parked on (name, correlation) — a copy addressed to each — or, when none is, it is
kept unaddressed for the first execution that waits on it.

The engine, at a ``wait`` step:

* :meth:`find` — the oldest unconsumed matching event: addressed to the execution, or (when
  the step has a correlation) an unaddressed one of its workflow with that correlation;
* :meth:`receive` — the step's fenced write (:func:`~conveyor.store.sql.runs.write_in`) and,
  in the same transaction, the event marked consumed by that step run
  (``consumed_at IS NULL`` compare-and-set: another execution that took it first makes the
  whole write roll back, and the engine looks again; a kept event becomes addressed to its
  receiver, so it goes with it at retention), the wait row deleted and its pending timeout
  timer cancelled. Exactly once:
  a stale runner's write is fenced off by the lease, a second consumer by the event row;
* :meth:`park` — no event: the fenced write that parks the execution (``waiting``, the
  cursor stays on the wait step, ``wake_at`` = the deadline, the timeout timer on the first
  park) with the wait row, and then a last look for a matching event in the same transaction;
  one found rolls it all back (the engine receives it instead).

Retention deletes an execution's events with it, and kept webhook events that nobody received
within the retention period (:meth:`prune_kept`).

No lost wake-up: a sender and a parker of the same execution serialise on a lock (Postgres:
a transaction-scoped advisory lock per execution, and one per (workflow, name, correlation)
taken first; SQLite: its single writer, each transaction writing before it reads), so either
the sender sees the wait row and wakes the execution, or the parker sees the event.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, exists, insert, or_, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql.elements import ColumnElement

from conveyor.errors import Conflict, LeaseLost, NotFound
from conveyor.store._base import ServiceBase
from conveyor.store._types import new_id
from conveyor.store.records import Execution
from conveyor.store.runs import Claim, ExecutionWrite, StepWrite, TimerWrite
from conveyor.store.schema import TERMINAL_STATUSES, event_waits, events, executions, timers
from conveyor.store.sql.runs import write_in

__all__ = ["Event", "EventService", "EventWait", "Sent"]

_E = events.c
_W = event_waits.c


@dataclass(frozen=True, slots=True)
class Event:
    id: str
    tenant_id: str
    workflow_id: str
    execution_id: str | None
    name: str
    correlation: str | None
    payload: Any
    source: str
    received_at: datetime
    consumed_at: datetime | None
    consumed_by: str | None
    consumed_seq: int | None
    idempotency_key: str | None = None

    @classmethod
    def from_mapping(cls, row: Any) -> Event:
        return cls(**{name: row[name] for name in cls.__slots__})


@dataclass(frozen=True, slots=True)
class EventWait:
    """The wait step an execution is parked on."""

    execution_id: str
    tenant_id: str
    workflow_id: str
    name: str
    correlation: str | None
    seq: int
    deadline: datetime | None
    created_at: datetime


@dataclass(frozen=True, slots=True)
class Sent:
    """A stored event and the executions it made due (to enqueue)."""

    event_id: str
    woken: tuple[str, ...]
    """The executions made due (parked on a wait for it), to enqueue."""
    regions: tuple[str, ...] = ()
    """Their regions (same order)."""
    replayed: Event | None = None
    """The event an earlier request with the same ``Idempotency-Key`` stored (nothing new)."""


class _Again(Exception):
    """Roll the transaction back: the engine looks at the events again."""


class EventService(ServiceBase):
    # --- senders ------------------------------------------------------------------------------

    async def send(
        self,
        tenant_id: str,
        execution_id: str,
        name: str,
        payload: Any,
        now: datetime,
        *,
        source: str = "api",
        idempotency_key: str | None = None,
    ) -> tuple[Sent, Execution]:
        """Store an event addressed to ``execution_id`` and wake the execution if it is parked
        on a wait for ``name``. ``NotFound`` for an execution that is not ``tenant_id``'s,
        ``Conflict`` for one that already finished. With ``idempotency_key``, a repeated
        request answers the event stored the first time (``Sent.replayed``); a key used for
        another event is a ``Conflict``."""
        async with self._auto() as conn:
            row = (
                await conn.execute(
                    select(executions).where(
                        executions.c.id == execution_id, executions.c.tenant_id == tenant_id
                    )
                )
            ).first()
        if row is None:
            raise NotFound("execution not found", execution_id=execution_id)
        execution = Execution.from_mapping(row._mapping)

        def same(event: Event) -> bool:
            return event.execution_id == execution_id and event.name == name

        if idempotency_key is not None:
            replay = await self._replay(tenant_id, idempotency_key, same)
            if replay is not None:
                return replay, execution
        if execution.status in TERMINAL_STATUSES:
            raise Conflict(
                f"execution is {execution.status}: it receives no more events",
                execution_id=execution_id,
                status=execution.status,
            )
        event_id = new_id()
        try:
            async with self._tx() as conn:
                await self._lock(conn, _execution_key(execution_id))
                await conn.execute(
                    insert(events).values(
                        id=event_id, tenant_id=tenant_id, workflow_id=execution.workflow_id,
                        execution_id=execution_id, name=name, payload=payload, source=source,
                        received_at=now, idempotency_key=idempotency_key,
                    )
                )  # fmt: skip
                region = await self._wake(conn, tenant_id, execution_id, name, now)
        except Conflict:  # the same key, concurrently
            if idempotency_key is None:
                raise
            replay = await self._replay(tenant_id, idempotency_key, same)
            if replay is None:
                raise
            return replay, execution
        if region is None:
            return Sent(event_id, ()), execution
        return Sent(event_id, (execution_id,), (region,)), execution

    async def send_child_end(
        self,
        tenant_id: str,
        execution_id: str,
        name: str,
        payload: Any,
        now: datetime,
        *,
        idempotency_key: str,
    ) -> tuple[Sent, Execution | None] | None:
        """:meth:`send` for the engine telling a parent that its child ended, in one
        transaction: the event is stored only if ``execution_id`` (``tenant_id``'s) has not
        finished and the key is new, and the parent is woken if it is parked on ``name``.
        ``None`` when nothing was stored (no such parent, finished, or told already: the key
        is the child's, so a repeat is the same event); else the event and, when woken, the
        parent's row (to enqueue)."""
        event_id = new_id()
        stored, parent = await self._statements.child_end(
            tenant_id, execution_id, event_id=event_id, name=name, payload=payload, now=now,
            idempotency_key=idempotency_key, lock_key=_execution_key(execution_id),
        )  # fmt: skip
        if not stored:
            return None
        if parent is None:
            return Sent(event_id, ()), None
        return Sent(event_id, (execution_id,), (parent.region,)), parent

    async def send_webhook(
        self,
        tenant_id: str,
        workflow_id: str,
        name: str,
        correlation: str,
        payload: Any,
        now: datetime,
        *,
        idempotency_key: str | None = None,
    ) -> Sent:
        """Deliver a webhook event to every execution of the workflow parked on a wait for
        (``name``, ``correlation``), or keep it for the first one that waits on it. With
        ``idempotency_key``: as :meth:`send`."""

        def same(event: Event) -> bool:
            return (event.workflow_id, event.name, event.correlation, event.source) == (
                workflow_id,
                name,
                correlation,
                "webhook",
            )

        if idempotency_key is not None:
            replay = await self._replay(tenant_id, idempotency_key, same)
            if replay is not None:
                return replay
        event_id = new_id()
        values = dict(
            tenant_id=tenant_id, workflow_id=workflow_id, name=name, correlation=correlation,
            payload=payload, source="webhook", received_at=now,
        )  # fmt: skip
        woken: list[str] = []
        regions: list[str] = []
        async with self._tx() as conn:
            await self._lock(conn, _correlation_key(tenant_id, workflow_id, name, correlation))
            await conn.execute(
                insert(events).values(
                    id=event_id, execution_id=None, idempotency_key=idempotency_key, **values
                )
            )
            waiting = (
                select(_W.execution_id)
                .join(executions, executions.c.id == _W.execution_id)
                .where(
                    _W.tenant_id == tenant_id,
                    _W.workflow_id == workflow_id,
                    _W.name == name,
                    _W.correlation == correlation,
                    executions.c.status == "waiting",
                )
                .order_by(_W.execution_id)
            )
            waiters = list((await conn.execute(waiting)).scalars())
            for index, execution_id in enumerate(waiters):
                await self._lock(conn, _execution_key(execution_id))
                if index == 0:
                    await conn.execute(
                        update(events).where(_E.id == event_id).values(execution_id=execution_id)
                    )
                else:
                    copy = dict(id=new_id(), execution_id=execution_id, **values)
                    await conn.execute(insert(events).values(**copy))
                region = await self._wake(conn, tenant_id, execution_id, name, now)
                if region is not None:
                    woken.append(execution_id)
                    regions.append(region)
        return Sent(event_id, tuple(woken), tuple(regions))

    async def _replay(self, tenant_id: str, key: str, same: Callable[[Event], bool]) -> Sent | None:
        """The answer to a repeated request (``None``: the key is new); ``Conflict`` when the
        key was used for another event."""
        async with self._auto() as conn:
            row = (
                await conn.execute(
                    select(events).where(_E.tenant_id == tenant_id, _E.idempotency_key == key)
                )
            ).first()
        if row is None:
            return None
        event = Event.from_mapping(row._mapping)
        if not same(event):
            raise Conflict("this Idempotency-Key was used for another event", idempotency_key=key)
        return Sent(event.id, (), (), replayed=event)

    async def _wake(
        self, conn: AsyncConnection, tenant_id: str, execution_id: str, name: str, now: datetime
    ) -> str | None:
        """Make the execution due if it is parked on a wait for ``name``: its region."""
        parked = exists().where(_W.execution_id == execution_id, _W.name == name)
        result = await conn.execute(
            update(executions)
            .where(
                executions.c.id == execution_id,
                executions.c.tenant_id == tenant_id,
                executions.c.status == "waiting",
                parked,
            )
            .values(wake_at=now)
            .returning(executions.c.region)
        )
        region = result.scalar()
        return None if region is None else str(region)

    async def _lock(self, conn: AsyncConnection, key: str) -> None:
        if self._dialect == "postgresql":
            await conn.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": key})

    # --- reads --------------------------------------------------------------------------------

    async def find(
        self,
        tenant_id: str,
        execution_id: str,
        workflow_id: str,
        name: str,
        correlation: str | None,
    ) -> Event | None:
        """The oldest unconsumed event a wait step of ``execution_id`` on ``name`` (with
        ``correlation``) receives."""
        query = (
            select(events)
            .where(_matching(tenant_id, execution_id, workflow_id, name, correlation))
            .order_by(_E.received_at, _E.id)
            .limit(1)
        )
        async with self._auto() as conn:
            row = (await conn.execute(query)).first()
        return None if row is None else Event.from_mapping(row._mapping)

    async def pending(self, tenant_id: str, execution_id: str, name: str) -> list[str]:
        """The ids of the unconsumed events named ``name`` addressed to ``execution_id`` (a
        fan-out step's children's ends: it consumes those it has seen with its next write)."""
        query = select(_E.id).where(_matching(tenant_id, execution_id, "", name, None))
        async with self._auto() as conn:
            return list((await conn.execute(query)).scalars())

    async def wait_of(self, execution_id: str) -> EventWait | None:
        """The wait step ``execution_id`` is parked on (or was, until it resumes)."""
        async with self._auto() as conn:
            row = (
                await conn.execute(select(event_waits).where(_W.execution_id == execution_id))
            ).first()
        return None if row is None else EventWait(**row._mapping)

    async def for_execution(self, tenant_id: str, execution_id: str) -> list[Event]:
        """Events addressed to (or consumed by) an execution, oldest first."""
        query = (
            select(events)
            .where(
                _E.tenant_id == tenant_id,
                or_(_E.execution_id == execution_id, _E.consumed_by == execution_id),
            )
            .order_by(_E.received_at, _E.id)
        )
        async with self._auto() as conn:
            rows = (await conn.execute(query)).all()
        return [Event.from_mapping(r._mapping) for r in rows]

    async def prune_kept(
        self,
        before: datetime,
        limit: int,
        *,
        tenant_id: str | None = None,
        exclude: Sequence[str] = (),
    ) -> int:
        """Delete up to ``limit`` kept webhook events (no execution received them) that
        arrived before ``before`` (of ``tenant_id``, or of every tenant but ``exclude``);
        returns how many. Retention's: an event received meanwhile is not deleted."""
        where = and_(_E.execution_id.is_(None), _E.received_at < before)
        if tenant_id is not None:
            where = and_(where, _E.tenant_id == tenant_id)
        if exclude:
            where = and_(where, _E.tenant_id.not_in(list(exclude)))
        pick = select(_E.id).where(where).order_by(_E.received_at).limit(limit)
        async with self._auto() as conn:
            ids = list((await conn.execute(pick)).scalars())
        if not ids:
            return 0
        async with self._tx() as conn:
            result = await conn.execute(
                delete(events).where(_E.id.in_(ids), _E.execution_id.is_(None))
            )
        return int(result.rowcount or 0)

    # --- the engine's writes ------------------------------------------------------------------

    async def receive(
        self,
        claim: Claim,
        write: ExecutionWrite,
        steps: Sequence[StepWrite],
        event_id: str | None,
        consume: Sequence[str] = (),
    ) -> str | None:
        """The wait step's fenced write, consuming ``event_id`` (``None``: it timed out) and
        the events ``consume`` lists (addressed to this execution: nobody else takes them).
        ``None`` when another execution consumed the event first (nothing written); raises
        ``LeaseLost``."""
        seq = steps[-1].seq if steps else None
        try:
            async with self._tx() as conn:
                status = await write_in(conn, claim, write, steps)
                if status is None:
                    raise LeaseLost(execution_id=claim.execution_id, lease=claim.lease)
                if event_id is not None:
                    taken = await conn.execute(
                        update(events)
                        .where(_E.id == event_id, _E.consumed_at.is_(None))
                        .values(consumed_at=write.now, consumed_by=claim.execution_id,
                                consumed_seq=seq, execution_id=claim.execution_id)
                    )  # fmt: skip
                    if not taken.rowcount:
                        raise _Again
                await self._consume(conn, claim, write.now, seq, consume)
                await conn.execute(delete(event_waits).where(_W.execution_id == claim.execution_id))
                if seq is not None:  # its timeout timer has nothing left to do
                    await conn.execute(
                        update(timers)
                        .where(
                            timers.c.execution_id == claim.execution_id,
                            timers.c.seq == seq,
                            timers.c.status == "pending",
                        )
                        .values(status="cancelled")
                    )
        except _Again:
            return None
        return status

    async def park(
        self,
        claim: Claim,
        write: ExecutionWrite,
        steps: Sequence[StepWrite],
        timer: TimerWrite | None,
        wait: EventWait,
        consume: Sequence[str] = (),
    ) -> str | None:
        """Park the execution on ``wait`` (fenced); ``None`` when a matching event is there
        after all (nothing written: receive it). ``consume``: events addressed to this
        execution it has seen (consumed in the same transaction, so only one it has not seen
        keeps it from parking). Raises ``LeaseLost``."""
        try:
            async with self._tx() as conn:
                if wait.correlation is not None:
                    key = _correlation_key(
                        wait.tenant_id, wait.workflow_id, wait.name, wait.correlation
                    )
                    await self._lock(conn, key)
                await self._lock(conn, _execution_key(claim.execution_id))
                status = await write_in(conn, claim, write, steps, timer)
                if status is None:
                    raise LeaseLost(execution_id=claim.execution_id, lease=claim.lease)
                if status != "waiting":  # cancelled meanwhile: nothing to wait for
                    return status
                await self._consume(conn, claim, write.now, None, consume)
                await conn.execute(delete(event_waits).where(_W.execution_id == wait.execution_id))
                await conn.execute(
                    insert(event_waits).values(
                        execution_id=wait.execution_id, tenant_id=wait.tenant_id,
                        workflow_id=wait.workflow_id, name=wait.name,
                        correlation=wait.correlation, seq=wait.seq, deadline=wait.deadline,
                        created_at=wait.created_at,
                    )
                )  # fmt: skip
                match = _matching(
                    wait.tenant_id, wait.execution_id, wait.workflow_id, wait.name,
                    wait.correlation,
                )  # fmt: skip
                if (await conn.execute(select(_E.id).where(match).limit(1))).first():
                    raise _Again
        except _Again:
            return None
        return status

    async def _consume(
        self,
        conn: AsyncConnection,
        claim: Claim,
        now: datetime,
        seq: int | None,
        ids: Sequence[str],
    ) -> None:
        if ids:
            await conn.execute(
                update(events)
                .where(_E.id.in_(list(ids)), _E.execution_id == claim.execution_id,
                       _E.consumed_at.is_(None))
                .values(consumed_at=now, consumed_by=claim.execution_id, consumed_seq=seq)
            )  # fmt: skip


def _matching(
    tenant_id: str, execution_id: str, workflow_id: str, name: str, correlation: str | None
) -> ColumnElement[bool]:
    addressed: ColumnElement[bool] = _E.execution_id == execution_id
    if correlation is not None:
        kept = and_(
            _E.execution_id.is_(None),
            _E.workflow_id == workflow_id,
            _E.correlation == correlation,
        )
        addressed = or_(addressed, kept)
    return and_(_E.tenant_id == tenant_id, _E.name == name, _E.consumed_at.is_(None), addressed)


def _execution_key(execution_id: str) -> str:
    return f"conveyor.event.x:{execution_id}"


def _correlation_key(tenant_id: str, workflow_id: str, name: str, correlation: str) -> str:
    return f"conveyor.event.c:{tenant_id}:{workflow_id}:{name}:{correlation}"
