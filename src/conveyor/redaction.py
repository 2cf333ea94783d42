"""Redaction of secret values from everything Conveyor records.

A :class:`Redactor` knows a set of secret values and replaces every occurrence of each — as
written, percent-encoded (as a URL template sends it), JSON-escaped once or twice (as an
echoing server may return it) and as its UTF-8 bytes read as Latin-1 (a header echoed by a
server that decodes headers so) — with :data:`SECRET_MARK`. A target that transforms a value
otherwise (base64, hashing, reversing) is beyond what can be recognised. It works on text and on JSON values (strings,
object keys, nested lists and objects). It imports nothing of Conveyor's: the step runners,
the HTTP client and the engine all use it (:mod:`conveyor.workflows.steps`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote, quote_plus

__all__ = ["SECRET_MARK", "Redactor"]

SECRET_MARK = "[secret]"
"""What recorded data shows instead of a secret's value."""


_ESCAPE_LEVELS = 2
"""JSON escaping applied up to this many times: a JSON body echoed back as a string inside a
JSON answer escapes its strings twice."""


def _json_escaped(text: str) -> set[str]:
    return {json.dumps(text)[1:-1], json.dumps(text, ensure_ascii=False)[1:-1]}


def _forms(value: str) -> set[str]:
    """The ways ``value`` may appear in text Conveyor records."""
    # as sent: verbatim, percent-encoded (URL templates), and its UTF-8 bytes read as Latin-1
    # (how HTTP servers often decode header values)
    forms = {
        value,
        quote(value, safe=""),
        quote(value),
        quote_plus(value),
        value.encode("utf-8", "surrogatepass").decode("latin-1"),
        repr(value)[1:-1],  # quoted in an error message with !r
    }
    # as echoed inside JSON, once or twice
    layer = set(forms)
    for _ in range(_ESCAPE_LEVELS):
        layer = {escaped for text in layer for escaped in _json_escaped(text)} - forms
        forms |= layer
    return {form for form in forms if form}


class Redactor:
    """Replaces secret values (in any of their recorded forms) with ``[secret]``."""

    __slots__ = ("_forms",)

    def __init__(self, values: Iterable[str] = ()) -> None:
        forms: set[str] = set()
        for value in values:
            if value:
                forms |= _forms(value)
        # longest first: a value that contains another is replaced whole
        self._forms = tuple(sorted(forms, key=len, reverse=True))

    def __bool__(self) -> bool:
        return bool(self._forms)

    def contains(self, text: str) -> bool:
        """True if ``text`` shows a secret value."""
        return any(form in text for form in self._forms)

    def text(self, text: str) -> str:
        """``text`` with every secret value replaced by ``[secret]``."""
        for form in self._forms:
            if form in text:
                text = text.replace(form, SECRET_MARK)
        return text

    def value(self, value: Any) -> Any:
        """A JSON value with every secret in its strings (and object keys) replaced."""
        if not self._forms:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, dict):
            return {
                (self.text(k) if isinstance(k, str) else k): self.value(v) for k, v in value.items()
            }
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        return value
