"""An ``http`` step through the engine against a local server (allow-listed)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conveyor.engine import Engine, OutcomeKind
from conveyor.settings import Settings
from conveyor.store import Store
from tests.engine._support import start
from tests.store._fixtures import settings_for


class _Handler(BaseHTTPRequestHandler):
    hits: list[str] = []

    def do_GET(self) -> None:
        _Handler.hits.append(self.path)
        body = json.dumps({"path": self.path, "total": 150}).encode()
        if self.path == "/odd":  # a lone surrogate escape: valid JSON text, not storable
            body = b'{"note": "caf\\udce9", "ok": true}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("x-request-id", "caf\u00e9")  # sent as ISO-8859-1: one byte 0xe9
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


async def test_http_step_output_feeds_later_steps(
    store: Store, settings: Settings, server: str
) -> None:
    allowed = settings_for(settings.database_url, http_allowlist="127.0.0.1")
    _Handler.hits.clear()
    tenant, execution_id = await start(
        store,
        [
            {
                "id": "fetch",
                "type": "http",
                "url": server + "/orders/{{ input.id }}",
                "timeout_s": 10,
            },
            {
                "id": "big",
                "type": "condition",
                "expression": "steps.fetch.body.total > `100`",
                "then": "continue",
                "else": "end",
            },
            {"id": "pick", "type": "transform", "expression": "steps.fetch.body.path"},
        ],
        {"id": 7},
    )
    async with Engine(store, allowed) as engine:
        outcome = await engine.run(execution_id)
    assert outcome.kind is OutcomeKind.SUCCEEDED, outcome
    done = await store.executions.get(tenant, execution_id, with_steps=True)
    assert done.output == "/orders/7" and _Handler.hits == ["/orders/7"]
    assert done.steps[0].output["status"] == 200


async def test_refused_address_fails_without_retry(
    store: Store, settings: Settings, server: str
) -> None:
    tenant, execution_id = await start(
        store, [{"id": "fetch", "type": "http", "url": server + "/x", "retry": {"attempts": 3}}]
    )
    async with Engine(store, settings) as engine:  # no allow-list: loopback is refused
        outcome = await engine.run(execution_id)
    assert outcome.kind is OutcomeKind.FAILED
    (step,) = await store.executions.step_runs(tenant, execution_id)
    assert step.attempts == 1 and step.error["type"] == "PermanentStepError"


async def test_odd_text_in_an_answer_is_stored_not_fatal(
    store: Store, settings: Settings, server: str
) -> None:
    """A header byte that is not UTF-8 reads as ISO-8859-1; a lone surrogate escape in the JSON
    body (no backend stores one) becomes U+FFFD. The step succeeds and is stored once."""
    allowed = settings_for(settings.database_url, http_allowlist="127.0.0.1")
    _Handler.hits.clear()
    tenant, execution_id = await start(
        store, [{"id": "odd", "type": "http", "url": server + "/odd"}]
    )
    async with Engine(store, allowed) as engine:
        outcome = await engine.run(execution_id)
    assert outcome.kind is OutcomeKind.SUCCEEDED, outcome
    done = await store.executions.get(tenant, execution_id, with_steps=True)
    (step,) = done.steps
    assert step.output["headers"]["x-request-id"] == "caf\u00e9"
    assert step.output["body"] == {"note": "caf\ufffd", "ok": True}
    assert _Handler.hits == ["/odd"]


async def test_odd_text_in_a_step_error_is_stored_not_fatal(
    store: Store, settings: Settings, server: str
) -> None:
    """A ``select`` that fails on the raw answer quotes the lone surrogate in its message: the
    step fails (for good) and its error is stored with U+FFFD, the execution ends ``failed``."""
    allowed = settings_for(settings.database_url, http_allowlist="127.0.0.1")
    tenant, execution_id = await start(
        store, [{"id": "odd", "type": "http", "url": server + "/odd", "select": "abs(body.note)"}]
    )
    async with Engine(store, allowed) as engine:
        outcome = await engine.run(execution_id)
    assert outcome.kind is OutcomeKind.FAILED, outcome
    done = await store.executions.get(tenant, execution_id, with_steps=True)
    (step,) = done.steps
    assert step.status == "failed" and "caf\ufffd" in step.error["message"]
    assert done.error is not None and "caf\ufffd" in done.error["message"]
