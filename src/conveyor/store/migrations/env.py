"""Alembic environment.

``conveyor migrate`` (:func:`conveyor.store.migrate`) passes an open connection in
``config.attributes["connection"]``. When Alembic's own CLI runs this file instead, the database
URL comes from the process settings (``DATABASE_URL``).
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from conveyor.store.partitions import include_name, include_object
from conveyor.store.schema import metadata

config = context.config


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        include_name=include_name,  # the daily partitions come and go at run time
        include_object=include_object,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_standalone() -> None:
    from conveyor.settings import load_settings
    from conveyor.store._db import create_engine

    engine = create_engine(load_settings(), pool_size=1)
    try:
        async with engine.connect() as connection:
            await connection.run_sync(_run)
            await connection.commit()
    finally:
        await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run `conveyor migrate`")

_connection = config.attributes.get("connection")
if _connection is not None:
    _run(_connection)
else:
    asyncio.run(_run_standalone())
