"""End to end through real processes (``conveyor api``, a worker, ``conveyor timers``): a parent
calls a child workflow (``workflow`` step); both wait — the child on an event — when the worker
is killed with SIGKILL; the event arrives through the API; a new worker finishes the child, whose
end wakes the parent, which returns the child's output. A real local HTTP target counts the
requests of both: no finished step ran twice. Saving a workflow step that calls another
tenant's workflow is a 422."""

from __future__ import annotations

import signal
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.conftest import ADMIN
from tests.api.test_e2e import _poll, _worker_argv
from tests.api.test_e2e_events import _create, _status, _trigger
from tests.engine._target import http_target
from tests.helpers import env_for, free_port, process, tenant_auth, wait_api_ready, wait_for

pytestmark = pytest.mark.slow


def _child_of(client: httpx.Client, auth: dict[str, str], workflow_id: str) -> dict[str, Any]:
    r = client.get("/api/executions", params={"workflowId": workflow_id}, headers=auth)
    assert r.status_code == 200, r.text
    (item,) = r.json()["data"]["items"]
    return dict(item)


def test_subworkflow_survives_a_killed_worker(api_env: dict[str, str], tmp_path: Path) -> None:
    api_port = free_port()
    with http_target() as target, ExitStack() as stack:
        env = env_for(**{**api_env, "API_PORT": str(api_port), "EXECUTION_REGIONS": "us",
                         "HTTP_ALLOWLIST": "127.0.0.1"})  # fmt: skip
        api = stack.enter_context(process(["-m", "conveyor.cli", "api"], env, tmp_path / "api.log"))
        stack.enter_context(process(["-m", "conveyor.cli", "timers"], env, tmp_path / "timers.log"))
        worker = stack.enter_context(process(_worker_argv(), env, tmp_path / "worker.log"))
        client = stack.enter_context(
            httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=10)
        )
        wait_api_ready(client, api, tmp_path / "api.log")
        auth = tenant_auth(client, "e2e-subflows", ADMIN)
        child_wf = _create(client, auth, {"name": "reserve", "steps": [
            {"id": "hold", "type": "http", "method": "POST", "url": target.url("/ok/hold"),
             "body": {"sku": "{{ input.sku }}"}, "select": "body.token"},
            {"id": "confirm", "type": "wait", "event": "confirmed", "timeout_s": 600},
            {"id": "commit", "type": "http", "method": "POST", "url": target.url("/ok/commit"),
             "select": "body.token"},
        ], "output": "{hold: steps.hold, commit: steps.commit, by: steps.confirm.payload.by}"})  # fmt: skip
        parent_wf = _create(client, auth, {"name": "order", "steps": [
            {"id": "quote", "type": "http", "url": target.url("/ok/quote"), "select": "body.token"},
            {"id": "reserve", "type": "workflow", "workflow": child_wf, "version": 1,
             "input": {"sku": "{{ input.sku }}"}},
            {"id": "ship", "type": "http", "method": "POST", "url": target.url("/ok/ship"),
             "body": {"reservation": "{{ steps.reserve.commit }}"}, "select": "body.token"},
        ], "output": "{quote: steps.quote, reserve: steps.reserve, ship: steps.ship}"})  # fmt: skip
        parent = _trigger(client, auth, parent_wf, {"sku": "A-1"})

        def child_waiting() -> dict[str, Any] | None:
            r = client.get("/api/executions", params={"workflowId": child_wf}, headers=auth)
            items = r.json()["data"]["items"]
            return items[0] if items and items[0]["status"] == "waiting" else None

        wait_for(child_waiting, timeout=30, interval=0.1)
        child = _child_of(client, auth, child_wf)
        assert child["triggeredBy"] == "workflow" and child["parentExecutionId"] == parent
        assert child["parentSeq"] == 1 and child["depth"] == 1
        waiting = _status(client, parent, auth)
        assert waiting["status"] == "waiting" and waiting["depth"] == 0
        assert [s["stepId"] for s in waiting["steps"]] == ["quote"]

        worker.send_signal(signal.SIGKILL)  # no worker while both wait, nor when the event comes
        worker.wait(10)
        r = client.post(f"/api/executions/{child['id']}/events/confirmed", json={"by": "ann"},
                        headers=auth)  # fmt: skip
        assert r.status_code == 202, r.text
        assert _status(client, parent, auth)["status"] == "waiting"

        again = stack.enter_context(process(_worker_argv(), env, tmp_path / "worker2.log"))
        done = _poll(client, parent, auth)
        assert done["status"] == "succeeded", done
        assert done["output"] == {
            "quote": "tok-quote",
            "reserve": {"hold": "tok-hold", "commit": "tok-commit", "by": "ann"},
            "ship": "tok-ship",
        }
        steps = [(s["stepId"], s["status"]) for s in done["steps"]]
        assert steps == [("quote", "succeeded"), ("reserve", "succeeded"), ("ship", "succeeded")]
        assert done["steps"][1]["input"]["childId"] == child["id"]
        finished = _status(client, child["id"], auth)
        assert finished["status"] == "succeeded" and finished["attempts"] == 1
        # every request exactly once: nothing that finished ran again after the kill
        assert dict(target.hits) == {"/ok/quote": 1, "/ok/hold": 1, "/ok/commit": 1, "/ok/ship": 1}
        assert again.poll() is None, (tmp_path / "worker2.log").read_text()[-3000:]

        # another tenant's workflow cannot be called: refused when the workflow is saved
        other = tenant_auth(client, "e2e-subflows-other", ADMIN)
        r = client.post("/api/workflows", headers=other, json={"name": "theirs", "steps": [
            {"id": "call", "type": "workflow", "workflow": child_wf}]})  # fmt: skip
        assert r.status_code == 422, r.text
        assert r.json()["error"]["details"][0]["step"] == "call"
        r = client.post(f"/api/executions/{parent}/events/conveyor.workflow.1", json={},
                        headers=auth)  # fmt: skip
        assert r.status_code == 400, r.text
