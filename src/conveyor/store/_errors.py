"""Driver errors in Conveyor's terms, translated where they enter the store.

Lost connections → :class:`~conveyor.errors.DatabaseUnavailable`, integrity errors →
:class:`~conveyor.errors.Conflict`, values the database refuses → ``InvalidValue``, anything
else from the database → :class:`~conveyor.errors.StoreError`. Used by the SQLAlchemy services
and by the asyncpg fast path alike.
"""

from __future__ import annotations

import re
from typing import Any

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy import exc as sa_exc

from conveyor.errors import Conflict, DatabaseUnavailable, InvalidValue, StoreError

__all__ = [
    "ASYNCPG_CONNECTION_ERRORS",
    "is_connection_error",
    "is_row_error",
    "never_sent",
    "translate_errors",
]


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
        if _sqlstate(exc).startswith(_MISCONFIGURED_SQLSTATES):
            raise DatabaseUnavailable(
                f"database unavailable: {_short(exc)} (check DATABASE_URL)"
            ) from exc
        if is_connection_error(exc) or isinstance(
            exc, (sa_exc.OperationalError, sa_exc.InterfaceError)
        ):
            raise DatabaseUnavailable(f"database unavailable: {_short(exc)}") from exc
        if isinstance(exc, sa_exc.SQLAlchemyError):
            raise StoreError(f"database error: {_short(exc)}") from exc
        if type(exc).__module__.startswith("asyncpg"):
            _raise_asyncpg(exc)


_CONNECTION_SQLSTATES = ("08", "57P01", "57P02", "57P03", "53300")
"""SQLSTATEs of a lost or refused connection: class 08 (connection exception), admin/crash
shutdown, cannot connect now, too many connections."""

_MISCONFIGURED_SQLSTATES = ("3D000", "28000", "28P01")
"""The database named in DATABASE_URL does not exist, or refuses the role or its password:
nothing works until the setting is fixed."""

ASYNCPG_CONNECTION_ERRORS: tuple[type[Exception], ...] = (
    asyncpg.InterfaceError,  # includes ConnectionDoesNotExistError ("closed in the middle")
    asyncpg.exceptions.InternalClientError,  # "cannot switch to state …": the backend died
    asyncpg.PostgresConnectionError,
)
"""asyncpg's errors of a connection that is unusable (what it raises, not what it wraps)."""


def is_connection_error(exc: BaseException) -> bool:
    """Whether ``exc`` (a driver error, wrapped by SQLAlchemy or not) means the connection is
    unusable: lost, killed (``pg_terminate_backend``), refused, or left mid-operation. Such a
    connection must be discarded, never handed out again, and the error is "database
    unavailable" (retry later), not a failure of the statement."""
    for candidate in _chain(exc):
        if isinstance(candidate, (*ASYNCPG_CONNECTION_ERRORS, OSError, ConnectionError)):
            return True
        if isinstance(candidate, sa_exc.DBAPIError) and candidate.connection_invalidated:
            return True
        state = str(getattr(candidate, "sqlstate", "") or "")
        if state and state.startswith(_CONNECTION_SQLSTATES):
            return True
    return False


def never_sent(exc: BaseException) -> bool:
    """Whether ``exc`` proves the statement never reached the server: asyncpg refused to start
    it because the connection was already broken (``cannot switch to state …``), or the
    connection was closed before use. Such a statement is safe to send again on a fresh
    connection, whatever it does."""
    for candidate in _chain(exc):
        if isinstance(candidate, asyncpg.exceptions.InternalClientError):
            return "cannot switch to state" in str(candidate)
        if isinstance(candidate, asyncpg.InterfaceError) and "connection is closed" in str(
            candidate
        ):
            return True
    return False


_ROW_SQLSTATES = ("22", "23", "40", "57014", "P0")
"""SQLSTATEs a statement gets for the rows it touches or the moment it ran, whatever tables it
names: a value refused (22), a constraint (23, but 23514, which a row put in the wrong partition
gets), a deadlock or serialization failure (40), a statement timeout (57014), a trigger's
``RAISE`` (P0)."""


def is_row_error(exc: BaseException) -> bool:
    """Whether the database refused a statement for its rows or its timing (see
    :data:`_ROW_SQLSTATES`), not for the tables it names (an undefined or detached partition,
    a row outside a partition's bounds, anything else): the same statement on other tables
    would have failed alike."""
    for candidate in _chain(exc):
        state = str(getattr(candidate, "sqlstate", "") or "")
        if state:
            return state != "23514" and state.startswith(_ROW_SQLSTATES)
    return False


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc``, what SQLAlchemy wrapped (``.orig``) and the causes, without cycles."""
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        current = todo.pop()
        if current is None or any(current is s for s in seen) or len(seen) > 8:
            continue
        seen.append(current)
        todo.extend([getattr(current, "orig", None), current.__cause__, current.__context__])
    return seen


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
    if is_connection_error(exc):
        raise DatabaseUnavailable(f"database unavailable: {_short(exc)}") from exc
    sqlstate = _sqlstate(exc)
    if sqlstate.startswith(_MISCONFIGURED_SQLSTATES):
        raise DatabaseUnavailable(
            f"database unavailable: {_short(exc)} (check DATABASE_URL)"
        ) from exc
    if sqlstate.startswith("22"):
        raise InvalidValue(f"value cannot be stored: {_short(exc)}") from exc
    if sqlstate.startswith("23"):
        raise Conflict("the change conflicts with existing data", reason=str(exc)) from exc
    raise StoreError(f"database error: {_short(exc)}") from exc


_ARGUMENT_VALUES = re.compile(r"(invalid input for query argument \$\d+): .*?( \([^()]*\))?$")
"""asyncpg's refusal of an argument quotes the argument's value — in a batch, the values of
other callers (another tenant's input): only the argument's number and the reason are kept."""


def _short(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    return _ARGUMENT_VALUES.sub(r"\1\2", text[0])[:300] if text else type(exc).__name__
