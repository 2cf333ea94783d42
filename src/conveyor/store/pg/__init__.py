"""The store's fast path on PostgreSQL: prepared statements on a raw asyncpg pool.

:class:`PgRunStore` is the engine's hot path (one round trip per claim and per step, shared
by the concurrent runs of a worker: group commit);
:class:`PgStatements` the API's (API key check, one-statement trigger, execution by id).
Both are chosen once when the :class:`~conveyor.store.Store` opens on Postgres.
"""

from conveyor.store.pg.runs import PgRunStore
from conveyor.store.pg.statements import PgStatements

__all__ = ["PgRunStore", "PgStatements"]
