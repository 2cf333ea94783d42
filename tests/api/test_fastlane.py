"""The fast lane (``conveyor.api.fastlane``) answers exactly as FastAPI does.

Two applications share one context: the real one (with the fast lane) and a copy without it.
Every request goes to both; the answers must be byte-identical (ids and timestamps of freshly
created executions aside), and the fast lane must actually serve the common case.
"""

from __future__ import annotations

import base64
import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from conveyor.api.app import create_app
from conveyor.api.context import ApiContext, open_context
from conveyor.api.fastlane import FastLane
from conveyor.api.middleware import MAX_JSON_DEPTH
from conveyor.store import utcnow
from conveyor.store.schema import executions, step_runs
from tests.api.conftest import NOOP_WORKFLOW, Api, make_settings

TRIGGER_ROUTE = "/api/workflows/{workflowId}/executions"
_FRESH = re.compile(rb'"(id|createdAt|queuedAt|updatedAt)":"[^"]*"')


@dataclass
class Pair:
    lane: httpx.AsyncClient
    plain: httpx.AsyncClient
    api: Api
    handed_over: list[str]

    async def both(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """Send to both applications; assert identical answers; the fast lane's answer."""
        fast = await self.lane.request(method, path, **kwargs)
        slow = await self.plain.request(method, path, **kwargs)
        assert fast.status_code == slow.status_code, (fast.text, slow.text)
        fast_body, slow_body = fast.content, slow.content
        fast_headers, slow_headers = dict(fast.headers), dict(slow.headers)
        if fast.status_code in (200, 202) and path.endswith("/executions"):
            fast_body, slow_body = _FRESH.sub(b"", fast_body), _FRESH.sub(b"", slow_body)
            fast_headers.pop("content-length"), slow_headers.pop("content-length")
        assert fast_body == slow_body
        assert list(fast.headers.keys()) == list(slow.headers.keys())
        assert fast_headers == slow_headers
        return fast


class _Spy:
    """Wraps the application behind the fast lane: records the trigger, health, list and
    detail requests it hands over (other routes always go there)."""

    def __init__(self, app: ASGIApp, seen: list[str]) -> None:
        self.app, self.seen = app, seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path"))
        if (
            path.endswith(("/executions", "/executions/"))
            or path == "/api/health"
            or path.startswith("/api/executions/")
        ):
            self.seen.append(f"{scope.get('method')} {path}")
        await self.app(scope, receive, send)


def _find_lane(app: FastAPI) -> FastLane:
    node: Any = app.middleware_stack
    while not isinstance(node, FastLane):
        node = node.app
    return node


@contextlib.asynccontextmanager
async def _client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
            yield client


@pytest.fixture
async def pair(api_env: dict[str, str]) -> AsyncIterator[Pair]:
    settings = make_settings(**api_env)
    async with open_context(settings, heartbeat=False) as ctx:
        lane_app = create_app(settings, context=ctx)
        plain_app = _without_lane(settings, ctx)
        async with _client(lane_app) as lane, _client(plain_app) as plain:
            await lane.get("/api/health")  # builds the middleware stack
            handed_over: list[str] = []
            found = _find_lane(lane_app)
            found.app = _Spy(found.app, handed_over)
            handed_over.clear()
            yield Pair(lane, plain, Api(lane, ctx, settings, lane_app), handed_over)


def _without_lane(settings: Any, ctx: ApiContext) -> FastAPI:
    app = create_app(settings, context=ctx)
    app.user_middleware = [m for m in app.user_middleware if m.cls is not FastLane]  # type: ignore[comparison-overlap]
    return app


async def test_triggers_answer_as_fastapi_does(pair: Pair) -> None:
    auth = await pair.api.tenant()
    wf = await pair.api.workflow(auth)
    url = f"/api/workflows/{wf}/executions"
    await pair.both("POST", url, json={"input": {"orderId": 42}}, headers=auth)
    for body in ({}, {"input": None}, {"input": [1.5, 1e300, -0.0, "é😀", {"a": {"b": []}}]}):
        r = await pair.both("POST", url, json=body, headers=auth)
        assert r.status_code == 202
    keyed = {**auth, "Idempotency-Key": "key-1"}
    first = await pair.lane.post(url, json={"input": 1}, headers=keyed)
    assert first.status_code == 202 and "idempotent-replayed" not in first.headers
    replay = await pair.both("POST", url, json={"input": 2}, headers=keyed)
    assert replay.status_code == 200 and replay.headers["idempotent-replayed"] == "true"
    assert replay.json()["data"]["id"] == first.json()["data"]["id"]
    assert pair.handed_over == [], "the fast lane served every one of these"


async def test_errors_answer_as_fastapi_does(pair: Pair) -> None:
    auth = await pair.api.tenant()
    wf = await pair.api.workflow(auth)
    schema_wf = await pair.api.workflow(
        auth, {**NOOP_WORKFLOW, "input_schema": {"type": "object", "required": ["orderId"]}}
    )
    disabled = await pair.api.workflow(auth)
    r = await pair.lane.patch(f"/api/workflows/{disabled}", json={"enabled": False}, headers=auth)
    assert r.status_code == 200, r.text
    url = f"/api/workflows/{wf}/executions"
    bad_key = {"Authorization": "Bearer cvk_000000000000_" + "a" * 43}
    served: list[tuple[str, str, dict[str, Any], int]] = [  # answered by the fast lane
        ("POST", url, {"json": {"input": 1}, "headers": bad_key}, 401),
        ("POST", url, {"json": {"input": 1}, "headers": {"Authorization": "Basic x"}}, 401),
        ("POST", url, {"json": {}}, 401),
        ("POST", "/api/workflows/nope/executions", {"json": {}, "headers": auth}, 404),
        ("POST", f"/api/workflows/{disabled}/executions", {"json": {}, "headers": auth}, 409),
        ("POST", f"/api/workflows/{schema_wf}/executions",
         {"json": {"input": {"x": 1}}, "headers": auth}, 422),
        ("POST", url, {"json": {"input": {"k": "a\u0000"}}, "headers": auth}, 422),
        ("POST", f"/api/workflows/{'x' * 65}/executions", {"json": {}, "headers": bad_key}, 401),
    ]  # fmt: skip
    handed: list[tuple[str, str, dict[str, Any], int]] = [  # handed over to FastAPI
        ("POST", url, {"json": {"input": 1, "extra": 2}, "headers": auth}, 422),
        ("POST", url, {"json": [1], "headers": auth}, 422),
        ("POST", url, {"content": b"{nope", "headers": _json(auth)}, 400),
        ("POST", url, {"content": b"\xff", "headers": _json(auth)}, 400),
        ("POST", url, {"content": b"", "headers": _json(auth)}, 202),
        ("POST", url, {"content": b"{}", "headers": {**auth, "Content-Type": "text/plain"}}, 422),
        ("POST", url, {"json": {}, "headers": {**auth, "Idempotency-Key": "k" * 256}}, 422),
        ("POST", f"/api/workflows/{'x' * 65}/executions", {"json": {}, "headers": auth}, 422),
        ("POST", url + "/", {"json": {}, "headers": auth}, 307),
    ]  # fmt: skip
    for method, path, kwargs, status in served + handed:
        r = await pair.both(method, path, **kwargs)
        assert r.status_code == status, (path, kwargs, r.text)
        if status != 307:
            assert r.json()["success"] is (status < 400)
    assert len(pair.handed_over) == len(handed)


async def _seeded_executions(pair: Pair, auth: dict[str, str]) -> tuple[str, list[str]]:
    """Seven executions of one workflow and two of another; one failed with an error and
    an output, one with step runs whose JSON has floats, unicode and nesting."""
    wf = await pair.api.workflow(auth)
    other = await pair.api.workflow(auth)
    ids = []
    for i, target in enumerate([wf] * 7 + [other] * 2):
        r = await pair.lane.post(
            f"/api/workflows/{target}/executions", json={"input": {"n": i}}, headers=auth
        )
        assert r.status_code == 202, r.text
        ids.append(r.json()["data"]["id"])
    now = utcnow()
    odd: Any = [1.5, 1e300, -0.0, 10**20, "é😀\u2028", {"a": {"b": [None, True]}}]
    async with pair.api.ctx.store.engine.begin() as conn:
        await conn.execute(
            executions.update()
            .where(executions.c.id == ids[2])
            .values(status="failed", output=odd, error={"type": "Boom", "message": "x"},
                    started_at=now, finished_at=now, step_errors=[{"attempt": 1}])
        )  # fmt: skip
        tenant = (await conn.execute(executions.select().where(executions.c.id == ids[3]))).one()
        for seq in range(3):
            await conn.execute(
                step_runs.insert().values(
                    execution_id=ids[3], seq=seq, tenant_id=tenant.tenant_id, step_id=f"s{seq}",
                    step_type="noop", status="succeeded", attempts=seq + 1, input={"i": seq},
                    output=odd, output_truncated=seq == 2, error=None, started_at=now,
                    finished_at=now, reused_from=ids[0] if seq == 0 else None,
                )
            )  # fmt: skip
    return wf, ids


async def test_lists_and_details_answer_as_fastapi_does(pair: Pair) -> None:
    auth = await pair.api.tenant()
    wf, ids = await _seeded_executions(pair, auth)
    stranger = await pair.api.tenant("other")
    served: list[tuple[str, dict[str, Any], int]] = [
        ("/api/executions", {}, 200),
        ("/api/executions?limit=200", {}, 200),
        ("/api/executions?status=failed", {}, 200),
        ("/api/executions?status=failed&status=queued&limit=3", {}, 200),
        (f"/api/executions?workflowId={wf}&limit=4", {}, 200),
        ("/api/executions?workflowId=nope", {}, 200),
        ("/api/executions?cursor=bm90LWEtY3Vyc29y", {}, 400),
        *((f"/api/executions?cursor={_cursor(at)}", {}, 400) for at in _UNREACHABLE),
        ("/api/executions", {"headers": {}}, 401),
        (f"/api/executions/{ids[0]}", {"headers": {}}, 401),
        (f"/api/executions/{ids[0]}", {"headers": stranger}, 404),
        ("/api/executions/nope", {}, 404),
        *((f"/api/executions/{eid}", {}, 200) for eid in ids),
    ]
    handed: list[tuple[str, dict[str, Any], int]] = [  # handed over to FastAPI
        ("/api/executions?status=bogus", {}, 422),
        ("/api/executions?status=", {}, 422),
        ("/api/executions?limit=0", {}, 422),
        ("/api/executions?limit=201", {}, 422),
        ("/api/executions?limit=abc", {}, 422),
        ("/api/executions?limit=050", {}, 200),
        ("/api/executions?limit=2&limit=3", {}, 200),
        ("/api/executions?other=1", {}, 200),
        (f"/api/executions?workflowId={'x' * 65}", {}, 422),
        (f"/api/executions?cursor={'x' * 513}", {}, 422),
        (f"/api/executions/{'x' * 65}", {}, 422),
        ("/api/executions/", {}, 307),
    ]
    for path, kwargs, status in served + handed:
        r = await pair.both("GET", path, **{"headers": auth, **kwargs})
        assert r.status_code == status, (path, r.text)
    assert len(pair.handed_over) == len(handed), pair.handed_over

    pages: list[str] = []
    cursor = None  # cursor pages, 2 at a time, through both
    while True:
        params = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        page = (await pair.both("GET", "/api/executions", params=params, headers=auth)).json()
        pages.extend(e["id"] for e in page["data"]["items"])
        cursor = page["data"]["nextCursor"]
        if cursor is None:
            break
    assert pages == ids[::-1]
    detail = (await pair.lane.get(f"/api/executions/{ids[3]}", headers=auth)).json()["data"]
    assert [s["seq"] for s in detail["steps"]] == [0, 1, 2]
    assert detail["steps"][0]["reusedFrom"] == ids[0]
    assert len(pair.handed_over) == len(handed), "the pages and details were served"


async def test_health_and_metrics(pair: Pair) -> None:
    fast = await pair.lane.get("/api/health")
    slow = await pair.plain.get("/api/health")
    assert fast.status_code == slow.status_code == 200
    assert list(fast.headers.keys()) == list(slow.headers.keys())
    assert _shape(fast.json()) == _shape(slow.json())
    assert pair.handed_over == []

    auth = await pair.api.tenant()
    wf = await pair.api.workflow(auth)
    for _ in range(3):
        await pair.lane.post(f"/api/workflows/{wf}/executions", json={}, headers=auth)
    text = (await pair.lane.get("/metrics")).text
    line = f'conveyor_http_requests_total{{method="POST",route="{TRIGGER_ROUTE}",status="202"}}'
    assert f"{line} 3.0" in text
    assert 'route="/api/health",status="200"} 2.0' in text  # the fixture's and this one


async def test_deep_json_answers_as_fastapi_does(pair: Pair) -> None:
    """10,000 levels were a ``RecursionError`` in the lane (500; FastAPI: 400), and 256 to
    about 930 levels a 500 on both paths (the execution stored, then pydantic refused to
    serialise its input). Every depth past the limit is now one 400, from the lane itself."""
    auth = await pair.api.tenant()
    wf = await pair.api.workflow(auth)
    url = f"/api/workflows/{wf}/executions"
    prefix = b'{"input":'  # the body's object is the first level
    for depth in (10_000, 1_000, 300, 256, MAX_JSON_DEPTH):
        body = prefix + b"[" * depth + b"]" * depth + b"}"
        r = await pair.both("POST", url, content=body, headers=_json(auth))
        assert r.status_code == 400, (depth, r.text)
        error = r.json()["error"]
        assert error["code"] == "malformed_json"
        column = len(prefix) + MAX_JSON_DEPTH  # the first "[" at level MAX_JSON_DEPTH + 1
        assert error["details"] == [
            {
                "line": 1,
                "column": column,
                "message": f"Arrays and objects are nested deeper than {MAX_JSON_DEPTH} levels.",
            }
        ]
    depth = MAX_JSON_DEPTH - 1
    body = prefix + b"[" * depth + b"]" * depth + b"}"
    r = await pair.both("POST", url, content=body, headers=_json(auth))
    assert r.status_code == 202, r.text
    assert pair.handed_over == [], "the lane answered all of them"


async def test_metrics_label_lane_requests_with_their_route(pair: Pair) -> None:
    """What the lane answers (or hands over) counts under the route template, exactly as the
    same requests through FastAPI do — ``unmatched`` was the label of a lane answer given
    before the route was entered (the 500 of a ``RecursionError``)."""
    auth = await pair.api.tenant()
    wf = await pair.api.workflow(auth)
    url = f"/api/workflows/{wf}/executions"
    requests: list[dict[str, Any]] = [
        {"json": {}, "headers": auth},  # served: 202
        {"json": {}},  # served: 401
        {"json": {"input": 1, "extra": 2}, "headers": auth},  # handed over: 422
        {"content": b"{nope", "headers": _json(auth)},  # handed over: 400
        {"content": b"[" * 10_000, "headers": _json(auth)},  # the depth limit: 400
    ]
    for kwargs in requests:
        await pair.both("POST", url, **kwargs)
    lane, plain = await _trigger_counts(pair.lane), await _trigger_counts(pair.plain)
    assert lane == plain
    assert lane == {
        (TRIGGER_ROUTE, "202"): 1.0,
        (TRIGGER_ROUTE, "401"): 1.0,
        (TRIGGER_ROUTE, "422"): 1.0,
        (TRIGGER_ROUTE, "400"): 2.0,
    }


async def test_a_body_limit_hit_inside_the_lane_answers_as_fastapi_does(
    api_env: dict[str, str],
) -> None:
    """A body longer than its ``Content-Length`` crosses the body limit while the lane reads
    it: the lane answers the 413 with FastAPI's handler (the same bytes) under the route."""
    settings = make_settings(**{**api_env, "API_MAX_BODY_BYTES": "1000"})
    async with open_context(settings, heartbeat=False) as ctx:
        lane_app = create_app(settings, context=ctx)
        plain_app = _without_lane(settings, ctx)
        async with _client(lane_app) as lane, _client(plain_app) as plain:
            answers = [
                await _raw_post(app, b"{" + b" " * 2000 + b"}") for app in (lane_app, plain_app)
            ]
            assert answers[0] == answers[1]
            assert answers[0][0]["status"] == 413
            assert json.loads(answers[0][1]["body"])["error"]["code"] == "payload_too_large"
            assert await _trigger_counts(lane) == {(TRIGGER_ROUTE, "413"): 1.0}
            assert await _trigger_counts(plain) == {(TRIGGER_ROUTE, "413"): 1.0}


async def _raw_post(app: FastAPI, body: bytes) -> list[Message]:
    """POST ``body`` to the trigger route claiming a 2-byte ``Content-Length``."""
    path = "/api/workflows/w/executions"
    scope: Scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [(b"content-type", b"application/json"), (b"content-length", b"2")],
        "client": ("127.0.0.1", 1234),
        "server": ("api", 80),
    }
    sent: list[Message] = []
    messages: list[Message] = [{"type": "http.request", "body": body, "more_body": False}]

    async def receive() -> Message:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        sent.append(message)

    await app(scope, receive, send)
    return sent


