"""Conveyor on a real Redis Cluster (three masters, three replicas), with real processes.

An API, a worker of region ``us``, a worker of region ``eu``, the scheduler and the timer
dispatcher, configured only with ``QUEUE_REDIS_CLUSTER_NODES``. Triggers go to a workflow in
each region (``http`` → ``delay``, a durable timer → ``transform``) at a steady rate and a
per-second cron schedule runs; each regional queue lives on the shard its hash tag names (two
different masters). Readiness, health, ``conveyor check`` and ``conveyor status`` report the
cluster. Then the master holding ``us``'s slot is SIGKILLed: its replica takes over, the load
goes on, and every accepted execution and every due cron tick ends ``succeeded`` with no
``http`` step run twice.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from conveyor.settings import load_settings
from conveyor.store import migrate
from tests.helpers import free_port, wait_for
from tests.redis_cluster._cluster import Cluster, redis_cluster
from tests.redis_ha._failover import (
    ADMIN,
    ADMIN_TOKEN,
    ROOT,
    Load,
    Proc,
    _Counter,
    _statuses,
    counting_server,
)

pytestmark = pytest.mark.slow

ENDED = ("succeeded", "failed", "cancelled")


def _env(
    cluster: Cluster, database_url: str, prefix: str, api_port: int, target: int
) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("QUEUE_", "EXECUTION_", "DATABASE_URL", "ADMIN_TOKEN", "API_"))
    }
    env.update(
        cluster.env(),
        QUEUE_PREFIX=prefix,
        DATABASE_URL=database_url,
        ADMIN_TOKEN=ADMIN_TOKEN,
        API_PORT=str(api_port),
        EXECUTION_REGIONS="us,eu",
        HTTP_ALLOWLIST=f"127.0.0.1:{target}",
        EXECUTION_WORKER_CONCURRENCY="8",
        EXECUTION_LOCK_DURATION_MS="5000",
        EXECUTION_STALLED_INTERVAL_MS="2000",
        HEARTBEAT_INTERVAL_MS="500",
        SCHEDULER_POLL_INTERVAL_MS="200",
        SCHEDULER_LOOKAHEAD_MS="2000",
        RECONCILE_INTERVAL_MS="1000",
        RECONCILE_MIN_AGE_MS="2000",
        TIMER_POLL_INTERVAL_MS="100",
        TIMER_LOOKAHEAD_MS="1000",
        SHUTDOWN_GRACE_MS="3000",
        LOG_FORMAT="json",
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    return env


@contextmanager
def _processes(env: dict[str, str], logdir: Path) -> Iterator[list[Proc]]:
    """API, a worker per region, scheduler, timers; stopped by PID at the end."""
    procs: list[Proc] = []
    try:
        for argv, name, regions in (
            (["api"], "api", "us,eu"),
            (["worker"], "worker-us", "us"),
            (["worker"], "worker-eu", "eu"),
            (["scheduler"], "scheduler", "us,eu"),
            (["timers"], "timers", "us,eu"),
        ):
            procs.append(Proc(argv, {**env, "EXECUTION_REGIONS": regions}, name, logdir))
        yield procs
    except BaseException:
        for p in procs:
            sys.stderr.write(f"--- {p.name} ---\n{p.tail()}\n")
        raise
    finally:
        for p in procs:
            p.stop()


def _workflow(port: int, region: str) -> dict[str, Any]:
    return {
        "name": f"cluster-{region}",
        "region": region,
        "steps": [
            {"id": "call", "type": "http",
             "url": f"http://127.0.0.1:{port}/hit/{region}/{{{{ input.n }}}}"},
            {"id": "pause", "type": "delay", "seconds": 0.5},
            {"id": "shape", "type": "transform", "expression": "{n: input.n}"},
        ],
    }  # fmt: skip


@pytest.mark.timeout(240)
def test_conveyor_on_a_cluster_survives_a_master_kill(
    fresh_pg_url: str, redis_prefix: str, tmp_path: Path
) -> None:
    asyncio.run(migrate(load_settings({"DATABASE_URL": fresh_pg_url})))
    with ExitStack() as stack:
        cluster = stack.enter_context(redis_cluster())
        target = stack.enter_context(counting_server())
        api_port = free_port()
        env = _env(cluster, fresh_pg_url, redis_prefix, api_port, target)
        procs = stack.enter_context(_processes(env, tmp_path))
        client = stack.enter_context(
            httpx.Client(base_url=f"http://127.0.0.1:{api_port}", timeout=10)
        )

        def consumed() -> dict[str, Any] | None:
            for p in procs:
                assert p.alive(), f"{p.name} exited:\n{p.tail()}"
            try:
                r = client.get("/api/health/ready")
            except httpx.HTTPError:
                return None
            if r.status_code != 200:
                return None
            data: dict[str, Any] = r.json()["data"]
            queues = {q["region"]: q for q in data["queues"]}
            ok = set(queues) == {"us", "eu"} and all(
                q["status"] in ("consumed", "idle") and q["workers"] == 1 for q in queues.values()
            )
            return data if ok else None

        ready = wait_for(consumed, timeout=60, interval=0.2)
        assert isinstance(ready, dict)
        view = ready["redis"]["cluster"]
        assert view["state"] == "ok" and view["slotsOk"] == 16384, view
        assert len(view["masters"]) == 3 and view["replicas"] == 3 and view["knownNodes"] == 6
        health = client.get("/api/health").json()["data"]
        assert health["status"] == "ok" and health["queue"]["cluster"]["state"] == "ok", health
        assert health["queue"]["warnings"] == [], health

        check = subprocess.run([sys.executable, "-m", "conveyor.cli", "check"], env=env,
                               capture_output=True, text=True, timeout=60)  # fmt: skip
        assert check.returncode == 0, check.stderr
        assert "redis cluster ok: 3 masters, 3 replicas" in check.stdout, check.stdout

        tenant = client.post("/api/admin/tenants", json={"name": "cluster"}, headers=ADMIN)
        key = client.post(f"/api/admin/tenants/{tenant.json()['data']['id']}/api-keys",
                          headers=ADMIN)  # fmt: skip
        auth = {"Authorization": f"Bearer {key.json()['data']['key']}"}
        loads: dict[str, Load] = {}
        for region in ("us", "eu"):
            wf = client.post("/api/workflows", json=_workflow(target, region), headers=auth)
            assert wf.status_code == 201, wf.text
            loads[region] = Load(client, str(wf.json()["data"]["id"]), auth, rate=8.0)
        noop = client.post("/api/workflows", headers=auth,
                           json={"name": "tick", "steps": [{"id": "n", "type": "noop"}]})  # fmt: skip
        schedule = client.post(
            "/api/schedules",
            json={"workflowId": noop.json()["data"]["id"], "cron": "* * * * * *", "timezone": "UTC"},
            headers=auth,
        )  # fmt: skip
        assert schedule.status_code == 201, schedule.text

        # Each regional queue lives on the master of its hash tag's slot: two different shards.
        us_key = f"{redis_prefix}:{{workflow.execute.us}}:id"
        eu_key = f"{redis_prefix}:{{workflow.execute.eu}}:id"
        for load in loads.values():
            load.start()
        try:
            wait_for(lambda: all(len(load.accepted) >= 10 for load in loads.values()), timeout=20)
            us_master, eu_master = cluster.master_of(us_key), cluster.master_of(eu_key)
            assert us_master.port != eu_master.port
            assert us_master.client().exists(us_key) == 1
            assert eu_master.client().exists(eu_key) == 1
            time.sleep(2.0)

            us_master.kill()  # kill -9 the master holding us's slot
            killed = time.monotonic()
            wait_for(lambda: cluster.master_of(us_key).port != us_master.port, timeout=20,
                     interval=0.1)  # fmt: skip
            failover_s = time.monotonic() - killed
            time.sleep(max(0.0, 8.0 - (time.monotonic() - killed)))
        finally:
            for load in loads.values():
                load.stop()
        stopped = datetime.now(UTC)
        accepted = {r: dict(load.accepted) for r, load in loads.items()}
        refused = [x for load in loads.values() for x in load.refused]
        assert refused == [], refused[:5]
        ids = {eid for per in accepted.values() for eid, _ in per.values()}
        after_kill = [n for n, (_, sent) in accepted["us"].items() if sent >= killed + failover_s]
        assert len(after_kill) > 10

        def settled() -> bool:
            statuses, _, cron = asyncio.run(_statuses(fresh_pg_url))
            pending = [i for i in ids if statuses.get(i) not in ENDED]
            return not pending and not [s for t, s in cron if t <= stopped and s not in ENDED]

        wait_for(settled, timeout=60, interval=0.5)
        statuses, retried, cron = asyncio.run(_statuses(fresh_pg_url))
        not_succeeded = {i: statuses.get(i) for i in ids if statuses.get(i) != "succeeded"}
        assert not_succeeded == {}, not_succeeded
        due_cron = [s for t, s in cron if t <= stopped]
        assert len(due_cron) > 5 and set(due_cron) == {"succeeded"}, due_cron
        with _Counter.lock:
            hits = {path: len(times) for path, times in _Counter.hits.items()}
            first_hit = {path: min(times) for path, times in _Counter.hits.items()}
        # Consumption of us resumed: the first http step of a us execution triggered after the
        # kill (its slot's master was gone until the replica took over).
        triggered_after = [n for n, (_, sent) in accepted["us"].items() if sent >= killed]
        resume_s = min(first_hit[f"/hit/us/{n}"] for n in triggered_after) - killed
        print(json.dumps({"failover_s": round(failover_s, 3), "resume_s": round(resume_s, 3),
                          "accepted": len(ids), "after_kill": len(triggered_after),
                          "reconciled": sum(p.tail(10**7).count('"reconcile.enqueued"')
                                            for p in procs),
                          "cron_ticks": len(due_cron)}))  # fmt: skip
        assert resume_s < 10.0
        for region, per in accepted.items():
            for n in per:
                assert hits.get(f"/hit/{region}/{n}") == 1, (
                    region,
                    n,
                    hits.get(f"/hit/{region}/{n}"),
                )
        assert retried == 0
        # The us worker consumed again after the failover: executions triggered afterwards ran.
        assert all(statuses[accepted["us"][n][0]] == "succeeded" for n in after_kill)

        after = client.get("/api/health").json()["data"]["queue"]
        assert after["cluster"]["state"] == "ok", after
        assert f"127.0.0.1:{us_master.port}" not in after["cluster"]["masters"], after
        # Three masters again (the promoted replica), two replicas, the dead node flagged.
        assert len(after["cluster"]["masters"]) == 3 and after["cluster"]["replicas"] == 2, after
        assert after["cluster"]["failed"] == 1, after
        assert "1 cluster nodes are seen failing" in after["warnings"], after
        assert any("2 replicas for 3 masters" in w for w in after["warnings"]), after

        # The workers' totals, published to the cluster (every few seconds), read by the API.
        def finished() -> bool:
            metrics = client.get("/metrics")
            assert metrics.status_code == 200
            assert "conveyor_metrics_redis_up 1.0" in metrics.text, metrics.text[:2000]
            prefix = 'conveyor_executions_finished_total{status="succeeded"}'
            lines = [line for line in metrics.text.splitlines() if line.startswith(prefix)]
            return bool(lines) and float(lines[0].split()[-1]) >= len(ids)

        wait_for(finished, timeout=20, interval=0.5)
        storage = client.get("/api/admin/storage", headers=ADMIN).json()["data"]
        assert storage["redis"]["status"] == "ready" and storage["redis"]["usedMemory"] > 0, storage
        status = subprocess.run([sys.executable, "-m", "conveyor.cli", "status"], env=env,
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        assert status.returncode == 0, status.stderr
        assert "redis cluster ok: 3 masters, 2 replicas" in status.stdout, status.stdout
