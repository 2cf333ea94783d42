"""End to end through real processes: ``conveyor api`` + ``conveyor worker`` as subprocesses,
a workflow with ``http`` (to a local, allow-listed server), ``transform`` and ``condition``
steps, triggered over HTTP and polled until it succeeds."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from conveyor.cli import COMMANDS
from tests.api.conftest import ADMIN
from tests.helpers import env_for, free_port, process, tenant_auth, wait_api_ready, wait_for

pytestmark = pytest.mark.slow


class _Orders(BaseHTTPRequestHandler):
    calls: list[str] = []

    def do_GET(self) -> None:
        _Orders.calls.append(self.path)
        order_id = int(self.path.rsplit("/", 1)[-1])
        body = json.dumps({"id": order_id, "total": order_id * 10, "currency": "EUR"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


@contextmanager
def orders_server() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Orders)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def _worker_argv() -> list[str]:
    if any(c.name == "worker" for c in COMMANDS):
        return ["-m", "conveyor.cli", "worker"]
    return ["-m", "conveyor.workers.execution"]


def workflow(port: int) -> dict[str, Any]:
    return {
        "name": "order-check",
        "steps": [
            {"id": "fetch", "type": "http",
             "url": f"http://127.0.0.1:{port}/orders/{{{{ input.orderId }}}}"},
            {"id": "shape", "type": "transform",
             "expression": "{id: steps.fetch.body.id, total: steps.fetch.body.total}"},
            {"id": "big", "type": "condition", "expression": "steps.shape.total > `100`",
             "then": "continue", "else": "end"},
            {"id": "label", "type": "transform",
             "expression": "{label: join(' ', ['big order', to_string(steps.shape.id)])}"},
        ],
    }  # fmt: skip


def _poll(client: httpx.Client, execution_id: str, auth: dict[str, str]) -> dict[str, Any]:
    def done() -> dict[str, Any] | None:
        data: dict[str, Any] = client.get(f"/api/executions/{execution_id}", headers=auth).json()[
            "data"
        ]
        return data if data["status"] in ("succeeded", "failed", "cancelled") else None

    return wait_for(done, timeout=30, interval=0.1)  # type: ignore[return-value]


def test_trigger_runs_through_api_and_worker(api_env: dict[str, str], tmp_path: Path) -> None:
    api_port = free_port()
    with orders_server() as orders_port, ExitStack() as stack:
        env = env_for(**{**api_env, "API_PORT": str(api_port), "EXECUTION_REGIONS": "us",
                         "HTTP_ALLOWLIST": "127.0.0.1", "HEARTBEAT_INTERVAL_MS": "500"})  # fmt: skip
        api = stack.enter_context(process(["-m", "conveyor.cli", "api"], env, tmp_path / "api.log"))
        worker = stack.enter_context(process(_worker_argv(), env, tmp_path / "worker.log"))
        client = stack.enter_context(
            httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=10)
        )

        wait_api_ready(client, api, tmp_path / "api.log")
        auth = tenant_auth(client, "e2e", ADMIN)
        wf = client.post("/api/workflows", json=workflow(orders_port), headers=auth)
        assert wf.status_code == 201, wf.text
        wf_id = wf.json()["data"]["id"]

        started = time.monotonic()
        big = client.post(f"/api/workflows/{wf_id}/executions", json={"input": {"orderId": 42}},
                          headers=auth)  # fmt: skip
        small = client.post(f"/api/workflows/{wf_id}/executions", json={"input": {"orderId": 3}},
                            headers=auth)  # fmt: skip
        assert big.status_code == 202 and small.status_code == 202

        done = _poll(client, big.json()["data"]["id"], auth)
        assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
        assert done["status"] == "succeeded", done
        steps = {s["stepId"]: s for s in done["steps"]}
        assert list(steps) == ["fetch", "shape", "big", "label"]
        assert steps["fetch"]["output"]["status"] == 200
        assert steps["fetch"]["output"]["body"] == {"id": 42, "total": 420, "currency": "EUR"}
        assert steps["shape"]["output"] == {"id": 42, "total": 420}
        assert steps["big"]["output"]["branch"] == "then"
        assert steps["label"]["output"] == {"label": "big order 42"}
        assert all(s["status"] == "succeeded" and s["attempts"] == 1 for s in steps.values())

        done = _poll(client, small.json()["data"]["id"], auth)
        assert done["status"] == "succeeded"
        assert [s["stepId"] for s in done["steps"]] == ["fetch", "shape", "big"]
        assert done["steps"][2]["output"]["branch"] == "else"
        assert sorted(_Orders.calls) == ["/orders/3", "/orders/42"]
        assert time.monotonic() - started < 30

        def worker_seen() -> dict[str, Any] | None:
            data: dict[str, Any] = client.get("/api/admin/workers/status", headers=ADMIN).json()[
                "data"
            ]
            return data if data["executionWorker"]["started"] else None

        status = wait_for(worker_seen, timeout=10, interval=0.2)
        assert isinstance(status, dict)
        depth = status["executionWorker"]["metrics"]["queueDepths"]["workflow.execute.us"]
        assert depth["waiting"] == 0
        regions = {q["region"]: q["status"] for q in status["regions"]}
        assert regions["us"] == "consumed"