async def _trigger_counts(client: httpx.AsyncClient) -> dict[tuple[str, str], float]:
    """``conveyor_http_requests_total`` of POST requests, by (route, status)."""
    text = (await client.get("/metrics")).text
    return {
        (sample.labels["route"], sample.labels["status"]): sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "conveyor_http_requests"
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels["method"] == "POST"
        if sample.labels["route"] in (TRIGGER_ROUTE, "unmatched")
    }


def _json(headers: dict[str, str]) -> dict[str, str]:
    return {**headers, "Content-Type": "application/json"}


def _shape(value: Any) -> Any:
    """Keys and value types, recursively (health reports live latencies and times)."""
    if isinstance(value, dict):
        return {k: _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return type(value).__name__ if value is not None else None


def test_pattern_sanity() -> None:
    body = json.dumps({"id": "x", "createdAt": "t", "keep": 1}).replace(" ", "").encode()
    assert _FRESH.sub(b"", body) == b'{,,"keep":1}'


_UNREACHABLE = (
    "0001-01-01T00:00:00+00:00",  # walking back a day from it overflows
    "0001-01-01T00:30:00+01:00",  # in UTC, before year 1
    "9999-12-31T23:59:59-01:00",  # in UTC, after year 9999
    "1969-12-31T23:59:59+00:00",  # before any row
)
"""Cursor times no list makes (a crafted cursor): 400 ``invalid_cursor``, never a 500."""


def _cursor(at: str, row_id: str = "x") -> str:
    raw = json.dumps([at, row_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")
