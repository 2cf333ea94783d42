"""Every example of ``docs/workflows.md`` runs for real, and says what really happens.

The document marks its examples with the info string of fenced code blocks:

* ```` ```json workflow ```` — a workflow definition; starts an example.
* ```` ```json input ```` — the trigger input of the next run (``null`` without one).
* ```` ```json event ```` — ``{"name", "payload"}``: an event sent to the next run's execution
  when it first parks (as ``POST /api/executions/{id}/events/{name}`` does).
* ```` ```json output ```` — the run succeeds with exactly this execution output.
* ```` ```json error ```` — the run fails; every key shown equals that of the execution's
  ``error`` (keys not shown are not compared).
* ```` ```json step-error ```` — after an ``error``: every key shown equals that of the error of
  the failing step's run (as ``GET /api/executions/{id}`` shows it).
* ```` ```json step-input ```` — after an ``output`` or ``error``: the recorded ``input`` of the
  last step run (what the step did) is exactly this.
* ```` ```json input-invalid ```` — the trigger is refused (``input_invalid``) with exactly
  these ``details``.
* ```` ```json invalid ```` — saving the workflow is refused (``workflow_invalid``) with
  exactly these ``details``.
* ```` ```json fragment ```` — a piece of a document: only checked to be JSON.

A workflow may be followed by several runs (input + expectation). Every ``json`` block must
carry one of these tags, so an example cannot silently drop out of the test.

Each example is saved through the store's workflow service (the validation the API runs on
``POST /api/workflows``), triggered through the execution service (the input schema check of a
trigger) and run by :class:`~conveyor.engine.Engine` against a real database (SQLite and
PostgreSQL). ``http`` steps call ``https://api.example.test``, which the test points at a local
server (:class:`ExampleApi`) allow-listed in ``HTTP_ALLOWLIST``; URLs in outputs are mapped
back. ``delay`` steps park the execution on a timer: the test plays the timer dispatcher
(claims the timer, marks it fired) and moves the engine's clock to the due instant. Ids of the
execution, workflow and tenant appear in outputs as ``<execution.id>``, ``<execution.workflowId>``
and ``<execution.tenantId>``.

The OpenAPI request examples of ``POST /api/workflows`` are checked too: each must be a valid
workflow (store validation and the served JSON Schema) and one of the document's runnable
examples — so it is executed above.
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

import jsonschema  # type: ignore[import-untyped,unused-ignore]
import pytest
from sqlalchemy import select

from conveyor.api.app import create_app
from conveyor.engine import Engine, OutcomeKind
from conveyor.errors import InputInvalid, WorkflowInvalid
from conveyor.store import Store, utcnow
from conveyor.store.schema import executions
from tests.store._fixtures import db_url, settings_for, sqlite_template, store_pg_url

__all__ = ["db_url", "sqlite_template", "store_pg_url"]

DOC = Path(__file__).resolve().parents[2] / "docs" / "workflows.md"
PLACEHOLDER = "https://api.example.test"
RUN_TAGS = ("output", "error", "input-invalid")
STEP_TAGS = ("step-error", "step-input")
TAGS = ("workflow", "input", "event", "invalid", "fragment", *STEP_TAGS, *RUN_TAGS)
MAX_RUNS_PER_EXECUTION = 10

# --- reading the document -----------------------------------------------------------------------

_FENCE = re.compile(r"^```(?P<info>[^\n]*)\n(?P<body>.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
_HEADING = re.compile(r"^#{1,6} +(?P<title>.+?) *$", re.MULTILINE)


@dataclass
class Run:
    line: int
    input: Any
    expect: str
    """``output``, ``error`` or ``input-invalid``."""
    value: Any
    last_step: dict[str, Any] = field(default_factory=dict)
    """``step-error`` / ``step-input`` expectations about the last step run."""
    events: list[dict[str, Any]] = field(default_factory=list)
    """``{"name", "payload"}`` of events sent to the execution when it first parks."""


@dataclass
class Example:
    name: str
    line: int
    workflow: dict[str, Any]
    runs: list[Run] = field(default_factory=list)
    invalid: list[dict[str, Any]] | None = None


@dataclass
class _Block:
    line: int
    tag: str
    value: Any
    heading: str


def _blocks(text: str) -> Iterator[_Block]:
    headings = [(m.start(), m.group("title")) for m in _HEADING.finditer(text)]
    for match in _FENCE.finditer(text):
        words = match.group("info").split()
        if not words or words[0] != "json":
            continue
        line = text.count("\n", 0, match.start()) + 1
        where = f"docs/workflows.md:{line}"
        tag = words[1] if len(words) == 2 else ""
        assert tag in TAGS, f"{where}: a json block needs one tag of {TAGS}, got {words[1:]}"
        try:
            value = json.loads(match.group("body"))
        except ValueError as exc:
            raise AssertionError(f"{where}: not JSON: {exc}") from None
        heading = next((t for at, t in reversed(headings) if at < match.start()), "top")
        yield _Block(line, tag, value, heading)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def read_examples(text: str) -> list[Example]:
    """The runnable examples of the document, in order (assertion errors name the line)."""
    examples: list[Example] = []
    current: Example | None = None
    pending: _Block | None = None
    events: list[dict[str, Any]] = []
    names: Counter[str] = Counter()
    for block in _blocks(text):
        where = f"docs/workflows.md:{block.line}"
        if block.tag == "fragment":
            continue
        if block.tag == "workflow":
            assert pending is None, f"{where}: the input above has no expected result"
            assert isinstance(block.value, dict), f"{where}: a workflow is an object"
            slug = _slug(str(block.value.get("name") or block.heading))
            names[slug] += 1
            name = slug if names[slug] == 1 else f"{slug}-{names[slug]}"
            current = Example(name, block.line, block.value)
            examples.append(current)
            continue
        assert current is not None, f"{where}: `json {block.tag}` before any workflow"
        if block.tag == "input":
            assert pending is None, f"{where}: two inputs in a row"
            pending = block
        elif block.tag == "event":
            assert isinstance(block.value, dict) and set(block.value) == {"name", "payload"}, (
                f"{where}: an event is {{name, payload}}"
            )
            events.append(block.value)
        elif block.tag in STEP_TAGS:
            last = current.runs[-1] if current.runs else None
            after = ("error",) if block.tag == "step-error" else ("output", "error")
            assert last is not None and last.expect in after, f"{where}: not after {after}"
            assert pending is None and block.tag not in last.last_step, f"{where}: misplaced"
            last.last_step[block.tag] = block.value
        elif block.tag == "invalid":
            assert not current.runs and pending is None, f"{where}: an invalid workflow runs"
            current.invalid = block.value
        else:
            assert current.invalid is None, f"{where}: an invalid workflow cannot run"
            value = None if pending is None else pending.value
            current.runs.append(Run(block.line, value, block.tag, block.value, events=events))
            pending, events = None, []
    assert pending is None, f"docs/workflows.md:{pending.line}: input without a result"
    assert not events, "docs/workflows.md: an event without a result after it"
    for example in examples:
        assert example.runs or example.invalid is not None, (
            f"docs/workflows.md:{example.line}: a workflow without an expected result"
        )
    return examples


EXAMPLES = read_examples(DOC.read_text())

# --- the example API behind https://api.example.test --------------------------------------------

ORDERS: dict[str, dict[str, Any]] = {
    "42": {
        "id": 42,
        "status": "paid",
        "total": 150,
        "currency": "EUR",
        "customer": {"name": "Ada Lovelace", "email": "ada@example.com"},
        "items": [
            {"sku": "LAMP-1", "quantity": 2, "price": 50},
            {"sku": "BULB-9", "quantity": 5, "price": 10},
        ],
    },
    "7": {
        "id": 7,
        "status": "paid",
        "total": 30,
        "currency": "EUR",
        "customer": {"name": "Grace Hopper", "email": "grace@example.com"},
        "items": [{"sku": "BULB-9", "quantity": 3, "price": 10}],
    },
}
CATALOG = {
    "count": 2000,
    "products": [
        {
            "sku": f"SKU-{n:04d}",
            "name": f"Product {n}",
            "inStock": n % 500 == 0,
            "description": "A product of the example catalogue. " * 4,
        }
        for n in range(1, 2001)
    ],
}
ECHOED_HEADERS = ("content-type", "authorization", "idempotency-key", "x-request-id")


class ExampleApi(ThreadingHTTPServer):
    """The API the document's ``http`` steps call (see the handler for its routes)."""

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _ApiHandler)
        self.calls: Counter[str] = Counter()
        self.lock = threading.Lock()


