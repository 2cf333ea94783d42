"""One error shape everywhere; body limits; an enqueue that fails still answers 202 and keeps the row."""

from __future__ import annotations

import json
import re
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conveyor.api.errors import text_position
from conveyor.api.middleware import MAX_JSON_DEPTH, BodyLimitMiddleware, too_deep_at
from tests.api._support import restartable_redis
from tests.api.conftest import ADMIN, NOOP_WORKFLOW, Api, make_settings, running_api


def _shape(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"success", "error"} and body["success"] is False
    assert set(body["error"]) == {"code", "message", "details"}
    assert body["error"]["code"] == code, body
    return body["error"]  # type: ignore[no-any-return]


async def test_routing_errors_have_the_shape(api: Api) -> None:
    _shape(await api.client.get("/nope"), 404, "not_found")
    _shape(await api.client.get("/api/nope"), 404, "not_found")
    r = await api.client.delete("/api/health")
    _shape(r, 405, "method_not_allowed")
    assert "GET" in r.headers["allow"]


async def test_validation_errors_point_at_the_field(api: Api) -> None:
    err = _shape(await api.client.post("/api/admin/tenants", json={"name": ""}, headers=ADMIN),
                 422, "validation_error")  # fmt: skip
    assert err["details"][0]["field"] == "name"
    assert err["message"].startswith("name:")
    err = _shape(await api.client.post("/api/admin/tenants", json={"nam": "x"}, headers=ADMIN),
                 422, "validation_error")  # fmt: skip
    assert {d["field"] for d in err["details"]} == {"name", "nam"}
    err = _shape(await api.client.get("/api/admin/tenants", params={"limit": 0}, headers=ADMIN),
                 422, "validation_error")  # fmt: skip
    assert err["details"][0]["field"] == "query.limit"


async def test_malformed_json_is_400(api: Api) -> None:
    auth = await api.tenant()
    for content in (b"{", b"\xff\xfe", b'{"name": "x",}'):
        r = await api.client.post(
            "/api/workflows", content=content, headers={**auth, "Content-Type": "application/json"}
        )
        _shape(r, 400, "malformed_json")


@dataclass
class JsonRoutes:
    """Every route that takes a JSON body, as (method, path, headers); the webhooks last."""

    routes: list[tuple[str, str, dict[str, str]]]
    workflow_id: str
    auth: dict[str, str]


async def _json_routes(api: Api) -> JsonRoutes:
    auth = await api.tenant()
    r = await api.client.post("/api/workflows", json=NOOP_WORKFLOW, headers=auth)
    wf, secret = r.json()["data"]["id"], r.json()["data"]["webhookSecret"]
    r = await api.client.post(
        "/api/schedules", json={"workflowId": wf, "cron": "0 9 * * *"}, headers=auth
    )
    schedule = r.json()["data"]["id"]
    tenants = (await api.client.get("/api/admin/tenants", headers=ADMIN)).json()["data"]["items"]
    routes = [
        ("POST", "/api/admin/tenants", ADMIN),
        ("POST", f"/api/admin/tenants/{tenants[0]['id']}/api-keys", ADMIN),
        ("POST", "/api/workflows", auth),
        ("PUT", f"/api/workflows/{wf}", auth),
        ("PATCH", f"/api/workflows/{wf}", auth),
        ("POST", f"/api/workflows/{wf}/executions", auth),  # the fast lane
        ("POST", "/api/schedules", auth),
        ("PATCH", f"/api/schedules/{schedule}", auth),
        ("POST", f"/api/webhooks/{wf}", {"X-Webhook-Secret": secret}),
        ("POST", f"/api/webhooks/{wf}/{secret}", {}),
    ]
    return JsonRoutes(routes, wf, auth)


async def test_parse_errors_are_malformed_json_with_line_and_column_everywhere(api: Api) -> None:
    """One code on every route, and where the parser stopped (it was ``bad_request`` for bytes
    that are not UTF-8, and ``"field": "13"``, a character offset, for a syntax error)."""
    deep = f"Arrays and objects are nested deeper than {MAX_JSON_DEPTH} levels."
    bodies: list[tuple[bytes, list[dict[str, Any]]]] = [
        (b'{"name": "x" "steps": []}', [{"line": 1, "column": 14,
                                         "message": "Expecting ',' delimiter"}]),
        (b'{\n  "input": [1,\n    2,,\n  ]}', [{"line": 3, "column": 7,
                                              "message": "Expecting value"}]),
        (b'{"name": "\xc3\xa9t\xc3\xa9 \xff"}', [{"line": 1, "column": 15,
                                               "message": "Not valid UTF-8: invalid start byte"}]),
        (b'{"a": ' + b"[" * 500, [{"line": 1, "column": 6 + MAX_JSON_DEPTH, "message": deep}]),
        (b'{"n": ' + b"1" * 5000 + b"}", [{"message": "Exceeds the limit (4300 digits) for "
                                         "integer string conversion: value has 5000 digits"}]),
    ]  # fmt: skip
    for method, path, headers in (await _json_routes(api)).routes:
        for body, details in bodies:
            r = await api.client.request(
                method, path, content=body, headers={**headers, "Content-Type": "application/json"}
            )
            error = _shape(r, 400, "malformed_json")
            assert error["details"] == details, (method, path, body[:20])


