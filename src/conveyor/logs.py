"""Logging set-up: one call per process, text for people or JSON lines for collectors.

Library code logs with ``logging.getLogger(__name__)``, a stable event name as the message and
``%``-style arguments or ``extra={...}`` fields; it never prints.

Every line also carries ``execution_id`` while an execution is bound to the running task
(:data:`EXECUTION_ID`, set by the worker around a job and by the API around a trigger) and
``trace_id`` while a span is current (tracing on only: :mod:`conveyor.tracing`).
"""

from __future__ import annotations

import json
import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from conveyor import tracing
from conveyor.settings import Settings

EXECUTION_ID: ContextVar[str | None] = ContextVar("conveyor_execution_id", default=None)
"""The execution the current task works for; log lines carry it as ``execution_id``.
``token = EXECUTION_ID.set(id)`` ... ``EXECUTION_ID.reset(token)``."""

_RESERVED = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


def _extra(record: logging.LogRecord) -> dict[str, Any]:
    return {
        k: v for k, v in record.__dict__.items() if k not in _RESERVED and not k.startswith("_")
    }


class ContextFilter(logging.Filter):
    """Adds ``execution_id`` (:data:`EXECUTION_ID`) and ``trace_id`` (the current span's, when
    tracing is on) to every record that does not carry them already."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = record.__dict__
        if "execution_id" not in fields:
            execution_id = EXECUTION_ID.get()
            if execution_id is not None:
                fields["execution_id"] = execution_id
        if tracing.enabled and "trace_id" not in fields:
            trace_id = tracing.current_trace_id()
            if trace_id is not None:
                fields["trace_id"] = trace_id
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, extra fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_extra(record),
        }
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


class TextFormatter(logging.Formatter):
    """``time level logger: message key=value ...`` for terminals."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = _extra(record)
        if extra:
            tail = " ".join(f"{k}={v}" for k, v in extra.items())
            head, sep, rest = line.partition("\n")
            line = f"{head} {tail}{sep}{rest}"
        return line


def configure_logging(settings: Settings, *, stream: Any = None) -> None:
    """Install the root handler for this process according to ``LOG_FORMAT``/``LOG_LEVEL``."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if settings.log_format == "json" else TextFormatter())
    handler.addFilter(ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)
    # alembic: its migration and plugin set-up lines ("setup plugin …") at INFO on every start
    for noisy in ("httpx", "httpcore", "aiohttp", "asyncio", "aiosqlite", "alembic"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
