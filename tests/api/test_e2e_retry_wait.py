"""End to end through real processes (``conveyor api``, a worker, the timer dispatcher): an
``http`` step whose target answers 500, 500, then 200 waits for its retries on durable timers.
The worker is killed (SIGKILL) while the execution waits for its second try; a new worker and
the timer dispatcher complete it — and the target counts exactly three requests."""

from __future__ import annotations

import signal
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.conftest import ADMIN
from tests.api.test_e2e import _poll, _worker_argv
from tests.engine._script import scripted_target
from tests.helpers import env_for, free_port, process, tenant_auth, wait_api_ready, wait_for

pytestmark = pytest.mark.slow

TIMERS = ["-m", "conveyor.workers.timer_dispatcher"]


def test_a_retry_wait_survives_the_worker_being_killed(
    api_env: dict[str, str], tmp_path: Path
) -> None:
    api_port = free_port()
    with scripted_target() as target, ExitStack() as stack:
        env = env_for(**{**api_env, "API_PORT": str(api_port), "EXECUTION_REGIONS": "us",
                         "HTTP_ALLOWLIST": "127.0.0.1", "TIMER_POLL_INTERVAL_MS": "100",
                         "TIMER_LOOKAHEAD_MS": "1000"})  # fmt: skip
        api = stack.enter_context(process(["-m", "conveyor.cli", "api"], env, tmp_path / "api.log"))
        worker = stack.enter_context(process(_worker_argv(), env, tmp_path / "worker1.log"))
        stack.enter_context(process(TIMERS, env, tmp_path / "timers.log"))
        client = stack.enter_context(
            httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=10)
        )
        wait_api_ready(client, api, tmp_path / "api.log")
        auth = tenant_auth(client, "e2e-retry-wait", ADMIN)
        url = target.url("/charge", 500, 500, 200)
        definition: dict[str, Any] = {
            "name": "charge",
            "steps": [
                {"id": "charge", "type": "http", "url": url, "timeout_s": 10,
                 "retry": {"attempts": 3, "backoff": "fixed", "delay_s": 2}},
                {"id": "done", "type": "transform", "expression": "steps.charge.status"},
            ],
        }  # fmt: skip
        wf = client.post("/api/workflows", json=definition, headers=auth)
        assert wf.status_code == 201, wf.text
        r = client.post(f"/api/workflows/{wf.json()['data']['id']}/executions", headers=auth)
        assert r.status_code == 202, r.text
        execution_id = r.json()["data"]["id"]

        def waiting_after(tries: int) -> dict[str, Any] | None:
            found = client.get(f"/api/executions/{execution_id}", headers=auth).json()["data"]
            waiting = found["status"] == "waiting" and found["stepAttempt"] == tries
            return found if waiting else None

        first: Any = wait_for(lambda: waiting_after(1), timeout=20, interval=0.05)
        assert target.hits["/charge"] == 1 and first["stepsRun"] == 0
        assert [(e["attempt"], e["details"]["status"]) for e in first["stepErrors"]] == [(1, 500)]
        wait_for(lambda: waiting_after(2), timeout=20, interval=0.05)
        worker.send_signal(signal.SIGKILL)  # while it waits for the third try
        worker.wait(10)
        assert target.hits["/charge"] == 2
        stack.enter_context(process(_worker_argv(), env, tmp_path / "worker2.log"))

        done = _poll(client, execution_id, auth)
        assert done["status"] == "succeeded", done
        assert done["output"] == 200 and done["attempts"] == 1
        assert (done["stepAttempt"], done["stepErrors"]) == (0, None)
        assert target.hits["/charge"] == 3  # no extra try
        charge = done["steps"][0]
        assert (charge["stepId"], charge["status"], charge["attempts"]) == (
            "charge",
            "succeeded",
            3,
        )
