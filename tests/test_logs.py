"""Process logging: libraries' chatter stays below the process's own lines."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from conveyor.logs import configure_logging
from conveyor.settings import load_settings


@pytest.fixture
def restore_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:], root.level = handlers, level


@pytest.mark.usefixtures("restore_logging")
def test_alembic_start_up_lines_do_not_flood_the_log() -> None:
    out = io.StringIO()
    configure_logging(load_settings({"LOG_FORMAT": "text", "LOG_LEVEL": "INFO"}), stream=out)
    logging.getLogger("alembic.runtime.plugins").info("setup plugin alembic.autogenerate.schemas")
    logging.getLogger("alembic.runtime.migration").info("Context impl PostgresqlImpl.")
    logging.getLogger("conveyor.store").info("store.migrated")
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "store.migrated" in lines[0], lines
