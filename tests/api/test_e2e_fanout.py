"""End to end through real processes (``conveyor api``, a worker, ``conveyor timers``): a
``parallel`` step (one branch waits on a delay whose timer dispatcher is killed with SIGKILL)
then a ``foreach`` of 1,000 items at concurrency 10, each an ``http`` call to a real local
target. The worker is frozen and killed with SIGKILL in the middle of the foreach; a new worker
finishes it. The results come back in item order; no item whose step had finished before the
kill was called again (only those in flight at the kill may be), and no more than 10 item
children were ever unfinished at once."""

from __future__ import annotations

import asyncio
import signal
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import httpx
import pytest

from conveyor.store import asyncpg_dsn
from tests.api.conftest import ADMIN
from tests.api.test_e2e import _worker_argv
from tests.api.test_e2e_events import _create, _status, _trigger
from tests.engine._target import http_target
from tests.helpers import env_for, free_port, process, tenant_auth, wait_api_ready, wait_for

pytestmark = pytest.mark.slow

ITEMS = 1000
CONCURRENCY = 10


def _children(url: str, parent_id: str) -> list[dict[str, Any]]:
    """The children of ``parent_id`` (read from the database: the API lists pages of 200)."""

    async def read() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(asyncpg_dsn(url))
        try:
            rows = await conn.fetch(
                "SELECT id, status, branch, parent_seq, parent_index FROM executions"
                " WHERE parent_execution_id = $1 ORDER BY parent_seq, parent_index",
                parent_id,
            )
        finally:
            await conn.close()
        return [dict(r) for r in rows]

    return asyncio.run(read())


