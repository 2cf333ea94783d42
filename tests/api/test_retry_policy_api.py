"""A workflow whose retry policy is invalid is refused when it is saved (422, the error shape,
naming the step and field); a valid ``retry_on`` / ``retry_statuses`` is kept as given."""

from __future__ import annotations

from typing import Any

from tests.api.conftest import Api


def _workflow(retry: dict[str, Any]) -> dict[str, Any]:
    step = {"id": "call", "type": "http", "url": "https://example.com/", "retry": retry}
    return {"name": "retries", "steps": [step]}


async def test_invalid_retry_policies_are_refused_on_save(api: Api) -> None:
    auth = await api.tenant()
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"retry_on": ["dns"]}, "retry.retry_on.0", "'timeout', 'connection' or 'status'"),
        ({"retry_statuses": [302]}, "retry.retry_statuses", "302 is not an error status"),
        ({"retry_on": ["timeout"], "retry_statuses": ["5xx"]}, "retry", "does not list 'status'"),
    ]
    for retry, field, message in cases:
        r = await api.client.post("/api/workflows", json=_workflow(retry), headers=auth)
        assert r.status_code == 422, r.text
        body = r.json()
        assert body["success"] is False and body["error"]["code"] == "workflow_invalid"
        (problem,) = body["error"]["details"]
        assert (problem["step"], problem["field"]) == ("call", field), problem
        assert message in problem["message"]
    # an existing workflow cannot be updated to an invalid policy either
    workflow_id = await api.workflow(auth)
    r = await api.client.put(
        f"/api/workflows/{workflow_id}", json=_workflow({"retry_on": []}), headers=auth
    )
    assert r.status_code == 422 and r.json()["error"]["code"] == "workflow_invalid", r.text


async def test_a_valid_policy_is_kept_as_given(api: Api) -> None:
    auth = await api.tenant()
    retry = {"attempts": 4, "delay_s": 2, "retry_on": ["status", "timeout"],
             "retry_statuses": [404, "5xx"]}  # fmt: skip
    workflow_id = await api.workflow(auth, _workflow(retry))
    r = await api.client.get(f"/api/workflows/{workflow_id}", headers=auth)
    assert r.status_code == 200, r.text
    assert r.json()["data"]["definition"]["steps"][0]["retry"] == retry
