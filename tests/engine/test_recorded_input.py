"""A step run's ``input`` is what the step did: its rendered request or evaluated inputs.

Secrets are redacted, a step that fails half-way records what it had rendered, and an input
above ``STEP_OUTPUT_MAX_BYTES`` (4096 in these fixtures) is recorded cut, with a marker.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from conveyor.engine import Engine, OutcomeKind
from conveyor.settings import Settings
from conveyor.store import StepRun, Store
from conveyor.workflows import StepContext, StepResult
from tests.engine._support import Hook, Recorder, start
from tests.store._fixtures import settings_for
from tests.workflows.conftest import LocalServer


def _allowing_loopback(settings: Settings) -> Settings:
    return settings_for(
        settings.database_url, step_output_max_bytes=4096, http_allowlist="127.0.0.1"
    )


async def _run_one(
    store: Store, settings: Settings, steps: list[dict[str, Any]], input: Any = None
) -> tuple[OutcomeKind, list[StepRun]]:
    tenant, execution_id = await start(store, steps, input)
    async with Engine(store, settings) as engine:
        outcome = await engine.run(execution_id)
    return outcome.kind, await store.executions.step_runs(tenant, execution_id)


async def test_http_step_records_the_rendered_request_with_secrets_redacted(
    store: Store, settings: Settings, local_server: LocalServer
) -> None:
    port = local_server.port
    call = {
        "id": "call",
        "type": "http",
        "method": "POST",
        "url": f"http://ada:hunter2@127.0.0.1:{port}/echo?order={{{{ input.id }}}}",
        "headers": {
            "Authorization": "Bearer {{ input.token }}",
            "X-Api-Key": "{{ input.key }}",
            "X-Session-Token": "{{ input.token }}",
            "X-Request-Id": "r-{{ input.id }}",
        },
        "body": {"order": "{{ input.id }}", "note": "for {{ input.who }}"},
        "select": "status",
        "timeout_s": 10,
    }
    secrets = {"id": 7, "token": "s3cr3t-tok", "key": "k-42-secret", "who": "ada"}
    kind, (run,) = await _run_one(store, _allowing_loopback(settings), [call], secrets)

    assert kind is OutcomeKind.SUCCEEDED and run.output == 200
    assert run.input == {
        "method": "POST",
        "url": f"http://[redacted]@127.0.0.1:{port}/echo?order=7",
        "headers": {
            "Authorization": "[redacted]",
            "X-Api-Key": "[redacted]",
            "X-Session-Token": "[redacted]",
            "X-Request-Id": "r-7",
            "content-type": "application/json",
        },
        "body": {"order": 7, "note": "for ada"},
    }
    recorded = json.dumps(run.input)
    assert not any(s in recorded for s in ("hunter2", "s3cr3t-tok", "k-42-secret"))
    (seen,) = local_server.requests  # the secrets themselves were sent
    assert seen.headers["x-api-key"] == "k-42-secret"
    assert json.loads(seen.body) == run.input["body"]


async def test_a_refused_request_records_the_url_it_refused(
    store: Store, settings: Settings
) -> None:
    call = {
        "id": "call",
        "type": "http",
        "url": "https://ada:hunter2@127.0.0.1:8443/hooks/{{ input.id }}",
        "headers": {"Authorization": "Bearer {{ input.token }}"},
        "retry": {"attempts": 3, "delay_s": 0},
    }
    # no allow-list: loopback is refused by the SSRF guard
    kind, (run,) = await _run_one(store, settings, [call], {"id": 9, "token": "s3cr3t"})

    assert kind is OutcomeKind.FAILED
    assert run.status == "failed" and run.attempts == 1
    assert run.error["type"] == "PermanentStepError"
    assert "refused to connect" in run.error["message"]
    assert run.input == {
        "method": "GET",
        "url": "https://[redacted]@127.0.0.1:8443/hooks/9",
        "headers": {"Authorization": "[redacted]"},
        "body": None,
    }


async def test_a_request_that_times_out_records_what_was_sent(
    store: Store, settings: Settings, local_server: LocalServer
) -> None:
    call = {
        "id": "call",
        "type": "http",
        "url": f"http://127.0.0.1:{local_server.port}/slow?s={{{{ input.s }}}}",
        "timeout_s": 0.3,
    }
    kind, (run,) = await _run_one(store, _allowing_loopback(settings), [call], {"s": 2})

    assert kind is OutcomeKind.FAILED
    assert run.error["type"] in ("StepTimeout", "RetryableStepError")
    assert run.input == {
        "method": "GET",
        "url": f"http://127.0.0.1:{local_server.port}/slow?s=2",
        "headers": {},
        "body": None,
    }


async def test_local_steps_record_what_they_evaluated(store: Store, settings: Settings) -> None:
    steps: list[dict[str, Any]] = [
        {"id": "pick", "type": "transform", "expression": "input.n", "select": "@"},
        {
            "id": "check",
            "type": "condition",
            "expression": "steps.pick > `1`",
            "then": {"goto": "route"},
            "else": "end",
        },
        {"id": "skipped", "type": "noop"},
        {
            "id": "route",
            "type": "condition",
            "cases": [
                {"when": "input.n > `10`", "then": "end"},
                {"when": "input.n > `1`", "then": "continue"},
            ],
        },
        {"id": "nothing", "type": "noop", "name": "just a noop"},
    ]
    kind, runs = await _run_one(store, settings, steps, {"n": 2})

    assert kind is OutcomeKind.SUCCEEDED
    assert {run.step_id: run.input for run in runs} == {
        "pick": {"expression": "input.n", "select": "@"},
        "check": {"expression": "steps.pick > `1`", "branch": "then"},
        "route": {"cases": ["input.n > `10`", "input.n > `1`"], "branch": 1},
        "nothing": {"id": "nothing", "type": "noop", "name": "just a noop"},  # as defined
    }


async def test_a_delay_records_its_resolved_wake_time(store: Store, settings: Settings) -> None:
    steps: list[dict[str, Any]] = [
        {"id": "wait", "type": "delay", "until": "{{ input.at }}"},
        {"id": "after", "type": "noop"},
    ]
    kind, (run,) = await _run_one(store, settings, steps, {"at": "2999-01-01T09:30:00+01:00"})

    assert kind is OutcomeKind.WAITING
    assert run.input == {"until": "2999-01-01T08:30:00Z"}


async def test_a_huge_rendered_body_is_recorded_cut_and_the_step_succeeds(
    store: Store, settings: Settings, local_server: LocalServer
) -> None:
    blob = "é" * 9000
    call = {
        "id": "call",
        "type": "http",
        "method": "PUT",
        "url": f"http://127.0.0.1:{local_server.port}/json",
        "headers": {"X-Trace": "t-1"},
        "body": "{{ input.blob }}",
        "timeout_s": 10,
    }
    kind, (run,) = await _run_one(store, _allowing_loopback(settings), [call], {"blob": blob})

    assert kind is OutcomeKind.SUCCEEDED and run.status == "succeeded"
    assert run.output["status"] == 200 and run.error is None
    (seen,) = local_server.requests
    assert seen.body.decode() == blob  # the whole body was sent
    # what fits is kept; the body is replaced by a marker with its size and a preview
    assert run.input["method"] == "PUT"
    assert run.input["headers"] == {"X-Trace": "t-1", "content-type": "text/plain; charset=utf-8"}
    marker = run.input["body"]
    assert marker["[truncated]"] == {"size_bytes": 18002, "limit_bytes": 4096}
    assert blob.startswith(marker["preview"]) and 0 < len(marker["preview"]) < 4096
    compact = json.dumps(run.input, separators=(",", ":"), ensure_ascii=False)
    assert 4000 < len(compact.encode()) <= 4096  # as much of the body as fits


async def test_a_runners_rendered_input_is_stored_as_json_cut_to_fit(
    store: Store, settings: Settings
) -> None:
    rendered: dict[str, Any] = {
        "two": {"a": "x" * 3000, "b": "y" * 2500, "c": "small"},
        "scalar": "z" * 10_000,
        "nul": {"text": "a\x00b"},
        "odd": {"at": datetime(2030, 1, 1, tzinfo=UTC)},
    }
    recorder = Recorder()
    for step_id, value in rendered.items():
        recorder.hooks[step_id] = _returning(value)
    tenant, execution_id = await start(
        store, [{"id": step_id, "type": "noop"} for step_id in rendered]
    )
    outcome = await Engine(store, settings, step_runner=recorder).run(execution_id)
    assert outcome.kind is OutcomeKind.SUCCEEDED
    runs = {
        run.step_id: run.input for run in await store.executions.step_runs(tenant, execution_id)
    }

    two = runs["two"]  # the largest member is cut first, with as long a preview as fits
    assert two["b"] == "y" * 2500 and two["c"] == "small"
    assert two["a"]["[truncated]"] == {"size_bytes": 3002, "limit_bytes": 4096}
    assert 1000 < len(two["a"]["preview"]) < 3000 and set(two["a"]["preview"]) == {"x"}
    assert runs["scalar"]["[truncated]"] == {"size_bytes": 10_002, "limit_bytes": 4096}
    assert runs["scalar"]["preview"].startswith("zzz")
    assert runs["nul"] == {"text": "a\ufffdb"}
    assert set(runs["odd"]) == {"[not JSON]"}
    for value in runs.values():
        assert len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()) <= 4096


def _returning(rendered: Any) -> Hook:
    async def hook(ctx: StepContext, call: int) -> StepResult:
        return StepResult(rendered_input=rendered)

    return hook
