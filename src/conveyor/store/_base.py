"""What every service shares: connections, dialect-specific inserts, cursor pagination.

Driver errors are translated where they enter (:func:`~conveyor.store._errors.translate_errors`)."""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

from sqlalchemy import Select, Table, and_, or_
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine
from sqlalchemy.sql.elements import ColumnElement

from conveyor.errors import CursorInvalid
from conveyor.settings import Settings
from conveyor.store._db import autocommit
from conveyor.store._errors import translate_errors
from conveyor.store.records import Page, _Record

if TYPE_CHECKING:
    from conveyor.store.statements import Statements

MAX_PAGE = 200


R = TypeVar("R", bound=_Record)


class ServiceBase:
    """Holds the engine; subclasses are the tenant/workflow/execution/... services."""

    def __init__(self, engine: AsyncEngine, settings: Settings, statements: Statements) -> None:
        self._engine = engine
        self._settings = settings
        self._statements = statements
        """The hot per-request statements, on the driver the :class:`Store` chose."""
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


# --- cursor pagination ---------------------------------------------------------------------


def encode_cursor(created_at: datetime, row_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), row_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


_CURSOR_EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
_CURSOR_LATEST = datetime(9000, 1, 1, tzinfo=UTC)
"""A cursor's time lies between these (every row's ``created_at`` does): a crafted one beyond
them would overflow the date arithmetic behind a page (a day's partition walked back)."""


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Raise :class:`CursorInvalid` for a malformed cursor (or one no list could have made)."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, row_id = json.loads(base64.urlsafe_b64decode(padded.encode()))
        at = datetime.fromisoformat(created)
        if at.tzinfo is None or not isinstance(row_id, str) or "\x00" in row_id:
            raise ValueError
        at = at.astimezone(UTC)
        if not _CURSOR_EARLIEST <= at < _CURSOR_LATEST:
            raise ValueError
        return at, row_id
    except (ValueError, TypeError, OverflowError, binascii.Error, UnicodeDecodeError):
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
