"""What every service shares: connections, error translation, dialect-specific inserts."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Select, Table, and_, or_
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from conveyor.errors import Conflict, DatabaseUnavailable, StoreError
from conveyor.settings import Settings
from conveyor.store._db import autocommit
from conveyor.store.records import CursorInvalid, InvalidValue, Page, _Record

if TYPE_CHECKING:
    from conveyor.store._fast_pg import PgFast

MAX_PAGE = 200


R = TypeVar("R", bound=_Record)


class ServiceBase:
    """Holds the engine; subclasses are the tenant/workflow/execution/... services."""

    def __init__(
        self, engine: AsyncEngine, settings: Settings, *, fast: PgFast | None = None
    ) -> None:
        self._engine = engine
        self._settings = settings
        self._fast = fast
        self._dialect = engine.dialect.name
        self._autocommit = autocommit(engine)

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[AsyncConnection]:
        """One transaction (committed on success, rolled back on error)."""
        with translate_errors():
            async with self._engine.begin() as conn:
                yield conn

    @asynccontextmanager
    async def _auto(self) -> AsyncIterator[AsyncConnection]:
        """A connection whose statements each commit on their own (no BEGIN/COMMIT round trips
        on Postgres, no write lock on SQLite). Use for reads and single-statement writes."""
        with translate_errors():
            async with self._autocommit.connect() as conn:
                yield conn

    async def _page(
        self, query: Select[Any], table: Table, record: type[R], *, limit: int, cursor: str | None
    ) -> Page[R]:
        """One page of ``query`` (already filtered), newest first, after ``cursor``."""
        limit = page_limit(limit)
        query = query.order_by(table.c.created_at.desc(), table.c.id.desc())
        condition = after_cursor(table, cursor)
        if condition is not None:
            query = query.where(condition)
        async with self._auto() as conn:
            rows = (await conn.execute(query.limit(limit + 1))).all()
        items = [record.from_mapping(r._mapping) for r in rows[:limit]]
        if len(rows) <= limit:
            return Page(items, None)
        last: Any = items[-1]  # every paged record has ``created_at`` and ``id``
        return Page(items, encode_cursor(last.created_at, last.id))

    def _insert(self, table: Table) -> Any:
        """A dialect-specific INSERT (supports ``on_conflict_do_nothing``)."""
        if self._dialect == "postgresql":
            return postgresql.insert(table)
        return sqlite.insert(table)


class translate_errors:
    """Turn driver errors into Conveyor's: lost connections → DatabaseUnavailable,
    integrity errors → Conflict, anything else from the database → StoreError."""

    def __enter__(self) -> None:
        return None

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, _tb: Any
    ) -> None:
        if exc is None or isinstance(exc, StoreError):
            return
        if isinstance(exc, sa_exc.DataError) or _sqlstate(exc).startswith("22"):
            raise InvalidValue(f"value cannot be stored: {_short(exc)}") from exc
        if isinstance(exc, sa_exc.IntegrityError):
            raise Conflict("the change conflicts with existing data", reason=str(exc.orig)) from exc
        if isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError, OSError)) or (
            isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated
        ):
            raise DatabaseUnavailable(f"database unavailable: {_short(exc)}") from exc
        if isinstance(exc, sa_exc.SQLAlchemyError):
            raise StoreError(f"database error: {_short(exc)}") from exc
        if type(exc).__module__.startswith("asyncpg"):
            _raise_asyncpg(exc)


_ASYNCPG_UNAVAILABLE = (
    "Connection",
    "CannotConnectNow",
    "TooManyConnections",
    "AdminShutdown",
    "CrashShutdown",
    "InterfaceError",
    "ConnectionFailure",
)


def _sqlstate(exc: BaseException) -> str:
    """The SQLSTATE of a driver error (Postgres), wrapped or not; ``""`` if none."""
    for candidate in (
        exc,
        getattr(exc, "orig", None),
        getattr(getattr(exc, "orig", None), "__cause__", None),
    ):
        state = getattr(candidate, "sqlstate", None)
        if state:
            return str(state)
    return ""


def _raise_asyncpg(exc: BaseException) -> None:
    name = type(exc).__name__
    if any(part in name for part in _ASYNCPG_UNAVAILABLE):
        raise DatabaseUnavailable(f"database unavailable: {_short(exc)}") from exc
    sqlstate = _sqlstate(exc)
    if sqlstate.startswith("22"):
        raise InvalidValue(f"value cannot be stored: {_short(exc)}") from exc
    if sqlstate.startswith("23"):
        raise Conflict("the change conflicts with existing data", reason=str(exc)) from exc
    raise StoreError(f"database error: {_short(exc)}") from exc


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


# --- cursor pagination ---------------------------------------------------------------------


def encode_cursor(created_at: datetime, row_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), row_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Raise :class:`CursorInvalid` for a malformed cursor."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, row_id = json.loads(base64.urlsafe_b64decode(padded.encode()))
        at = datetime.fromisoformat(created)
        if at.tzinfo is None or not isinstance(row_id, str):
            raise ValueError
        return at, row_id
    except (ValueError, TypeError, binascii.Error, UnicodeDecodeError):
        raise CursorInvalid(cursor=cursor[:200]) from None


def after_cursor(table: Table, cursor: str | None) -> ColumnElement[bool] | None:
    """Rows strictly after ``cursor`` in (created_at DESC, id DESC) order."""
    if cursor is None:
        return None
    at, row_id = decode_cursor(cursor)
    created, ident = table.c.created_at, table.c.id
    return and_(created <= at, or_(created < at, ident < row_id))


def page_limit(limit: int) -> int:
    """``limit`` clamped to 1..MAX_PAGE."""
    return max(1, min(limit, MAX_PAGE))