class _ApiHandler(BaseHTTPRequestHandler):
    """``GET /orders/{id}`` (404 if unknown), ``/hooks/*`` (any method: the request back),
    ``GET /flaky`` (503 twice, then 200), ``GET /unavailable`` (always 503, ``Retry-After``),
    ``GET /catalog`` (a large list)."""

    def date_time_string(self, timestamp: float | None = None) -> str:
        return "Mon, 01 Jan 2024 09:00:00 GMT"  # responses are the same on every run

    def log_message(self, format: str, *args: Any) -> None:
        return None

    def _send(self, status: int, value: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        for name, header in (headers or {}).items():
            self.send_header(name, header)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _handle(self) -> None:
        api = cast(ExampleApi, self.server)
        path = self.path.split("?", 1)[0]
        with api.lock:
            api.calls[path] += 1
            calls = api.calls[path]
        raw = self.rfile.read(int(self.headers.get("content-length") or 0))
        if path.startswith("/orders/") and self.command == "GET":
            order = ORDERS.get(path.removeprefix("/orders/"))
            if order is None:
                self._send(404, {"error": "order not found"})
            else:
                self._send(200, order, {"x-ratelimit-remaining": "99"})
        elif path.startswith("/hooks/"):
            is_json = "json" in self.headers.get("content-type", "")
            body = (json.loads(raw) if is_json else raw.decode()) if raw else None
            seen = {n: self.headers[n] for n in ECHOED_HEADERS if n in self.headers}
            self._send(200, {"method": self.command, "headers": seen, "body": body})
        elif path == "/flaky":
            if calls <= 2:
                self._send(503, {"error": "temporarily unavailable"})
            else:
                self._send(200, {"ok": True, "calls": calls})
        elif path == "/unavailable":
            self._send(503, {"error": "down for maintenance"}, {"retry-after": "120"})
        elif path == "/catalog":
            self._send(200, CATALOG)
        else:
            self._send(404, {"error": "no such route"})

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle


@pytest.fixture
def example_api() -> Iterator[str]:
    """The example API on a free local port; its base URL."""
    server = ExampleApi()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


# --- running an example -------------------------------------------------------------------------


class Clock:
    """The engine's clock: real time, moved forward when a delay's timer fires."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def __call__(self) -> datetime:
        return utcnow() + self.offset

    def advance_to(self, instant: datetime) -> None:
        self.offset += max(instant - self(), timedelta()) + timedelta(milliseconds=1)


def _rewrite(value: Any, old: str, new: str) -> Any:
    return json.loads(json.dumps(value).replace(old, new))


async def _run_to_end(
    store: Store,
    engine: Engine,
    clock: Clock,
    execution_id: str,
    events: list[dict[str, Any]],
    tenant_id: str,
) -> None:
    """Run the execution; fire its timers as the timer dispatcher would, until it ends. When
    it first parks, ``events`` are sent to it (a ``wait`` step receives them)."""
    for _ in range(MAX_RUNS_PER_EXECUTION):
        outcome = await engine.run(execution_id)
        if outcome.finished:
            return
        if events:
            for event in events:
                await store.events.send(
                    tenant_id, execution_id, event["name"], event["payload"], clock()
                )
            events = []
            continue
        if outcome.kind is OutcomeKind.WAITING and outcome.wake_at is None:
            # parked on its children (parallel / foreach): run them, as the workers would
            children = await _active_children(store, execution_id)
            assert children, outcome
            for child_id in children:
                await _run_to_end(store, engine, clock, child_id, [], tenant_id)
            continue
        assert outcome.kind is OutcomeKind.WAITING and outcome.wake_at, outcome
        clock.advance_to(outcome.wake_at)
        timers = await store.timers.claim(clock(), owner="docs-test")
        assert [t.execution_id for t in timers] == [execution_id]
        await store.timers.mark_fired([t.id for t in timers], owner="docs-test", at=clock())
    raise AssertionError(f"execution {execution_id} did not finish")


async def _active_children(store: Store, execution_id: str) -> list[str]:
    query = select(executions.c.id).where(
        executions.c.parent_execution_id == execution_id,
        executions.c.status.in_(("queued", "running", "waiting")),
    )
    async with store.engine.connect() as conn:
        return [r.id for r in await conn.execute(query.order_by(executions.c.parent_index))]


def _matches(expected: Any, actual: Any) -> bool:
    """``expected == actual``; for objects, only the keys ``expected`` shows are compared."""
    if not isinstance(expected, dict) or not isinstance(actual, dict):
        return bool(expected == actual)
    return all(key in actual and actual[key] == value for key, value in expected.items())


@dataclass
class _Target:
    """Where the runs of one example happen."""

    store: Store
    engine: Engine
    clock: Clock
    tenant_id: str
    workflow_id: str
    api: str


async def _check_run(target: _Target, run: Run) -> None:
    where = f"docs/workflows.md:{run.line}"
    store = target.store
    value = _rewrite(run.input, PLACEHOLDER, target.api)
    if run.expect == "input-invalid":
        with pytest.raises(InputInvalid) as rejected:
            await store.executions.create(target.tenant_id, target.workflow_id, value)
        assert rejected.value.details == run.value, f"{where}: {rejected.value.details}"
        return
    execution, _ = await store.executions.create(target.tenant_id, target.workflow_id, value)
    await _run_to_end(
        store, target.engine, target.clock, execution.id, run.events, target.tenant_id
    )
    done = await store.executions.get(target.tenant_id, execution.id, with_steps=True)
    last = done.steps[-1] if done.steps else None
    shown = {"status": done.status, "output": done.output, "error": done.error,
             "step-error": last and last.error, "step-input": last and last.input}  # fmt: skip
    for old, new in (
        (execution.id, "<execution.id>"),
        (target.workflow_id, "<execution.workflowId>"),
        (target.tenant_id, "<execution.tenantId>"),
        (target.api, PLACEHOLDER),
    ):
        shown = _rewrite(shown, old, new)
    seen = f"{where}: {json.dumps(shown)}"
    if run.expect == "output":
        assert shown["status"] == "succeeded" and shown["output"] == run.value, seen
    else:
        assert shown["status"] == "failed" and _matches(run.value, shown["error"]), seen
    if "step-error" in run.last_step:
        assert _matches(run.last_step["step-error"], shown["step-error"]), seen
    if "step-input" in run.last_step:
        assert run.last_step["step-input"] == shown["step-input"], seen


async def run_example(example: Example, database_url: str, api: str) -> None:
    """Save ``example``'s workflow and check each of its runs (see the module docstring)."""
    settings = settings_for(database_url, http_allowlist=api.removeprefix("http://"))
    assert settings.step_output_max_bytes == 256 * 1024  # the documented default
    definition = _rewrite(example.workflow, PLACEHOLDER, api)
    async with Store(settings, pool_size=2) as store:
        tenant_id = (await store.tenants.create("docs")).id
        if example.invalid is not None:
            with pytest.raises(WorkflowInvalid) as refused:
                await store.workflows.create(tenant_id, definition)
            details = refused.value.details
            assert details == example.invalid, f"docs/workflows.md:{example.line}: {details}"
            return
        workflow = await store.workflows.create(tenant_id, definition)
        clock = Clock()
        async with Engine(store, settings, clock=clock) as engine:
            target = _Target(store, engine, clock, tenant_id, workflow.id, api)
            for run in example.runs:
                await _check_run(target, run)


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.name for e in EXAMPLES])
async def test_example(example: Example, db_url: str, example_api: str) -> None:
    await run_example(example, db_url, example_api)


