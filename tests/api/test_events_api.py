"""``POST /api/executions/{id}/events/{name}`` and the webhook's events route: the answers,
the wake-up job, tenant isolation and every refusal in the one error shape (the execution is
run by an in-process engine)."""

from __future__ import annotations

import json
from typing import Any

import httpx

from conveyor.engine import Engine, OutcomeKind
from tests.api.conftest import Api

WAITING: dict[str, Any] = {"name": "waits", "steps": [
    {"id": "w", "type": "wait", "event": "paid", "correlation": "input.order",
     "timeout_s": 3600},
    {"id": "b", "type": "transform", "expression": "steps.w.payload"},
]}  # fmt: skip


def _error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["success"] is False and body["error"]["code"] == code, body
    return body["error"]  # type: ignore[no-any-return]


async def _run(api: Api, execution_id: str) -> OutcomeKind:
    return (await Engine(api.ctx.store, api.settings).run(execution_id)).kind


async def _parked(api: Api, auth: dict[str, str], order: str = "o-1") -> tuple[str, str]:
    r = await api.client.post("/api/workflows", json=WAITING, headers=auth)
    assert r.status_code == 201, r.text
    workflow = r.json()["data"]
    r = await api.client.post(
        f"/api/workflows/{workflow['id']}/executions", json={"input": {"order": order}},
        headers=auth,
    )  # fmt: skip
    execution_id = str(r.json()["data"]["id"])
    assert await _run(api, execution_id) is OutcomeKind.WAITING
    return execution_id, str(workflow["webhookSecret"])


async def test_an_event_resumes_the_waiting_execution(api: Api) -> None:
    auth = await api.tenant()
    execution_id, _ = await _parked(api, auth)
    r = await api.client.post(
        f"/api/executions/{execution_id}/events/paid", json={"amount": 42}, headers=auth
    )
    assert r.status_code == 202, r.text
    event = r.json()["data"]
    assert event["executionId"] == execution_id and event["woken"] == [execution_id]
    state = await api.ctx.execution_queue("us").get_job_state(f"event:{event['id']}:{execution_id}")
    assert state in ("waiting", "prioritized")
    assert await _run(api, execution_id) is OutcomeKind.SUCCEEDED
    r = await api.client.get(f"/api/executions/{execution_id}", headers=auth)
    done = r.json()["data"]
    assert done["status"] == "succeeded" and done["output"] == {"amount": 42}
    assert done["steps"][0]["output"]["event"] == "paid"
    r = await api.client.get(f"/api/executions/{execution_id}/events", headers=auth)
    assert r.status_code == 200, r.text
    (received,) = r.json()["data"]
    assert received["id"] == event["id"] and received["payload"] == {"amount": 42}
    assert received["consumedSeq"] == 0 and received["consumedAt"] is not None
    assert received["source"] == "api"
    # finished: no more events
    r = await api.client.post(f"/api/executions/{execution_id}/events/paid", headers=auth)
    _error(r, 409, "conflict")


async def test_refusals(api: Api) -> None:
    auth = await api.tenant()
    other = await api.tenant("other")
    execution_id, _ = await _parked(api, auth)
    url = f"/api/executions/{execution_id}/events/paid"
    _error(await api.client.post(url, json={}, headers=other), 404, "not_found")
    listed = f"/api/executions/{execution_id}/events"
    _error(await api.client.get(listed, headers=other), 404, "not_found")
    _error(await api.client.post(f"/api/executions/{'0' * 32}/events/paid", headers=auth),
           404, "not_found")  # fmt: skip
    _error(await api.client.post(url, json={}), 401, "unauthorized")
    bad_name = f"/api/executions/{execution_id}/events/no%20spaces"
    _error(await api.client.post(bad_name, json={}, headers=auth), 422, "validation_error")
    big = {"blob": "x" * (api.settings.step_output_max_bytes + 1)}
    _error(await api.client.post(url, json=big, headers=auth), 413, "payload_too_large")
    r = await api.client.post(
        url, content=b"{not json", headers={**auth, "Content-Type": "application/json"}
    )
    assert r.status_code in (400, 422) and r.json()["success"] is False
    # nothing was delivered by any of those
    assert await _run(api, execution_id) is OutcomeKind.NOT_DUE
    assert (await api.client.get(listed, headers=auth)).json()["data"] == []


