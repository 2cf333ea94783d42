"""The store's hot paths on SQLAlchemy Core: used on SQLite, and on Postgres as the baseline
(``Store(..., fast_path=False)``). The asyncpg fast path is :mod:`conveyor.store.pg`."""

from conveyor.store.sql.runs import SqlRunStore
from conveyor.store.sql.statements import SqlStatements

__all__ = ["SqlRunStore", "SqlStatements"]
