"""``conveyor secrets reencrypt``: every stored secret re-encrypted with the first key of
``SECRETS_KEY``.

The rotation procedure (docs/operations.md): put a new key first in ``SECRETS_KEY``, keeping
the old one after it, restart the API and workers, run this command, then remove the old key.
Rows are read and rewritten in batches; a row rotated meanwhile is left as it is (it already
uses the first key). Safe to run again (0 rows the second time) and next to running processes.
Exit 0; 2 when ``SECRETS_KEY`` is unset or lacks a key a row was encrypted with; 1 when the
database is unreachable or its schema out of date.
"""

from __future__ import annotations

import argparse
import sys
from typing import TextIO

from conveyor.errors import SecretsUnavailable, StoreError
from conveyor.runtime import run_loop
from conveyor.settings import Settings
from conveyor.store import Store
from conveyor.store.secrets import key_id


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "action",
        choices=["reencrypt"],
        help="reencrypt: re-encrypt every stored secret with the first key of SECRETS_KEY",
    )


def run(args: argparse.Namespace, settings: Settings, *, out: TextIO | None = None) -> int:
    return run_loop(_reencrypt(settings, out or sys.stdout))


async def _reencrypt(settings: Settings, out: TextIO) -> int:
    keys = settings.secrets_keys
    if not keys:
        print("conveyor secrets: SECRETS_KEY is not set", file=sys.stderr)
        return 2
    try:
        async with Store(settings, pool_size=2, fast_path=False) as store:
            await store.check_schema()
            count = await store.secrets.reencrypt()
            total = await store.secrets.count()
    except SecretsUnavailable as exc:
        print(f"conveyor secrets: {exc.message}", file=sys.stderr)
        return 2
    except StoreError as exc:
        print(f"conveyor secrets: {exc.message}", file=sys.stderr)
        return 1
    out.write(
        f"re-encrypted {count} secret(s) with key {key_id(keys[0])}; all {total} now use it\n"
    )
    return 0