async def test_webhook_event_by_correlation(api: Api) -> None:
    auth = await api.tenant()
    execution_id, secret = await _parked(api, auth, order="o-7")
    r = await api.client.get(f"/api/executions/{execution_id}", headers=auth)
    workflow_id = r.json()["data"]["workflowId"]
    url = f"/api/webhooks/{workflow_id}/events/paid"
    _error(await api.client.post(url, params={"correlation": "o-7"}, json={}), 401, "unauthorized")
    wrong = {"X-Webhook-Secret": "whs_wrong"}
    _error(await api.client.post(url, params={"correlation": "o-7"}, headers=wrong), 401,
           "unauthorized")  # fmt: skip
    hook = {"X-Webhook-Secret": secret}
    _error(await api.client.post(url, json={}, headers=hook), 422, "validation_error")
    r = await api.client.post(url, params={"correlation": "o-8"}, json={"n": 8}, headers=hook)
    assert r.status_code == 202 and r.json()["data"]["woken"] == []  # kept for order o-8
    r = await api.client.post(url, params={"correlation": "o-7"}, json={"n": 7}, headers=hook)
    assert r.status_code == 202, r.text
    assert r.json()["data"]["woken"] == [execution_id]
    assert await _run(api, execution_id) is OutcomeKind.SUCCEEDED
    r = await api.client.get(f"/api/executions/{execution_id}", headers=auth)
    assert r.json()["data"]["output"] == {"n": 7}


async def test_the_payload_limit_is_the_wait_steps_output_limit(api: Api) -> None:
    auth = await api.tenant()
    execution_id, _ = await _parked(api, auth)
    url = f"/api/executions/{execution_id}/events/paid"
    limit = api.settings.step_output_max_bytes
    wrapper = {"event": "paid", "payload": {"blob": ""},
               "receivedAt": "2026-12-06T20:00:00.000000Z"}  # fmt: skip
    room = limit - len(json.dumps(wrapper, separators=(",", ":")))
    over = {"blob": "x" * (room + 1)}
    error = _error(await api.client.post(url, json=over, headers=auth), 413, "payload_too_large")
    assert error["details"] == {"sizeBytes": limit + 1, "limitBytes": limit}
    fits = {"blob": "x" * room}
    r = await api.client.post(url, json=fits, headers=auth)
    assert r.status_code == 202, r.text
    assert await _run(api, execution_id) is OutcomeKind.SUCCEEDED
    r = await api.client.get(f"/api/executions/{execution_id}", headers=auth)
    assert r.json()["data"]["output"] == fits


async def test_idempotency_key(api: Api) -> None:
    auth = await api.tenant()
    execution_id, secret = await _parked(api, auth)
    url = f"/api/executions/{execution_id}/events/paid"
    key = {**auth, "Idempotency-Key": "pay-1"}
    first = await api.client.post(url, json={"amount": 1}, headers=key)
    assert first.status_code == 202, first.text
    again = await api.client.post(url, json={"amount": 1}, headers=key)
    assert again.status_code == 200 and again.headers["Idempotent-Replayed"] == "true"
    assert again.json()["data"]["id"] == first.json()["data"]["id"]
    assert again.json()["data"]["woken"] == []
    assert await _run(api, execution_id) is OutcomeKind.SUCCEEDED
    late = await api.client.post(url, json={"amount": 1}, headers=key)  # after it finished
    assert late.status_code == 200 and late.json()["data"]["id"] == first.json()["data"]["id"]
    r = await api.client.get(f"/api/executions/{execution_id}/events", headers=auth)
    assert len(r.json()["data"]) == 1  # one event, whatever the retries
    other = f"/api/executions/{execution_id}/events/shipped"
    _error(await api.client.post(other, json={}, headers=key), 409, "conflict")
    # webhook events share the tenant's key space
    r = await api.client.get(f"/api/executions/{execution_id}", headers=auth)
    hook = f"/api/webhooks/{r.json()['data']['workflowId']}/events/paid"
    headers = {"X-Webhook-Secret": secret, "Idempotency-Key": "hook-1"}
    one = await api.client.post(hook, params={"correlation": "c"}, json={}, headers=headers)
    two = await api.client.post(hook, params={"correlation": "c"}, json={}, headers=headers)
    assert (one.status_code, two.status_code) == (202, 200)
    assert one.json()["data"]["id"] == two.json()["data"]["id"]
    three = await api.client.post(hook, params={"correlation": "d"}, json={}, headers=headers)
    _error(three, 409, "conflict")
