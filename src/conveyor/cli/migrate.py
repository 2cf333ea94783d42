"""``conveyor migrate``: bring the database schema up to date (Alembic, shipped in the package).

Idempotent: running it on an up-to-date database changes nothing and exits 0. ``--check``
only reports: exit 0 when the schema is current, 1 (with the reason) when it is not.
Concurrent runs on Postgres serialise on an advisory lock.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from conveyor.errors import DatabaseUnavailable, SchemaOutOfDate, StoreError
from conveyor.settings import Settings
from conveyor.store import Store

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--check", action="store_true", help="only check: exit 1 if migrations are pending"
    )


def run(args: argparse.Namespace, settings: Settings) -> int:
    return asyncio.run(_run(bool(getattr(args, "check", False)), settings))


async def _run(check_only: bool, settings: Settings) -> int:
    try:
        async with Store(settings, pool_size=1, fast_path=False) as store:
            if check_only:
                await store.check_schema()
                log.info("migrate.up_to_date")
                return 0
            before, after = await store.migrate()
    except SchemaOutOfDate as exc:
        print(f"conveyor migrate: {exc.message}", file=sys.stderr)
        return 1
    except (DatabaseUnavailable, StoreError) as exc:
        print(f"conveyor migrate: {exc.message}", file=sys.stderr)
        return 1
    if before == after:
        log.info("migrate.nothing_to_do", extra={"revision": ",".join(after)})
    else:
        log.info("migrate.applied", extra={"from": ",".join(before) or None, "to": ",".join(after)})
    return 0


if __name__ == "__main__":
    from conveyor.runtime import entry

    _parser = argparse.ArgumentParser(prog="python -m conveyor.cli.migrate")
    add_arguments(_parser)
    _parsed = _parser.parse_args()
    entry(lambda _args, settings: run(_parsed, settings), "migrate")
