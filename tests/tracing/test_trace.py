"""One trace per execution, through real processes: ``conveyor api`` and ``conveyor worker``
as subprocesses exporting to an OTLP/HTTP receiver the test runs, a workflow whose ``http``
step calls a local server that records the ``traceparent`` it receives."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.conftest import ADMIN
from tests.helpers import env_for, free_port, process, tenant_auth, wait_api_ready, wait_for
from tests.tracing._support import ReceivedSpan, Receiver, otlp_receiver
from tests.worker._support import http_recorder

pytestmark = pytest.mark.slow


def _one(spans: list[ReceivedSpan], service: str, name: str) -> ReceivedSpan:
    found = [s for s in spans if s.service == service and s.name == name]
    assert len(found) == 1, (service, name, [(s.service, s.name) for s in spans])
    return found[0]


def _trace_complete(receiver: Receiver) -> list[ReceivedSpan] | None:
    spans = receiver.snapshot()
    names = {(s.service, s.name) for s in spans}
    wanted = {("conveyor-api", "trigger"), ("conveyor-worker", "step http"),
              ("conveyor-worker", "process workflow.execute.us")}  # fmt: skip
    return spans if wanted <= names else None


def test_one_trace_from_trigger_to_outbound_call(api_env: dict[str, str], tmp_path: Path) -> None:
    api_port = free_port()
    with otlp_receiver() as receiver, http_recorder() as target, ExitStack() as stack:
        env = env_for(**{**api_env, "API_PORT": str(api_port), "EXECUTION_REGIONS": "us",
                         "HTTP_ALLOWLIST": f"127.0.0.1:{target.port}", "LOG_FORMAT": "json",
                         "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
                         "OTEL_BSP_SCHEDULE_DELAY": "50"})  # fmt: skip
        api = stack.enter_context(process(["-m", "conveyor.api"], env, tmp_path / "api.log"))
        worker_log = tmp_path / "worker.log"
        stack.enter_context(process(["-m", "conveyor.workers.execution"], env, worker_log))
        client = stack.enter_context(
            httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=10)
        )

        wait_api_ready(client, api, tmp_path / "api.log")
        auth = tenant_auth(client, "traced", ADMIN)
        doc = {"name": "traced", "steps": [
            {"id": "call", "type": "http", "url": target.url("/hello")},
            {"id": "done", "type": "noop"},
        ]}  # fmt: skip
        wf = client.post("/api/workflows", json=doc, headers=auth)
        assert wf.status_code == 201, wf.text
        r = client.post(f"/api/workflows/{wf.json()['data']['id']}/executions",
                        json={"input": {}}, headers=auth)  # fmt: skip
        assert r.status_code == 202, r.text
        execution_id = r.json()["data"]["id"]

        def finished() -> dict[str, Any] | None:
            data: dict[str, Any] = client.get(f"/api/executions/{execution_id}",
                                              headers=auth).json()["data"]  # fmt: skip
            return data if data["status"] in ("succeeded", "failed") else None

        result: Any = wait_for(finished, timeout=30, interval=0.1)
        assert result["status"] == "succeeded", (result, worker_log.read_text()[-3000:])
        spans: Any = wait_for(lambda: _trace_complete(receiver), timeout=15, interval=0.1)

    trigger = _one(spans, "conveyor-api", "trigger")
    send = _one(spans, "conveyor-api", "send workflow.execute.us")
    run = _one(spans, "conveyor-worker", "process workflow.execute.us")
    steps = [s for s in spans if s.service == "conveyor-worker" and s.name.startswith("step ")]
    call = _one(spans, "conveyor-worker", "GET")
    trace_id = trigger.trace_id
    assert {s.trace_id for s in (trigger, send, run, call, *steps)} == {trace_id}
    # the chain: trigger -> enqueue (producer) -> the worker's run (consumer) -> steps -> call
    assert send.parent_id == trigger.span_id and send.kind == "producer"
    assert run.parent_id == send.span_id and run.kind == "consumer"
    assert [(s.attributes["conveyor.step.id"], s.attributes["conveyor.step.status"])
            for s in steps] == [("call", "succeeded"), ("done", "succeeded")]  # fmt: skip
    assert {s.parent_id for s in steps} == {run.span_id}
    http_step = next(s for s in steps if s.attributes["conveyor.step.id"] == "call")
    assert call.parent_id == http_step.span_id and call.kind == "client"
    assert call.attributes["http.response.status_code"] == 200
    assert run.attributes["conveyor.execution_id"] == execution_id
    assert run.attributes["conveyor.outcome"] == "succeeded"
    # the FastAPI request span (when FastAPI traces) is the trigger's parent, in the same trace
    assert trigger.parent_id == "" or any(s.span_id == trigger.parent_id for s in spans)

    # the target received the W3C trace context of the client span
    (hit,) = [h for h in target.hits if h.path == "/hello"]
    version, got_trace, got_span, flags = hit.headers["traceparent"].split("-")
    assert (version, got_trace, got_span) == ("00", trace_id, call.span_id)
    assert int(flags, 16) & 1, "sampled"