async def test_unknown_top_level_fields_are_validation_error_everywhere(api: Api) -> None:
    """FastAPI's answer for its request models, now also for the workflow definition (which
    the store validates: it answered ``workflow_invalid``). The webhooks take any JSON."""
    json_routes = await _json_routes(api)
    bodies: list[dict[str, Any]] = [  # valid bodies, in the order of the routes
        {"name": "acme"},
        {"name": "ci"},
        NOOP_WORKFLOW,
        NOOP_WORKFLOW,
        {"enabled": True},
        {"input": 1},
        {"workflowId": json_routes.workflow_id, "cron": "0 9 * * *"},
        {"cron": "0 10 * * *"},
    ]
    extra = {"field": "colour", "location": "body", "type": "extra_forbidden",
             "message": "Extra inputs are not permitted"}  # fmt: skip
    for (method, path, headers), body in zip(json_routes.routes[:-2], bodies, strict=True):
        r = await api.client.request(method, path, json={**body, "colour": "red"}, headers=headers)
        assert extra in _shape(r, 422, "validation_error")["details"], (method, path)
    # Inside a step, an unknown field stays a problem of the definition.
    bad_step = {"name": "x", "steps": [{"id": "a", "type": "noop", "colour": "red"}]}
    r = await api.client.post("/api/workflows", json=bad_step, headers=json_routes.auth)
    assert _shape(r, 422, "workflow_invalid")["details"][0]["step"] == "a"


def _reference_depth(body: bytes, limit: int) -> int | None:
    """The first opener deeper than ``limit``, one token at a time (closers at the top and
    everything after an unterminated string are ignored, as by :func:`too_deep_at`)."""
    depth = 0
    for match in re.finditer(rb'"(?:[^"\\]|\\.?)*(?:"|\Z)|[\[\]{}]', body, re.DOTALL):
        token = match.group()
        if token in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return match.start()
        elif token in (b"]", b"}"):
            depth = max(depth - 1, 0)
    return None


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(
    body=st.lists(st.sampled_from([b"[", b"{", b"]", b"}", b'"', b"\\", b"a", b":", b"\n"]),
                  max_size=60).map(b"".join),
    limit=st.integers(1, 6),
)  # fmt: skip
def test_the_depth_scan_finds_the_first_bracket_too_deep(body: bytes, limit: int) -> None:
    assert too_deep_at(body, limit) == _reference_depth(body, limit)


def test_the_depth_scan_is_linear() -> None:
    """Its worst cases (dense brackets, escaped quotes after an unterminated string) take one
    pass: a quadratic scan would take minutes on a mebibyte."""
    for body in (b"[]" * 400_000 + b"[" * 200, b'"' + b'\\"' * 300_000 + b"[" * 200,
                 (b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH) * 3000):  # fmt: skip
        started = time.perf_counter()
        too_deep_at(body, MAX_JSON_DEPTH)
        assert time.perf_counter() - started < 2.0


def test_text_position_counts_characters() -> None:
    assert text_position("ab\ncd", 4) == (2, 2)
    assert text_position("é\n😀x".encode(), len("é\n😀".encode())) == (2, 2)
    assert text_position(b"", 0) == (1, 1)


