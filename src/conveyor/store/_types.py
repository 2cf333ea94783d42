"""Column types and small helpers shared by the schema, the services and the engine.

* :class:`UTCDateTime` stores timezone-aware datetimes as UTC on both backends: ``timestamptz``
  on Postgres; on SQLite (which has no time zone type) a naive UTC text value that is made
  aware again when read, so values round-trip and compare correctly on both.
* :data:`JSONType` is ``JSONB`` on Postgres and ``JSON`` (text) on SQLite; Python ``None`` is
  stored as SQL ``NULL``.
* :func:`new_id` makes time-ordered 32-hex-digit ids (UUIDv7 layout): new rows land at the
  right-hand edge of the primary-key index, and ids sort roughly by creation time.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime
from json.encoder import c_make_encoder, encode_basestring  # type: ignore[attr-defined]
from typing import Any

from sqlalchemy import JSON, DateTime
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator, TypeEngine

__all__ = [
    "JSONType",
    "UTCDateTime",
    "check_storable",
    "dumps",
    "has_nul",
    "new_id",
    "utcnow",
    "without_nul",
]


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware datetime stored as UTC (naive datetimes are refused)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: Conveyor stores only aware datetimes")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


JSONType: TypeEngine[Any] = JSON(none_as_null=True).with_variant(
    JSONB(none_as_null=True), "postgresql"
)


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


def new_id(at: datetime | None = None) -> str:
    """A time-ordered random id: 48-bit milliseconds (now, or ``at``) + 80 random bits, as 32
    hex digits. On PostgreSQL the id's instant picks the execution's daily partition
    (:mod:`conveyor.store.partitions`)."""
    ms = time.time_ns() // 1_000_000 if at is None else int(at.timestamp() * 1000)
    rand = int.from_bytes(os.urandom(10), "big")
    value = (ms << 80) | rand
    # Set the UUID version (7) and variant bits so the value is also a valid UUIDv7.
    value = (value & ~(0xF << 76)) | (0x7 << 76)
    value = (value & ~(0x3 << 62)) | (0x2 << 62)
    return f"{value:032x}"


def _not_json(value: Any) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


_COMPACT: Callable[[Any, int], Any] | None = (
    None
    if c_make_encoder is None
    else c_make_encoder(None, _not_json, encode_basestring, None, ":", ",", False, False, False)
)
"""The C encoder ``json.dumps(value, separators=(",", ":"), ensure_ascii=False,
allow_nan=False)`` builds on every call, built once: building it took longer than encoding a
step's output. Without the circular-reference check (``markers``: a value with a cycle raises
``RecursionError`` rather than ``ValueError``; every caller catches both). It keeps no state
between calls."""


def dumps(value: Any) -> str:
    """Compact JSON text (what both backends store)."""
    if _COMPACT is None:  # a Python without the json module's C accelerator
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return "".join(_COMPACT(value, 0))


# A JSON escape of NUL (not an escaped backslash followed by "u0000"): Postgres jsonb refuses it.
_NUL_ESCAPE = re.compile(r"(?<!\\)((?:\\\\)*)\\u0000")


def has_nul(text: str) -> bool:
    """Whether JSON ``text`` encodes a NUL character (which Postgres cannot store)."""
    return "\\u0000" in text and _NUL_ESCAPE.search(text) is not None


def without_nul(text: str) -> str:
    """JSON ``text`` with every encoded NUL replaced by U+FFFD."""
    return _NUL_ESCAPE.sub(lambda m: m.group(1) + "\\ufffd", text)


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def without_surrogates(text: str) -> str:
    """``text`` with every lone surrogate (a ``\\udce9`` escape in parsed JSON, a header byte
    that was not UTF-8) replaced by U+FFFD: neither backend stores one, nor is it UTF-8."""
    return _LONE_SURROGATE.sub("\ufffd", text)


def storable_text(value: Any, text: str) -> tuple[Any, str]:
    """``(value, text)`` as both backends can store them: encoded NULs and lone surrogates
    replaced by U+FFFD (and ``value`` parsed again from the text when it changed)."""
    changed = False
    if has_nul(text):  # Postgres cannot store NUL characters in JSON
        text, changed = without_nul(text), True
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            text, changed = without_surrogates(text), True
    return (json.loads(text), text) if changed else (value, text)


def check_storable(value: Any, what: str = "value") -> None:
    """Raise ``ValueError`` unless ``value`` is JSON both backends can store."""
    try:
        text = dumps(value)
    except (TypeError, ValueError, RecursionError) as exc:
        raise ValueError(f"{what} is not storable JSON: {exc}") from None
    if has_nul(text):
        raise ValueError(f"{what} contains a NUL character (\\u0000), which cannot be stored")
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            raise ValueError(
                f"{what} contains an unpaired surrogate (a \\ud800-\\udfff escape without its "
                "pair), which is not Unicode text and cannot be stored"
            ) from None
