"""Secrets end to end through real processes (``conveyor api`` + ``conveyor worker``, DEBUG
logs): an ``http`` step sends secrets in its URL, headers and body to a local server that
echoes the request back (body and response headers). The server receives the real values;
no API answer, no log line, no column of any table and no Redis key of the test shows them.
Tenant B cannot use tenant A's secret."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import quote, quote_plus, unquote

import httpx
import pytest
import redis

from conveyor.settings import load_settings
from conveyor.store import asyncpg_dsn, migrate
from tests.api.conftest import ADMIN
from tests.conftest import REDIS_HOST, REDIS_PORT
from tests.helpers import env_for, free_port, process, tenant_auth, wait_api_ready, wait_for

pytestmark = pytest.mark.slow

# The random cores are what the checks look for: any form of a value (raw, percent-encoded,
# JSON-escaped) contains its core, and nothing else in the test can.
TOKEN_CORE = secrets.token_hex(12)
PASSWORD_CORE = secrets.token_hex(12)
TOKEN = f"tk_{TOKEN_CORE}+/="
PASSWORD = f'pw {PASSWORD_CORE} "quoted" \u00e9'


class _Echo(BaseHTTPRequestHandler):
    """Answers every request with the request itself: JSON body, and the ``X-Token`` header
    it got back as ``X-Request-Id`` (a response header http steps keep). ``/fail/...`` answers
    400 with the same body (the step's error quotes it)."""

    seen: list[dict[str, Any]] = []
    protocol_version = "HTTP/1.1"

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length).decode() if length else ""
        headers = {k.lower(): v.encode("latin-1").decode() for k, v in self.headers.items()}
        request = {"method": self.command, "path": self.path, "headers": headers, "body": body}
        _Echo.seen.append(request)
        payload = json.dumps(request).encode()
        self.send_response(400 if self.path.startswith("/fail/") else 200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("X-Request-Id", headers.get("x-token", ""))
        self.end_headers()
        self.wfile.write(payload)

    do_GET = do_POST = _handle

    def log_message(self, format: str, *args: Any) -> None:
        return


@contextmanager
def echo_server() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _http_step(port: int, path: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": "call",
        "type": "http",
        "method": "POST",
        "url": f"http://127.0.0.1:{port}/{path}/{{{{ secrets.TOKEN }}}}?pw={{{{ secrets.PASSWORD }}}}",
        "headers": {
            "Authorization": "Bearer {{ secrets.TOKEN }}",
            "X-Token": "{{ secrets.TOKEN }}",
            "X-Plain": "{{ secrets.PASSWORD }}",
        },
        "body": {"password": "{{ secrets.PASSWORD }}", "note": ["token={{ secrets.TOKEN }}"]},
        **extra,
    }


def workflows(port: int) -> dict[str, dict[str, Any]]:
    return {
        "ok": {
            "name": "uses-secrets",
            "steps": [
                _http_step(port, "echo"),
                {
                    "id": "copy",
                    "type": "transform",
                    "expression": '{echo: steps.call.body, id: steps.call.headers."x-request-id"}',
                },
            ],
        },
        "fails": {
            "name": "fails-with-secrets",
            "steps": [_http_step(port, "fail", retry={"attempts": 1})],
        },
    }


def _forbidden() -> list[str]:
    return [TOKEN_CORE, PASSWORD_CORE]


def _assert_clean(where: str, content: str) -> None:
    for core in _forbidden():
        at = content.find(core)
        assert at < 0, f"a secret appears in {where}: ...{content[max(at - 300, 0) : at + 60]}"


async def _dump_database(url: str) -> str:
    """Every column of every table, as text."""
    import asyncpg  # type: ignore[import-untyped]

    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        query = "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        names = [row[0] for row in await conn.fetch(query)]
        assert {"executions", "step_runs", "secrets", "workflow_versions"} <= set(names)
        parts = []
        for name in names:
            rows = await conn.fetch(f'SELECT * FROM "{name}"')
            parts.append(f"{name}: {json.dumps([list(r.values()) for r in rows], default=str)}")
    finally:
        await conn.close()
    return "\n".join(parts)


def _dump_redis(prefix: str) -> str:
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, decode_responses=False)
    parts: list[str] = []
    try:
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            kind = str(client.type(key), "ascii")  # type: ignore[arg-type]
            if kind == "string":
                value: Any = client.get(key)
            elif kind == "hash":
                value = client.hgetall(key)
            elif kind == "list":
                value = client.lrange(key, 0, -1)
            elif kind == "set":
                value = client.smembers(key)
            elif kind == "zset":
                value = client.zrange(key, 0, -1, withscores=True)
            elif kind == "stream":
                value = client.xrange(key)
            else:
                value = kind
            parts.append(f"{key!r}: {value!r}")
    finally:
        client.close()
    return "\n".join(parts)