@pytest.mark.parametrize(
    ("content_type", "body", "status"),
    [
        (b"application/json", b"[" * 200, 400),
        (b"application/vnd.api+json", b"{" * 200, 400),
        (None, b"[" * 200, 400),  # webhooks parse a body without a content type
        (b"application/json", ("[" * 200).encode("utf-16"), 400),  # decoded first, as json does
        (b"text/plain", b"[" * 200, 200),  # never parsed as JSON
        (b"application/json", b'["' + b"[" * 200 + b'"]', 200),  # brackets in a string
        (b"application/json", b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH, 200),
    ],
)
async def test_the_depth_limit_applies_to_json_bodies(
    content_type: bytes | None, body: bytes, status: int
) -> None:
    """The middleware checks when the last chunk is read, before any parser (here: none)."""
    sent: list[dict[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    chunks = [body[:7], body[7:]]

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    headers = [] if content_type is None else [(b"content-type", content_type)]
    middleware = BodyLimitMiddleware(app, max_bytes=1 << 20)
    await middleware({"type": "http", "headers": headers}, receive, send)
    assert sent[0]["status"] == status
    if status == 400:
        assert json.loads(sent[1]["body"])["error"]["code"] == "malformed_json"


async def test_body_over_the_limit_is_413(api_env: dict[str, str]) -> None:
    settings = make_settings(**{**api_env, "API_MAX_BODY_BYTES": "1000"})
    async with running_api(settings) as api:
        auth = await api.tenant()
        big = json.dumps({"input": "x" * 2000})
        r = await api.client.post(
            "/api/workflows/w/executions",
            content=big,
            headers={**auth, "Content-Type": "application/json"},
        )
        err = _shape(r, 413, "payload_too_large")
        assert err["details"] == {"limitBytes": 1000}

        async def chunks() -> Any:  # no Content-Length: counted while received
            for _ in range(10):
                yield b"x" * 500

        r = await api.client.post(
            "/api/workflows", content=chunks(), headers={**auth, "Content-Type": "application/json"}
        )
        _shape(r, 413, "payload_too_large")
        small = await api.client.post("/api/admin/tenants", json={"name": "ok"}, headers=ADMIN)
        assert small.status_code == 201


async def test_body_limit_stops_reading_early() -> None:
    """The middleware never reads much past the limit, however big the body."""
    reads = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal reads
        reads += 1
        return {"type": "http.request", "body": b"x" * 65536, "more_body": reads < 1000}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    async def app(scope: Any, receive: Any, send: Any) -> None:
        while True:  # an app that reads the whole body
            message = await receive()
            if not message.get("more_body"):
                break

    middleware = BodyLimitMiddleware(app, max_bytes=1024 * 1024)
    await middleware({"type": "http", "headers": []}, receive, send)
    assert sent[0]["status"] == 413
    assert reads == 17, "stops at the first chunk over 1 MiB (of ~64 MiB sent)"


@pytest.mark.parametrize("length", [b"abc", b"-1x"])
async def test_bad_content_length_is_400(length: bytes) -> None:
    sent: list[dict[str, Any]] = []

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    async def app(scope: Any, receive: Any, send: Any) -> None:
        raise AssertionError("not reached")

    middleware = BodyLimitMiddleware(app, max_bytes=10)
    await middleware({"type": "http", "headers": [(b"content-length", length)]}, None, send)  # type: ignore[arg-type]
    assert sent[0]["status"] == 400


async def test_enqueue_failure_is_a_fast_202_and_keeps_the_execution(
    api_env: dict[str, str],
) -> None:
    """Redis down: the committed execution is the successful trigger (202, queued) — see
    tests/api/test_trigger_without_redis.py for the reconciler picking it up."""
    with restartable_redis() as server:
        settings = make_settings(**{**api_env, "QUEUE_REDIS_PORT": str(server.port)})
        async with running_api(settings) as api:
            auth = await api.tenant()
            wf = await api.workflow(auth)
            headers = {**auth, "Idempotency-Key": "k1"}
            server.stop()
            started = time.monotonic()
            r = await api.client.post(f"/api/workflows/{wf}/executions", json={"input": 5},
                                      headers=headers)  # fmt: skip
            assert time.monotonic() - started < 4.0
            assert r.status_code == 202, r.text
            execution_id = r.json()["data"]["id"]
            got = await api.client.get(f"/api/executions/{execution_id}", headers=auth)
            assert got.json()["data"]["status"] == "queued", "kept for the reconciler"

            server.start()
            r = await api.client.post(f"/api/workflows/{wf}/executions", json={"input": 5},
                                      headers=headers)  # fmt: skip
            assert r.status_code == 200 and r.json()["data"]["id"] == execution_id
            state = await api.ctx.execution_queue("us").get_job_state(execution_id)
            assert state in ("waiting", "prioritized"), "the replay enqueued it"


async def test_nul_characters_are_refused_not_500(api: Api) -> None:
    """Postgres cannot store U+0000 in text/jsonb: the answer is 422, not a 500."""
    auth = await api.tenant()
    wf = await api.workflow(auth)
    attempts = [
        ("POST", "/api/admin/tenants", {"name": "a\u0000b"}, ADMIN, {}),
        ("POST", f"/api/workflows/{wf}/executions", {"input": {"k": "a\u0000"}}, auth, {}),
        ("POST", f"/api/workflows/{wf}/executions", {"input": {"k\u0000": 1}}, auth, {}),
        ("POST", "/api/workflows", {"name": "x\u0000", "steps": [{"id": "a", "type": "noop"}]},
         auth, {}),
        ("GET", "/api/executions/a%00b", None, auth, {}),
        ("GET", "/api/executions", None, auth, {"workflowId": "a\u0000"}),
        ("GET", "/api/executions", None, auth, {"cursor": "a\u0000"}),
        ("POST", "/api/schedules", {"workflowId": wf, "cron": "* * * * *",
                                    "input": "\u0000"}, auth, {}),
    ]  # fmt: skip
    for method, path, body, headers, params in attempts:
        r = await api.client.request(method, path, json=body, headers=headers, params=params)
        assert 400 <= r.status_code < 500, (method, path, r.status_code, r.text)
        assert r.json()["success"] is False
