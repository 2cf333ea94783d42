"""Driver errors in Conveyor's terms, translated where they enter the store.

Lost connections → :class:`~conveyor.errors.DatabaseUnavailable`, integrity errors →
:class:`~conveyor.errors.Conflict`, values the database refuses → ``InvalidValue``, anything
else from the database → :class:`~conveyor.errors.StoreError`. Used by the SQLAlchemy services
and by the asyncpg fast path alike.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import exc as sa_exc

from conveyor.errors import Conflict, DatabaseUnavailable, InvalidValue, StoreError

__all__ = ["translate_errors"]


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
