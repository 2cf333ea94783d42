"""Statements on a pooled asyncpg connection that never reuse a broken one.

A connection whose backend was killed (``pg_terminate_backend``, a failover, a restart) can sit
in the pool looking idle; asyncpg then refuses to start the next statement on it
(``cannot switch to state …``) or loses it mid-statement. :func:`call` discards such a
connection (terminated, never handed out again), answers ``DatabaseUnavailable``, and — only
when the statement provably never reached the server — sends it once more on a fresh
connection (after expiring the pool's other connections, most likely killed alike), so killed
idle connections cost the caller nothing.
"""

from __future__ import annotations

import contextlib
from typing import Any

import asyncpg  # type: ignore[import-untyped]

from conveyor.errors import DatabaseUnavailable
from conveyor.store._errors import never_sent, translate_errors

__all__ = ["call", "discard"]


async def discard(pool: Any, con: Any) -> None:
    """Terminate ``con`` and give its slot back to ``pool`` (a new connection replaces it).
    A connection asyncpg already took back (it noticed the loss itself) is left to it."""
    with contextlib.suppress(asyncpg.InterfaceError):
        con.terminate()
    await pool.release(con)  # a no-op for a connection already back in the pool


async def call(pool: Any, method: str, sql: str, *args: Any) -> Any:
    """``con.<method>(sql, *args)`` on a connection of ``pool`` (see the module docstring)."""
    retried = False
    while True:
        with translate_errors():
            con = await pool.acquire()
        try:
            with translate_errors():
                result = await getattr(con, method)(sql, *args)
        except DatabaseUnavailable as exc:
            await discard(pool, con)
            if retried or not never_sent(exc):
                raise
            await pool.expire_connections()  # its siblings were most likely killed alike
            retried = True
            continue
        except BaseException:
            await pool.release(con)
            raise
        await pool.release(con)
        return result
