"""Property: the trigger's fast lane answers every body exactly as FastAPI does, and never 5xx.

Hypothesis generates request bodies — JSON values of many shapes, wrapped in nestings up to
well past the depth limit, long strings, other encodings, truncated or corrupted bytes — with
assorted content types, credentials and workflows. Each request goes to the application with
the fast lane and to a copy without it (``tests/api/test_fastlane.py``); status, headers
(content type and length included) and body bytes must be identical, ids and timestamps of
freshly created executions aside. The examples are derandomized (the same on every run) and
bounded so that the whole property takes a few seconds.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from conveyor.api.middleware import MAX_JSON_DEPTH
from tests.api import test_fastlane
from tests.api.conftest import NOOP_WORKFLOW
from tests.api.test_fastlane import Pair

pair = test_fastlane.pair  # the fixture: both applications over one context


@dataclass
class Targets:
    pair: Pair
    auth: dict[str, str]
    workflows: list[str]  # a plain workflow, one with an input schema, an unknown id


@pytest.fixture
async def targets(pair: Pair) -> Targets:
    auth = await pair.api.tenant()
    plain = await pair.api.workflow(auth)
    schema = {"type": "object", "required": ["orderId"]}
    with_schema = await pair.api.workflow(auth, {**NOOP_WORKFLOW, "input_schema": schema})
    return Targets(pair, auth, [plain, with_schema, "no-such-workflow"])


# --- bodies ------------------------------------------------------------------------------------
_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()  # NaN and ±Infinity included: Python's parser accepts them
    | st.text(max_size=20)
    | st.integers(0, 70_000).map(lambda n: "x" * n)  # sizes, cheaply
)
_values = st.recursive(
    _scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


_depths = st.one_of(
    st.integers(0, 8),
    st.integers(MAX_JSON_DEPTH - 3, MAX_JSON_DEPTH + 3),  # around the limit
    st.integers(250, 260),  # pydantic serialises at most 255 levels
    st.integers(900, 1_000),  # where Python's parser meets the recursion limit
    st.just(10_000),
)


@st.composite
def _nested(draw: st.DrawFn, value: Any) -> str:
    """``value`` as JSON inside ``depth`` arrays or objects (built flat: no recursion)."""
    depth = draw(_depths)
    text = json.dumps(value)
    if draw(st.booleans()):
        return "[" * depth + text + "]" * depth
    return '{"k":' * depth + text + "}" * depth


@st.composite
def _documents(draw: st.DrawFn) -> str:
    value = draw(_values)
    kind = draw(st.sampled_from(["trigger", "trigger", "nested", "extra", "bare"]))
    if kind == "trigger":
        return json.dumps({"input": value}, indent=draw(st.sampled_from([None, 2])))
    if kind == "nested":
        return '{"input":' + draw(_nested(value)) + "}"
    if kind == "extra":
        return json.dumps({"input": value, draw(st.text(min_size=1, max_size=8)): 1})
    return draw(_nested(value))  # anything at the top: arrays, scalars, deep nests


@st.composite
def _bodies(draw: st.DrawFn) -> bytes:
    text = draw(_documents())
    encoding = draw(st.sampled_from(["utf-8"] * 6 + ["utf-8-sig", "utf-16", "utf-32-be"]))
    body = text.encode(encoding) if encoding != "utf-8-sig" else codecs.BOM_UTF8 + text.encode()
    change = draw(st.sampled_from(["none"] * 4 + ["truncate", "insert", "replace"]))
    if change == "none" or not body:
        return body
    at = draw(st.integers(0, len(body) - 1))
    if change == "truncate":
        return body[:at]
    junk = draw(st.sampled_from([b",", b"}", b"]", b"[", b"{", b'"', b"\\", b"\n", b"\xff",
                                 b"\x00", b"NaN", b"1" * 4400, b'"\\ud800"']))  # fmt: skip
    return body[:at] + junk + body[at + (change == "replace") :]


_CONTENT_TYPES = ["application/json"] * 6 + [
    "application/json; charset=utf-8",
    "application/merge-patch+json",
    "text/plain",
    None,
]


@settings(
    max_examples=250,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    body=_bodies(),
    content_type=st.sampled_from(_CONTENT_TYPES),
    workflow=st.sampled_from([0, 0, 0, 1, 2]),
    authenticated=st.sampled_from([True, True, True, False]),
)
async def test_the_lane_answers_every_body_as_fastapi_does(
    targets: Targets, body: bytes, content_type: str | None, workflow: int, authenticated: bool
) -> None:
    headers = dict(targets.auth) if authenticated else {}
    if content_type is not None:
        headers["Content-Type"] = content_type
    url = f"/api/workflows/{targets.workflows[workflow]}/executions"
    note(f"POST {url} {content_type=} {authenticated=} {body=!r}")  # shown on failure
    r = await targets.pair.both("POST", url, content=body, headers=headers)  # byte-identical
    assert r.status_code < 500, r.text
    event(f"{r.status_code} {r.json()['error']['code'] if r.status_code >= 400 else ''}")
    if r.status_code >= 400:
        answer = r.json()
        assert answer["success"] is False and set(answer["error"]) == {"code", "message", "details"}
        if answer["error"]["code"] == "malformed_json":
            assert r.status_code == 400
            for detail in answer["error"]["details"]:
                assert isinstance(detail["message"], str)
                assert {"line", "column"} <= detail.keys() or "digits" in detail["message"]


@settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(nest=_nested(None), top=st.booleans(), newlines=st.booleans())
async def test_every_nesting_is_answered_alike_and_deep_ones_are_400(
    targets: Targets, nest: str, top: bool, newlines: bool
) -> None:
    text = nest if top else '{"input":' + nest + "}"
    if newlines:
        text = text.replace("[", "[\n").replace("{", "{\n")
    url = f"/api/workflows/{targets.workflows[0]}/executions"
    note(f"POST {url} {text=}")
    r = await targets.pair.both("POST", url, content=text.encode(), headers=_json(targets.auth))
    openers = [at for at, char in enumerate(text) if char in "[{"]  # one nest: depth = count
    if len(openers) > MAX_JSON_DEPTH:
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["code"] == "malformed_json"
        at = openers[MAX_JSON_DEPTH]  # the first one too deep
        line, column = text.count("\n", 0, at) + 1, at - text.rfind("\n", 0, at)
        (detail,) = error["details"]
        assert (detail["line"], detail["column"]) == (line, column)
    else:
        trigger_body = not top or not openers  # a bare ``null`` is no body at all
        assert r.status_code == (202 if trigger_body else 422), r.text


def _json(headers: dict[str, str]) -> dict[str, str]:
    return {**headers, "Content-Type": "application/json"}
