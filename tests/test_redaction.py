"""``Redactor``: every recorded form of a secret value becomes ``[secret]``."""

from __future__ import annotations

import json
from urllib.parse import quote, quote_plus

from conveyor.redaction import SECRET_MARK, Redactor

VALUE = 'a/b c+d&e="f"\\g-\u00e9'


def test_every_form_is_replaced() -> None:
    redactor = Redactor([VALUE])
    forms = [
        VALUE,
        quote(VALUE, safe=""),
        quote(VALUE),
        quote_plus(VALUE),
        json.dumps(VALUE)[1:-1],
        json.dumps(VALUE, ensure_ascii=False)[1:-1],
        json.dumps(json.dumps(VALUE)[1:-1])[1:-1],  # a JSON body echoed inside a JSON answer
        VALUE.encode().decode("latin-1"),  # a header read as Latin-1
        repr(VALUE)[1:-1],
    ]
    for form in forms:
        assert redactor.text(f"<{form}>") == f"<{SECRET_MARK}>", form
        assert redactor.contains(f"x{form}x")


def test_json_values_strings_and_keys_nested() -> None:
    redactor = Redactor(["tok-1234", "tok-12345678"])
    value = {"tok-1234": ["a tok-12345678 b", {"n": 1, "ok": True, "s": "tok-1234"}], "k": None}
    assert redactor.value(value) == {
        SECRET_MARK: [f"a {SECRET_MARK} b", {"n": 1, "ok": True, "s": SECRET_MARK}],
        "k": None,
    }  # the longer value is replaced whole, not as the shorter one plus a tail
    assert redactor.value(("tok-1234",)) == [SECRET_MARK]


def test_no_values_changes_nothing() -> None:
    redactor = Redactor(["", ""])
    assert not redactor
    data = {"a": ["b"]}
    assert redactor.value(data) is data and redactor.text("abc") == "abc"
    assert not redactor.contains("anything")
