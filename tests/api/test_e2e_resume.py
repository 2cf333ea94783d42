"""End to end through real processes (``conveyor api`` + a worker as subprocesses): a step
fails because its target answers 500; once the target answers 200, ``POST .../retry`` with
``{"from": "failed"}`` completes the execution without calling the steps before the failed
one again, and the workflow's ``output`` expression builds the result."""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.conftest import ADMIN
from tests.api.test_e2e import _poll, _worker_argv
from tests.engine._target import http_target
from tests.helpers import env_for, free_port, process, tenant_auth, wait_api_ready

pytestmark = pytest.mark.slow


def test_retry_from_failed_step_through_api_and_worker(
    api_env: dict[str, str], tmp_path: Path
) -> None:
    api_port = free_port()
    with http_target() as target, ExitStack() as stack:
        env = env_for(**{**api_env, "API_PORT": str(api_port), "EXECUTION_REGIONS": "us",
                         "HTTP_ALLOWLIST": "127.0.0.1"})  # fmt: skip
        api = stack.enter_context(process(["-m", "conveyor.cli", "api"], env, tmp_path / "api.log"))
        worker = stack.enter_context(process(_worker_argv(), env, tmp_path / "worker.log"))
        client = stack.enter_context(
            httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=10)
        )
        wait_api_ready(client, api, tmp_path / "api.log")
        auth = tenant_auth(client, "e2e-resume", ADMIN)
        definition: dict[str, Any] = {
            "name": "charge",
            "steps": [
                {"id": "quote", "type": "http", "url": target.url("/ok/quote"), "select": "body"},
                {"id": "charge", "type": "http", "method": "POST",
                 "url": target.url("/flaky/charge"), "body": {"token": "{{ steps.quote.token }}"}},
                {"id": "receipt", "type": "transform",
                 "expression": "{paid: steps.charge.status, for: input.order}"},
            ],
            "output": "{quote: steps.quote.token, receipt: steps.receipt}",
        }  # fmt: skip
        wf = client.post("/api/workflows", json=definition, headers=auth)
        assert wf.status_code == 201, wf.text
        wf_id = wf.json()["data"]["id"]

        r = client.post(f"/api/workflows/{wf_id}/executions", json={"input": {"order": 9}},
                        headers=auth)  # fmt: skip
        assert r.status_code == 202, r.text
        original = r.json()["data"]["id"]
        failed = _poll(client, original, auth)
        assert failed["status"] == "failed", failed
        assert failed["error"]["step"] == "charge" and failed["output"] is None
        assert dict(target.hits) == {"/ok/quote": 1, "/flaky/charge": 1}

        target.failing = False  # the target recovers
        headers = {**auth, "Idempotency-Key": f"resume-{original}"}
        r = client.post(f"/api/executions/{original}/retry", json={"from": "failed"},
                        headers=headers)  # fmt: skip
        assert r.status_code == 202, r.text
        retry = r.json()["data"]
        assert retry["retryOf"] == original and retry["triggeredBy"] == "retry"
        done = _poll(client, retry["id"], auth)
        assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
        assert done["status"] == "succeeded", done
        assert done["output"] == {"quote": "tok-quote", "receipt": {"paid": 200, "for": 9}}
        steps = [(s["stepId"], s["status"], s["reusedFrom"]) for s in done["steps"]]
        assert steps == [("quote", "succeeded", original), ("charge", "succeeded", None),
                         ("receipt", "succeeded", None)]  # fmt: skip
        # the step before the failed one did not run again; the failed step ran once more
        assert dict(target.hits) == {"/ok/quote": 1, "/flaky/charge": 2}

        replay = client.post(f"/api/executions/{original}/retry", json={"from": "failed"},
                             headers=headers)  # fmt: skip
        assert replay.status_code == 200 and replay.json()["data"]["id"] == retry["id"]
        assert dict(target.hits) == {"/ok/quote": 1, "/flaky/charge": 2}