def test_secrets_reach_the_target_and_nothing_else(
    api_env: dict[str, str], fresh_pg_url: str, tmp_path: Path
) -> None:
    asyncio.run(migrate(load_settings({"DATABASE_URL": fresh_pg_url})))
    api_port = free_port()
    key = base64.b64encode(os.urandom(32)).decode()
    _Echo.seen.clear()
    responses: list[str] = []
    with echo_server() as echo_port, ExitStack() as stack:
        env = env_for(**{**api_env, "DATABASE_URL": fresh_pg_url, "API_PORT": str(api_port),
                         "EXECUTION_REGIONS": "us", "SECRETS_KEY": key, "LOG_LEVEL": "DEBUG",
                         "HTTP_ALLOWLIST": f"127.0.0.1:{echo_port}"})  # fmt: skip
        api_log, worker_log = tmp_path / "api.log", tmp_path / "worker.log"
        api = stack.enter_context(process(["-m", "conveyor.cli", "api"], env, api_log))
        worker = stack.enter_context(process(["-m", "conveyor.cli", "worker"], env, worker_log))
        client = stack.enter_context(
            httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=10)
        )

        def call(method: str, path: str, auth: dict[str, str], **kw: Any) -> httpx.Response:
            response = client.request(method, path, headers=auth, **kw)
            responses.append(f"{method} {path} -> {response.status_code} {response.text}")
            return response

        wait_api_ready(client, api, api_log)
        a, b = tenant_auth(client, "a", ADMIN), tenant_auth(client, "b", ADMIN)
        for name, value in (("TOKEN", TOKEN), ("PASSWORD", PASSWORD)):
            r = call("POST", "/api/secrets", a, json={"name": name, "value": value})
            assert r.status_code == 201, r.text
        assert [s["name"] for s in call("GET", "/api/secrets", a).json()["data"]] == [
            "PASSWORD",
            "TOKEN",
        ]

        ids: dict[str, str] = {}
        for tenant, auth in (("a", a), ("b", b)):
            for kind, doc in workflows(echo_port).items():
                wf = call("POST", "/api/workflows", auth, json=doc)
                assert wf.status_code == 201, wf.text
                wf_id = wf.json()["data"]["id"]
                run = call("POST", f"/api/workflows/{wf_id}/executions", auth, json={"input": {}})
                assert run.status_code == 202, run.text
                ids[f"{tenant}-{kind}"] = run.json()["data"]["id"]

        def finished(name: str, auth: dict[str, str]) -> dict[str, Any]:
            def done() -> dict[str, Any] | None:
                r = client.get(f"/api/executions/{ids[name]}", headers=auth)
                data: dict[str, Any] = r.json()["data"]
                return data if data["status"] in ("succeeded", "failed") else None

            wait_for(done, timeout=30, interval=0.1)
            return call("GET", f"/api/executions/{ids[name]}", auth).json()["data"]  # type: ignore[no-any-return]

        ok = finished("a-ok", a)
        assert worker.poll() is None, worker_log.read_text()[-3000:]
        assert ok["status"] == "succeeded", ok
        failed = finished("a-fails", a)
        assert failed["status"] == "failed", failed
        b_ok, b_fails = finished("b-ok", b), finished("b-fails", b)
        for denied in (b_ok, b_fails):  # tenant b has no TOKEN: nothing was sent for it
            assert denied["status"] == "failed"
            assert "secret 'PASSWORD' is not defined" in denied["error"]["message"]
        call("GET", "/api/executions", a)
        call("GET", "/api/executions", b)
        call("GET", "/api/executions?status=failed", a)

        # the target got the real values, twice (tenant a's two executions)
        assert len(_Echo.seen) == 2, _Echo.seen
        for seen in _Echo.seen:
            path, _, query = seen["path"].partition("?")
            assert unquote(path.rsplit("/", 1)[1]) == TOKEN
            assert unquote(query.removeprefix("pw=")) == PASSWORD
            assert seen["headers"]["authorization"] == f"Bearer {TOKEN}"
            assert seen["headers"]["x-token"] == TOKEN
            assert seen["headers"]["x-plain"] == PASSWORD
            assert json.loads(seen["body"]) == {"password": PASSWORD, "note": [f"token={TOKEN}"]}

        # what was recorded shows [secret] where the values were, echoes included
        call_run = ok["steps"][0]
        assert call_run["input"]["url"].endswith("/[secret]?pw=[secret]")
        assert call_run["input"]["headers"]["X-Plain"] == "[secret]"
        # credential-named headers were already redacted whole
        assert call_run["input"]["headers"]["X-Token"] == "[redacted]"
        assert call_run["input"]["headers"]["Authorization"] == "[redacted]"
        assert call_run["input"]["body"] == {"password": "[secret]", "note": ["token=[secret]"]}
        echoed = call_run["output"]["body"]
        assert echoed["headers"]["x-token"] == "[secret]"
        assert echoed["headers"]["authorization"] == "Bearer [secret]"
        assert json.loads(echoed["body"]) == {"password": "[secret]", "note": ["token=[secret]"]}
        assert call_run["output"]["headers"]["x-request-id"] == "[secret]"
        assert ok["steps"][1]["output"]["id"] == "[secret]"
        assert "[secret]" in failed["error"]["message"]  # HTTP 400 from <url>, redacted
        assert "[secret]" in failed["steps"][0]["error"]["details"]["body"]

    _assert_clean("the API's answers", "\n".join(responses))
    for log in (api_log, worker_log):
        content = log.read_text()
        assert "http.response" in content or log is api_log  # DEBUG lines were written
        _assert_clean(log.name, content)
    _assert_clean("the database", asyncio.run(_dump_database(fresh_pg_url)))
    redis_dump = _dump_redis(api_env["QUEUE_PREFIX"])
    assert "workflow.execute.us" in redis_dump  # the queues' keys were read
    _assert_clean("Redis", redis_dump)
    # and the values really are somewhere: encrypted in the secrets table (sanity of the dump)
    dump = asyncio.run(_dump_database(fresh_pg_url))
    assert "secrets: [[" in dump and quote(TOKEN, safe="") not in dump
    assert quote_plus(PASSWORD) not in dump
