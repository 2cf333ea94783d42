"""End to end through real processes (``conveyor api``, a worker, ``conveyor timers``): an
execution parks on a ``wait`` step; the worker is killed with SIGKILL while it waits; the event
arrives through the API; a new worker completes the execution with the event's payload. A
second execution's wait times out: the timer dispatcher resumes it on its ``on_timeout``."""

from __future__ import annotations

import signal
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.conftest import ADMIN
from tests.api.test_e2e import _poll, _worker_argv
from tests.helpers import env_for, free_port, process, tenant_auth, wait_api_ready, wait_for

pytestmark = pytest.mark.slow


def _status(client: httpx.Client, execution_id: str, auth: dict[str, str]) -> dict[str, Any]:
    data: dict[str, Any] = client.get(f"/api/executions/{execution_id}", headers=auth).json()[
        "data"
    ]
    return data


def _create(client: httpx.Client, auth: dict[str, str], definition: dict[str, Any]) -> str:
    r = client.post("/api/workflows", json=definition, headers=auth)
    assert r.status_code == 201, r.text
    return str(r.json()["data"]["id"])


def _trigger(client: httpx.Client, auth: dict[str, str], wf: str, input: Any) -> str:
    r = client.post(f"/api/workflows/{wf}/executions", json={"input": input}, headers=auth)
    assert r.status_code == 202, r.text
    return str(r.json()["data"]["id"])


def test_event_after_the_worker_was_killed_and_a_timeout(
    api_env: dict[str, str], tmp_path: Path
) -> None:
    api_port = free_port()
    with ExitStack() as stack:
        env = env_for(**{**api_env, "API_PORT": str(api_port), "EXECUTION_REGIONS": "us"})
        api = stack.enter_context(process(["-m", "conveyor.cli", "api"], env, tmp_path / "api.log"))
        stack.enter_context(process(["-m", "conveyor.cli", "timers"], env, tmp_path / "timers.log"))
        worker = stack.enter_context(process(_worker_argv(), env, tmp_path / "worker.log"))
        client = stack.enter_context(
            httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=10)
        )
        wait_api_ready(client, api, tmp_path / "api.log")
        auth = tenant_auth(client, "e2e-events", ADMIN)
        approval = _create(client, auth, {"name": "approval", "steps": [
            {"id": "ask", "type": "transform", "expression": "{order: input.order}"},
            {"id": "approved", "type": "wait", "event": "approved", "timeout_s": 600},
            {"id": "ship", "type": "transform",
             "expression": "{order: steps.ask.order, by: steps.approved.payload.by}"},
        ]})  # fmt: skip
        execution_id = _trigger(client, auth, approval, {"order": 5})
        waiting = wait_for(
            lambda: (d := _status(client, execution_id, auth))["status"] == "waiting" and d,
            timeout=30,
            interval=0.1,
        )
        assert [s["stepId"] for s in waiting["steps"]] == ["ask"]  # type: ignore[index]

        worker.send_signal(signal.SIGKILL)  # no worker while it waits, nor when the event comes
        worker.wait(10)
        r = client.post(f"/api/executions/{execution_id}/events/approved", json={"by": "ann"},
                        headers=auth)  # fmt: skip
        assert r.status_code == 202, r.text
        assert r.json()["data"]["woken"] == [execution_id]
        assert _status(client, execution_id, auth)["status"] == "waiting"

        again = stack.enter_context(process(_worker_argv(), env, tmp_path / "worker2.log"))
        done = _poll(client, execution_id, auth)
        assert done["status"] == "succeeded", done
        assert done["output"] == {"order": 5, "by": "ann"}
        steps = [(s["stepId"], s["status"]) for s in done["steps"]]
        assert steps == [("ask", "succeeded"), ("approved", "succeeded"), ("ship", "succeeded")]
        assert done["steps"][1]["output"]["payload"] == {"by": "ann"}

        # a wait that times out: the timer dispatcher resumes it on its on_timeout branch
        reminder = _create(client, auth, {"name": "reminder", "steps": [
            {"id": "reply", "type": "wait", "event": "reply", "timeout_s": 1,
             "on_timeout": {"goto": "remind"}},
            {"id": "thank", "type": "transform", "expression": "'thanks'"},
            {"id": "remind", "type": "transform", "expression": "{timedOut: steps.reply.timedOut}"},
        ]})  # fmt: skip
        late = _trigger(client, auth, reminder, None)
        timed_out = _poll(client, late, auth)
        assert timed_out["status"] == "succeeded", timed_out
        assert timed_out["output"] == {"timedOut": True}
        assert [s["stepId"] for s in timed_out["steps"]] == ["reply", "remind"]
        r = client.post(f"/api/executions/{late}/events/reply", json={}, headers=auth)
        assert r.status_code == 409, r.text
        assert again.poll() is None, (tmp_path / "worker2.log").read_text()[-3000:]
