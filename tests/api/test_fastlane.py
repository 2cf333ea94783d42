"""The fast lane (``conveyor.api.fastlane``) answers exactly as FastAPI does.

Two applications share one context: the real one (with the fast lane) and a copy without it.
Every request goes to both; the answers must be byte-identical (ids and timestamps of freshly
created executions aside), and the fast lane must actually serve the common case.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from starlette.types import ASGIApp, Receive, Scope, Send

from conveyor.api.app import create_app
from conveyor.api.context import ApiContext, open_context
from conveyor.api.fastlane import FastLane
from tests.api.conftest import NOOP_WORKFLOW, Api, make_settings

TRIGGER_ROUTE = "/api/workflows/{workflow_id}/executions"
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
    """Wraps the application behind the fast lane: records the trigger and health requests
    it hands over (other routes always go there)."""

    def __init__(self, app: ASGIApp, seen: list[str]) -> None:
        self.app, self.seen = app, seen

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = str(scope.get("path"))
        if path.endswith(("/executions", "/executions/")) or path == "/api/health":
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