@pytest.mark.timeout(600)  # a loaded CI host runs it several times slower than a quiet one
def test_parallel_then_foreach_of_1000_survive_kills(
    api_env: dict[str, str], tmp_path: Path
) -> None:
    api_port = free_port()
    with http_target() as target, ExitStack() as stack:
        env = env_for(**{**api_env, "API_PORT": str(api_port), "EXECUTION_REGIONS": "us",
                         "HTTP_ALLOWLIST": "127.0.0.1", "EXECUTION_WORKER_CONCURRENCY": "20",
                         # a killed worker's jobs come back within seconds, not a minute
                         "EXECUTION_LOCK_DURATION_MS": "5000",
                         "EXECUTION_STALLED_INTERVAL_MS": "2000"})  # fmt: skip
        api = stack.enter_context(process(["-m", "conveyor.cli", "api"], env, tmp_path / "api.log"))
        timers = stack.enter_context(
            process(["-m", "conveyor.cli", "timers"], env, tmp_path / "timers.log")
        )
        worker = stack.enter_context(process(_worker_argv(), env, tmp_path / "worker.log"))
        client = stack.enter_context(
            httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=10)
        )
        wait_api_ready(client, api, tmp_path / "api.log")
        auth = tenant_auth(client, "e2e-fanout", ADMIN)
        wf = _create(client, auth, {"name": "fan-out", "steps": [
            {"id": "fan", "type": "parallel", "branches": [
                [{"id": "a", "type": "http", "url": target.url("/ok/a"), "select": "body.name"}],
                [{"id": "pause", "type": "delay", "seconds": 1},
                 {"id": "b", "type": "http", "url": target.url("/ok/b"), "select": "body.name"}],
            ]},
            {"id": "each", "type": "foreach", "items": "input.ids", "concurrency": CONCURRENCY,
             "input": {"id": "{{ item }}", "from": "{{ steps.fan[0] }}"},
             "steps": [{"id": "call", "type": "http", "method": "POST",
                        "url": target.url("/ok/item-{{ input.id }}"),
                        "body": {"from": "{{ input.from }}"}, "select": "body.name"}]},
        ], "output": "{fan: steps.fan, each: steps.each}"})  # fmt: skip
        parent = _trigger(client, auth, wf, {"ids": list(range(ITEMS))})

        # the delay branch is parked on its timer: kill the timer dispatcher, start another
        def delayed() -> bool:
            kids = _children(api_env["DATABASE_URL"], parent)
            return any(k["branch"] == "fan.1" and k["status"] == "waiting" for k in kids)

        wait_for(delayed, timeout=30, interval=0.05)
        timers.send_signal(signal.SIGKILL)
        timers.wait(10)
        stack.enter_context(process(["-m", "conveyor.cli", "timers"], env, tmp_path / "t2.log"))

        # in the middle of the foreach: freeze the worker, note what finished, kill it
        most_active = 0

        def halfway() -> bool:
            nonlocal most_active
            kids = [k for k in _children(api_env["DATABASE_URL"], parent) if k["branch"] == "each"]
            active = sum(k["status"] in ("queued", "running", "waiting") for k in kids)
            most_active = max(most_active, active)
            return bool(sum(k["status"] == "succeeded" for k in kids) >= 150)

        wait_for(halfway, timeout=300, interval=0.05)
        worker.send_signal(signal.SIGSTOP)
        finished = {
            k["parent_index"]
            for k in _children(api_env["DATABASE_URL"], parent)
            if k["branch"] == "each" and k["status"] == "succeeded"
        }
        worker.send_signal(signal.SIGKILL)
        worker.wait(10)
        assert 150 <= len(finished) < ITEMS
        again = stack.enter_context(process(_worker_argv(), env, tmp_path / "worker2.log"))

        # slow is tolerated (a loaded host), stuck is not: no item ending for 60 s fails it
        progress = {"ended": -1, "at": time.monotonic()}

        def done() -> dict[str, Any] | None:
            nonlocal most_active
            kids = [k for k in _children(api_env["DATABASE_URL"], parent) if k["branch"] == "each"]
            most_active = max(
                most_active, sum(k["status"] in ("queued", "running", "waiting") for k in kids)
            )
            ended = sum(k["status"] in ("succeeded", "failed", "cancelled") for k in kids)
            if ended > progress["ended"]:
                progress.update(ended=ended, at=time.monotonic())
            elif time.monotonic() - progress["at"] > 60:
                log = (tmp_path / "worker2.log").read_text()[-3000:]
                raise AssertionError(f"stuck: {ended} of {ITEMS} items ended, none for 60 s\n{log}")
            data = _status(client, parent, auth)
            return data if data["status"] in ("succeeded", "failed", "cancelled") else None

        result: dict[str, Any] = wait_for(done, timeout=540, interval=0.2)  # type: ignore[assignment]
        assert result["status"] == "succeeded", result.get("error")
        assert result["output"]["fan"] == ["a", "b"]
        assert result["output"]["each"] == [f"item-{i}" for i in range(ITEMS)]
        assert [s["stepId"] for s in result["steps"]] == ["fan", "each"]
        assert result["steps"][1]["input"] == {"items": ITEMS, "concurrency": CONCURRENCY}
        kids = _children(api_env["DATABASE_URL"], parent)
        branch = _status(client, kids[1]["id"], auth)
        assert (branch["triggeredBy"], branch["parentExecutionId"]) == ("parallel", parent)
        assert (branch["branch"], branch["parentSeq"], branch["parentIndex"]) == ("fan.1", 0, 1)
        assert [s["stepId"] for s in branch["steps"]] == ["pause", "b"]
        item = _status(client, kids[-1]["id"], auth)
        assert (item["triggeredBy"], item["branch"], item["parentIndex"]) == (
            "foreach",
            "each",
            ITEMS - 1,
        )
        assert (
            item["input"] == {"id": ITEMS - 1, "from": "a"}
            and item["output"] == f"item-{ITEMS - 1}"
        )
        assert [k["branch"] for k in kids[:2]] == ["fan.0", "fan.1"]
        items = [k for k in kids if k["branch"] == "each"]
        assert [k["parent_index"] for k in items] == list(range(ITEMS))  # each created once
        assert {k["status"] for k in kids} == {"succeeded"} and len(kids) == ITEMS + 2
        assert most_active <= CONCURRENCY, most_active
        hits = dict(target.hits)
        assert hits["/ok/a"] == 1 and hits["/ok/b"] == 1
        for index in range(ITEMS):
            count = hits.get(f"/ok/item-{index}", 0)
            assert count >= 1, index
            if index in finished:  # finished before the kill: never called again
                assert count == 1, (index, count)
        twice = [i for i in range(ITEMS) if hits.get(f"/ok/item-{i}", 0) > 1]
        assert len(twice) <= CONCURRENCY, twice  # only those in flight at the kill
        assert again.poll() is None, (tmp_path / "worker2.log").read_text()[-3000:]
