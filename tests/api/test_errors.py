"""One error shape everywhere; body limits; an enqueue that fails still answers 202 and keeps the row."""

from __future__ import annotations

import json
import time
from collections.abc import MutableMapping
from typing import Any

import httpx
import pytest

from conveyor.api.middleware import BodyLimitMiddleware
from tests.api._support import restartable_redis
from tests.api.conftest import ADMIN, Api, make_settings, running_api


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