def test_the_document_has_its_examples() -> None:
    assert len(EXAMPLES) >= 15
    tags = {run.expect for example in EXAMPLES for run in example.runs}
    assert tags == set(RUN_TAGS)
    assert any(example.invalid is not None for example in EXAMPLES)


# --- the OpenAPI request examples of POST /api/workflows ----------------------------------------


def openapi_document() -> dict[str, Any]:
    app = create_app(settings_for("sqlite:///:memory:"))
    return app.openapi()


def create_examples(document: dict[str, Any]) -> dict[str, Any]:
    body = document["paths"]["/api/workflows"]["post"]["requestBody"]
    examples: dict[str, Any] = body["content"]["application/json"]["examples"]
    return examples


async def test_openapi_examples_are_valid_and_run_in_the_docs(db_url: str) -> None:
    document = openapi_document()
    examples = create_examples(document)
    assert len(examples) >= 2
    schema = _rewrite(
        document["components"]["schemas"]["WorkflowDefinition"],
        "#/components/schemas/",
        "#/$defs/",
    )
    schema["$defs"] = _rewrite(
        document["components"]["schemas"], "#/components/schemas/", "#/$defs/"
    )
    documented = [example.workflow for example in EXAMPLES if example.invalid is None]
    async with Store(settings_for(db_url), pool_size=2) as store:
        tenant = (await store.tenants.create("docs")).id
        for name, example in examples.items():
            assert example.get("summary"), name
            value = example["value"]
            jsonschema.Draft202012Validator(schema).validate(value)
            workflow = await store.workflows.create(tenant, value)  # as the API validates
            assert workflow.current_version == 1
            assert value in documented, f"OpenAPI example {name!r} is not run by the docs"
