"""``conveyor api``: the HTTP API process.

Start-up opens the store (refusing an out-of-date schema with one line telling to run
``conveyor migrate``, exit 1) and the queue factory, then serves on ``API_HOST:API_PORT``
with uvicorn. SIGTERM/SIGINT stop accepting connections, let in-flight requests finish within
``SHUTDOWN_GRACE_MS``, close the pools and exit 0. See :mod:`conveyor.api._serve`.

This module stays cheap to import (the CLI imports every subcommand to build its parser).
"""

from __future__ import annotations

import argparse

from conveyor.settings import Settings


def run(args: argparse.Namespace, settings: Settings) -> int:
    """The ``conveyor api`` subcommand."""
    from conveyor.api._serve import main

    return main(settings)
