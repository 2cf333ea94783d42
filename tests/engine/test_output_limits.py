"""Outputs that cannot be stored fail their step; ``select`` keeps only what later steps need.

The fixtures set ``STEP_OUTPUT_MAX_BYTES`` to 4096.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from conveyor.engine import Engine, OutcomeKind
from conveyor.engine._plan import describe_error
from conveyor.errors import PermanentStepError
from conveyor.settings import Settings
from conveyor.store import Store, dumps, has_nul
from conveyor.workflows import StepContext, StepResult
from tests.engine._support import Recorder, slow_step, start
from tests.store._fixtures import settings_for

BLOB = "é" * 5000
BLOB_BYTES = len(json.dumps(BLOB, ensure_ascii=False).encode())  # 10,002


def _too_large(step: str, size: int, limit: int, hint: str | None) -> dict[str, Any]:
    message = (
        f"step {step!r} produced {size:,} bytes of output; the limit is {limit:,} "
        "(STEP_OUTPUT_MAX_BYTES)"
    )
    return {
        "type": "OutputTooLarge",
        "code": "output_too_large",
        "message": message if hint is None else f"{message}: {hint}",
        "details": {"size_bytes": size, "limit_bytes": limit},
    }


async def test_an_output_above_the_limit_fails_the_step_for_good(
    store: Store, settings: Settings
) -> None:
    assert settings.step_output_max_bytes == 4096
    tenant, execution_id = await start(
        store,
        [
            {
                "id": "fetch",
                "type": "transform",
                "expression": "input.blob",
                "retry": {"attempts": 3, "delay_s": 0},
            },
            {"id": "later", "type": "transform", "expression": "steps.fetch"},
        ],
        {"blob": BLOB},
    )
    recorder = Recorder()
    outcome = await Engine(store, settings, step_runner=recorder).run(execution_id)
    assert outcome.kind is OutcomeKind.FAILED
    assert recorder.calls == {"fetch": 1}  # permanent: the retry policy does not try again

    failed = await store.executions.get(tenant, execution_id, with_steps=True)
    expected = _too_large(
        "fetch", BLOB_BYTES, 4096, "keep only what later steps need with `select`"
    )
    assert failed.status == "failed" and failed.output is None
    assert failed.error == {"step": "fetch", **expected}
    assert failed.error["message"] == (
        "step 'fetch' produced 10,002 bytes of output; the limit is 4,096 "
        "(STEP_OUTPUT_MAX_BYTES): keep only what later steps need with `select`"
    )
    (step,) = failed.steps
    assert (step.step_id, step.status, step.attempts) == ("fetch", "failed", 1)
    assert step.output is None and not step.output_truncated
    assert step.error == {**expected, "attempts": [{"attempt": 1, **expected}]}


async def test_select_keeps_what_fits_and_later_steps_see_it(
    store: Store, settings: Settings
) -> None:
    items = [{"id": i, "keep": i % 2 == 0, "blob": "x" * 100} for i in range(100)]
    tenant, execution_id = await start(
        store,
        [
            {
                "id": "fetch",
                "type": "transform",
                "expression": "input",
                "select": "items[?keep].id",
            },
            {"id": "count", "type": "transform", "expression": "length(steps.fetch)"},
        ],
        {"items": items},
    )
    outcome = await Engine(store, settings).run(execution_id)
    assert outcome.kind is OutcomeKind.SUCCEEDED
    done = await store.executions.get(tenant, execution_id, with_steps=True)
    assert done.steps[0].output == list(range(0, 100, 2))
    assert done.output == 50


async def test_a_selected_output_that_still_does_not_fit_says_so(
    store: Store, settings: Settings
) -> None:
    tenant, execution_id = await start(
        store,
        [{"id": "fetch", "type": "transform", "expression": "input", "select": "blob"}],
        {"blob": BLOB, "other": 1},
    )
    outcome = await Engine(store, settings).run(execution_id)
    assert outcome.kind is OutcomeKind.FAILED
    failed = await store.executions.get(tenant, execution_id)
    hint = "`select` less (the limit applies to the selected value)"
    assert failed.error == {"step": "fetch", **_too_large("fetch", BLOB_BYTES, 4096, hint)}


_CYCLE: list[Any] = []
_CYCLE.append(_CYCLE)


@pytest.mark.parametrize(
    ("output", "reason"),
    [
        ({"at": datetime(2026, 1, 1, tzinfo=UTC)}, "Object of type datetime"),
        ([1.0, float("nan")], "Out of range float values"),
        ({"self": _CYCLE}, "recursion"),  # a custom runner's output that contains itself
    ],
)
async def test_an_output_that_is_not_json_fails_the_step_for_good(
    store: Store, settings: Settings, output: Any, reason: str
) -> None:
    tenant, execution_id = await start(
        store, [{**slow_step("odd"), "retry": {"attempts": 2, "delay_s": 0}}]
    )
    recorder = Recorder()

    async def odd(ctx: StepContext, call: int) -> StepResult:
        return StepResult(output=output)

    recorder.hooks["odd"] = odd
    outcome = await Engine(store, settings, step_runner=recorder).run(execution_id)
    assert outcome.kind is OutcomeKind.FAILED and recorder.calls == {"odd": 1}
    failed = await store.executions.get(tenant, execution_id, with_steps=True)
    assert failed.error["step"] == "odd" and failed.error["type"] == "OutputNotJson"
    assert failed.error["code"] == "output_not_json"
    assert failed.error["message"].startswith("step 'odd' produced output that is not JSON: ")
    assert reason in failed.error["message"]
    assert failed.steps[0].output is None and failed.steps[0].status == "failed"


async def test_the_final_output_follows_the_same_rule(store: Store, settings: Settings) -> None:
    """An execution that resumes at its end (after a final ``delay``) re-checks the output it
    finishes with against the limit of the runner that finishes it."""
    tenant, execution_id = await start(store, [{"id": "wait", "type": "delay", "seconds": 0.1}])
    recorder = Recorder()

    async def wait(ctx: StepContext, call: int) -> StepResult:
        until = ctx.now + timedelta(seconds=0.1)
        return StepResult(output={"blob": "x" * 2000}, suspend_until=until)

    recorder.hooks["wait"] = wait
    parked = await Engine(store, settings, step_runner=recorder).run(execution_id)
    assert parked.kind is OutcomeKind.WAITING
    await asyncio.sleep(0.15)
    smaller = settings_for(settings.database_url, step_output_max_bytes=1024)
    outcome = await Engine(store, smaller, step_runner=recorder).run(execution_id)
    assert outcome.kind is OutcomeKind.FAILED
    failed = await store.executions.get(tenant, execution_id)
    size = len(json.dumps({"blob": "x" * 2000}, separators=(",", ":")))
    assert failed.output is None
    assert failed.error == {"step": "wait", **_too_large("wait", size, 1024, None)}


# --- an http step through the engine -----------------------------------------------------------


class _Big(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        doc = {"items": [{"id": i, "blob": "x" * 200} for i in range(100)]}
        body = json.dumps(doc).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        return None


@pytest.fixture
def big_server() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Big)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


async def test_http_step_with_select(store: Store, settings: Settings, big_server: str) -> None:
    allowed = settings_for(
        settings.database_url, http_allowlist="127.0.0.1", step_output_max_bytes=4096
    )
    fetch = {"id": "fetch", "type": "http", "url": big_server + "/items", "timeout_s": 10}
    tenant, whole_id = await start(store, [fetch])
    _, selected_id = await start(
        store,
        [
            {**fetch, "select": "{status: status, ids: body.items[*].id}"},
            {"id": "sum", "type": "transform", "expression": "sum(steps.fetch.ids)"},
        ],
        tenant_id=tenant,
    )
    async with Engine(store, allowed) as engine:
        whole = await engine.run(whole_id)
        selected = await engine.run(selected_id)

    assert whole.kind is OutcomeKind.FAILED
    failed = await store.executions.get(tenant, whole_id)
    assert failed.error["code"] == "output_too_large" and failed.error["step"] == "fetch"
    assert failed.error["details"]["size_bytes"] > 20_000

    assert selected.kind is OutcomeKind.SUCCEEDED
    done = await store.executions.get(tenant, selected_id, with_steps=True)
    assert done.steps[0].output == {"status": 200, "ids": list(range(100))}
    assert done.output == sum(range(100))


def test_an_error_description_is_storable_json() -> None:
    """What a step error quotes (a value of the answer, a NUL) is stored like an output:
    lone surrogates and NULs become U+FFFD, in the message and in the details."""
    exc = PermanentStepError("bad value caf\udce9\x00!", header="x\udce9", raw="a\x00b")
    error = describe_error(exc)
    assert error["message"] == "bad value caf\ufffd\ufffd!"
    assert error["details"] == {"header": "x\ufffd", "raw": "a\ufffdb"}
    text = dumps(error)
    assert not has_nul(text) and text.encode()  # UTF-8, no NUL: what both backends store
