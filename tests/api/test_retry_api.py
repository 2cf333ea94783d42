"""``POST /api/executions/{id}/retry`` with ``{"from": "start" | "failed"}``: the answers,
``reusedFrom`` on the copied step runs, ``Idempotency-Key``, and every refusal in the one error
shape (the execution is run by an in-process engine against a real local HTTP target)."""

from __future__ import annotations

from typing import Any

import httpx

from conveyor.engine import Engine, OutcomeKind
from tests.api.conftest import Api, make_settings
from tests.engine._target import Target, http_target


def _error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["success"] is False and body["error"]["code"] == code, body
    return body["error"]  # type: ignore[no-any-return]


async def _run(api: Api, execution_id: str) -> OutcomeKind:
    settings = make_settings(DATABASE_URL=api.settings.database_url, HTTP_ALLOWLIST="127.0.0.1")
    async with Engine(api.ctx.store, settings) as engine:
        return (await engine.run(execution_id)).kind


async def _failed(api: Api, auth: dict[str, str], target: Target) -> str:
    wf = await api.workflow(auth, {"name": "flaky", "steps": [
        {"id": "a", "type": "http", "url": target.url("/ok/a"), "timeout_s": 10},
        {"id": "b", "type": "http", "url": target.url("/flaky/b"), "timeout_s": 10},
    ]})  # fmt: skip
    r = await api.client.post(f"/api/workflows/{wf}/executions", headers=auth)
    execution_id = str(r.json()["data"]["id"])
    assert await _run(api, execution_id) is OutcomeKind.FAILED
    return execution_id


async def test_retry_from_failed_over_the_api(api: Api) -> None:
    auth = await api.tenant()
    with http_target() as target:
        original = await _failed(api, auth, target)
        target.failing = False
        url = f"/api/executions/{original}/retry"
        key = {**auth, "Idempotency-Key": "retry-1"}
        r = await api.client.post(url, json={"from": "failed"}, headers=key)
        assert r.status_code == 202, r.text
        retry = r.json()["data"]
        assert retry["retryOf"] == original and retry["stepsRun"] == 1
        state = await api.ctx.execution_queue("us").get_job_state(retry["id"])
        assert state in ("waiting", "prioritized"), "enqueued like any retry"
        replay = await api.client.post(url, json={"from": "failed"}, headers=key)
        assert replay.status_code == 200 and replay.headers["Idempotent-Replayed"] == "true"
        assert replay.json()["data"]["id"] == retry["id"]

        assert await _run(api, retry["id"]) is OutcomeKind.SUCCEEDED
        assert dict(target.hits) == {"/ok/a": 1, "/flaky/b": 2}
    got = (await api.client.get(f"/api/executions/{retry['id']}", headers=auth)).json()["data"]
    assert got["status"] == "succeeded"
    assert [(s["stepId"], s["reusedFrom"]) for s in got["steps"]] == [
        ("a", original), ("b", None)]  # fmt: skip


async def test_retry_without_body_or_from_start_runs_everything(api: Api) -> None:
    auth = await api.tenant()
    with http_target() as target:
        original = await _failed(api, auth, target)
        for body in (None, {"from": "start"}):
            r = await api.client.post(f"/api/executions/{original}/retry", json=body,
                                      headers=auth)  # fmt: skip
            assert r.status_code == 202, r.text
            retried = r.json()["data"]
            assert retried["stepsRun"] == 0 and retried["retryOf"] == original
            assert await _run(api, retried["id"]) is OutcomeKind.FAILED
        assert dict(target.hits) == {"/ok/a": 3, "/flaky/b": 3}


async def test_retry_refusals_in_the_error_shape(api: Api) -> None:
    auth = await api.tenant()
    other = await api.tenant("other")
    with http_target() as target:
        failed = await _failed(api, auth, target)
    url = f"/api/executions/{failed}/retry"
    err = _error(await api.client.post(url, json={"from": "middle"}, headers=auth),
                 422, "validation_error")  # fmt: skip
    assert err["details"][0]["field"] == "from"
    _error(await api.client.post(url, json={"from": "failed", "x": 1}, headers=auth),
           422, "validation_error")  # fmt: skip
    _error(await api.client.post(url, json={"from": "failed"}, headers=other), 404, "not_found")

    wf = await api.workflow(auth)
    r = await api.client.post(f"/api/workflows/{wf}/executions", headers=auth)
    queued = r.json()["data"]["id"]
    err = _error(await api.client.post(f"/api/executions/{queued}/retry",
                                       json={"from": "failed"}, headers=auth),
                 409, "conflict")  # fmt: skip
    assert "only failed executions" in err["message"]
    assert await _run(api, queued) is OutcomeKind.SUCCEEDED
    err = _error(await api.client.post(f"/api/executions/{queued}/retry",
                                       json={"from": "failed"}, headers=auth),
                 409, "conflict")  # fmt: skip
    assert "not succeeded" in err["message"]
    # a trigger's idempotency key is not a retry's
    keyed = {**auth, "Idempotency-Key": "trigger-key"}
    r = await api.client.post(f"/api/workflows/{wf}/executions", headers=keyed)
    assert r.status_code == 202
    err = _error(await api.client.post(url, json={"from": "failed"}, headers=keyed),
                 409, "conflict")  # fmt: skip
    assert "idempotency key already used" in err["message"]


async def test_output_expression_over_the_api(api: Api) -> None:
    auth = await api.tenant()
    steps = [{"id": "a", "type": "transform", "expression": "input.n"}]
    bad = {"name": "bad", "steps": steps, "output": "steps.["}
    err = _error(await api.client.post("/api/workflows", json=bad, headers=auth),
                 422, "workflow_invalid")  # fmt: skip
    assert err["details"][0]["field"] == "output"
    wf = await api.workflow(auth, {"name": "out", "steps": steps, "output": "{n: steps.a}"})
    got = (await api.client.get(f"/api/workflows/{wf}", headers=auth)).json()["data"]
    assert got["definition"]["output"] == "{n: steps.a}"
    r = await api.client.post(f"/api/workflows/{wf}/executions", json={"input": {"n": 4}},
                              headers=auth)  # fmt: skip
    execution_id = r.json()["data"]["id"]
    assert await _run(api, execution_id) is OutcomeKind.SUCCEEDED
    done = (await api.client.get(f"/api/executions/{execution_id}", headers=auth)).json()
    assert done["data"]["output"] == {"n": 4} and done["data"]["steps"][0]["output"] == 4


async def test_openapi_shows_output_retry_body_and_reused_from(api: Api) -> None:
    schemas = (await api.client.get("/openapi.json")).json()["components"]["schemas"]
    assert "output" in schemas["WorkflowDefinition"]["properties"]
    assert schemas["RetryIn"]["properties"]["from"]["enum"] == ["start", "failed"]
    assert "reusedFrom" in schemas["StepRunOut"]["properties"]
    execution = schemas["ExecutionOut"]["properties"]
    assert "`output` expression" in execution["output"]["description"]
    assert "output_expression_failed" in execution["error"]["description"]
