"""MetricsPublisher → Redis → the API's /metrics (Prometheus text)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conveyor.api import probes
from conveyor.dispatch import keys
from conveyor.engine import Engine, OutcomeKind
from conveyor.queue import QueueFactory, WorkflowExecute
from conveyor.runtime import Heartbeat, MetricsPublisher, Supervisor
from conveyor.runtime.metrics import BUCKETS, OTHER_TENANT, TENANT_LIMIT, _Hist
from conveyor.workers import execution
from tests.api._support import restartable_redis
from tests.api.conftest import Api, make_settings
from tests.engine._support import start


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


async def test_metrics_render_published_data_and_queue_depths(api: Api) -> None:
    publisher = MetricsPublisher(api.ctx.queues)
    publisher.observe_execution(0.2, "succeeded")
    publisher.observe_execution(3.0, "succeeded")
    publisher.observe_execution(0.004, "failed")
    publisher.observe_start_latency(0.003)
    publisher.observe_scheduler_lag(0.02)
    publisher.observe_timer_lag(0.5)
    await publisher.flush()
    other = MetricsPublisher(api.ctx.queues)  # a second process adds to the same totals
    other.observe_execution(0.2, "succeeded")
    await other.flush()
    await api.ctx.dispatcher.enqueue(
        WorkflowExecute(execution_id="e1", tenant_id="t", workflow_id="w", region="us")
    )
    await api.client.get("/api/health")

    r = await api.client.get("/metrics")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    s = _samples(r.text)
    assert s[("conveyor_executions_finished_total", (("status", "succeeded"),))] == 3
    assert s[("conveyor_executions_finished_total", (("status", "failed"),))] == 1
    key = ("conveyor_execution_duration_seconds_bucket", (("le", "0.25"), ("status", "succeeded")))
    assert s[key] == 2
    key = ("conveyor_execution_duration_seconds_bucket", (("le", "+Inf"), ("status", "succeeded")))
    assert s[key] == 3
    assert s[("conveyor_execution_duration_seconds_count", (("status", "succeeded"),))] == 3
    assert s[("conveyor_execution_duration_seconds_sum", (("status", "succeeded"),))] == (
        pytest.approx(3.4)
    )
    assert s[("conveyor_start_latency_seconds_bucket", (("le", "0.005"),))] == 1
    assert s[("conveyor_scheduler_lag_seconds_count", ())] == 1
    assert s[("conveyor_timer_lag_last_seconds", ())] == 0.5
    waiting = s[("conveyor_queue_jobs", (("queue", "workflow.execute.us"), ("state", "waiting")))]
    prioritized = s[
        ("conveyor_queue_jobs", (("queue", "workflow.execute.us"), ("state", "prioritized")))
    ]
    assert waiting + prioritized == 1
    assert s[("conveyor_metrics_redis_up", ())] == 1
    http = ("conveyor_http_requests_total",
            (("method", "GET"), ("route", "/api/health"), ("status", "200")))  # fmt: skip
    assert s[http] >= 1


async def test_publisher_keeps_observations_while_redis_is_down(api_env: dict[str, str]) -> None:
    with restartable_redis() as server:
        settings = make_settings(**{**api_env, "QUEUE_REDIS_PORT": str(server.port)})
        async with QueueFactory(settings) as queues:
            publisher = MetricsPublisher(queues, flush_interval_s=0.05)
            publisher.observe_execution(1.0, "succeeded")
            server.stop()
            with pytest.raises(Exception):  # noqa: B017 - whatever redis raises
                await publisher.flush()
            publisher.observe_execution(1.0, "failed")
            server.start()
            stop = asyncio.Event()
            task = asyncio.create_task(publisher.run(stop))
            await asyncio.sleep(0.5)
            stop.set()
            await asyncio.wait_for(task, 5)
            counters = await queues.redis.hgetall(
                keys.metrics_counters(queues.settings.queue_prefix)
            )
            decoded = {
                (k.decode() if isinstance(k, bytes) else k): int(v) for k, v in counters.items()
            }
            assert decoded == {
                "executions_finished_total|status=succeeded": 1,
                "executions_finished_total|status=failed": 1,
            }


async def test_metrics_answer_when_redis_is_down(api_env: dict[str, str]) -> None:
    from tests.api.conftest import running_api

    with restartable_redis() as server:
        settings = make_settings(**{**api_env, "QUEUE_REDIS_PORT": str(server.port)})
        async with running_api(settings) as api:
            server.stop()
            r = await api.client.get("/metrics")
            assert r.status_code == 200
            s = _samples(r.text)
            assert s[("conveyor_metrics_redis_up", ())] == 0
            # Still rendered without Redis: the readiness verdict and the database probe.
            assert s[("conveyor_ready", ())] == 0
            assert s[("conveyor_database_up", ())] == 1
            assert ("conveyor_redis_memory_used_bytes", ()) not in s


# --- families read live per scrape, and the bounded per-tenant counter ------------------------
async def _beat(api: Api, role: str, info: dict[str, Any]) -> None:
    await Heartbeat(api.ctx.queues, role=role, settings=api.settings, info_fn=lambda: info).beat()


async def test_worker_saturation_and_scheduler_leader_come_from_live_heartbeats(api: Api) -> None:
    s = _samples((await api.client.get("/metrics")).text)
    assert s[("conveyor_worker_active_jobs", ())] == 0
    assert s[("conveyor_worker_concurrency", ())] == 0
    assert s[("conveyor_scheduler_leader", ())] == 0

    await _beat(api, "worker", {"activeJobs": 3, "concurrency": 4})
    await _beat(api, "worker", {"activeJobs": 1, "concurrency": 8})
    await _beat(api, "scheduler", {"lockHeld": False})
    s = _samples((await api.client.get("/metrics")).text)
    assert s[("conveyor_worker_active_jobs", ())] == 4
    assert s[("conveyor_worker_concurrency", ())] == 12
    assert s[("conveyor_scheduler_leader", ())] == 0, "a standby scheduler does not lead"
    assert s[("conveyor_processes", (("role", "worker"),))] == 2

    await _beat(api, "scheduler", {"lockHeld": True})
    s = _samples((await api.client.get("/metrics")).text)
    assert s[("conveyor_scheduler_leader", ())] == 1


async def test_oldest_waiting_job_age_per_queue(api: Api) -> None:
    queues, prefix = api.ctx.queues, api.settings.queue_prefix
    us, eu = "workflow.execute.us", "workflow.execute.eu"
    assert await probes.oldest_waiting(api.ctx, [us]) == {us: 0.0}
    for n, tenant in enumerate(("t1", "t1", "t2")):  # prioritized (fairness): t1's 2nd is last
        await api.ctx.dispatcher.enqueue(
            WorkflowExecute(execution_id=f"e{n}", tenant_id=tenant, workflow_id="w", region="us")
        )
    await api.ctx.execution_queue("eu").add(  # no priority: BullMQ's wait list
        WorkflowExecute(execution_id="x", tenant_id="t", workflow_id="w", region="eu")
    )
    now_ms = int(time.time() * 1000)
    _, _, prioritized, _ = keys.backlog(prefix, us)
    ids = [m.decode() if isinstance(m, bytes) else str(m) for m in
           await queues.redis.zrange(prioritized, 0, -1)]  # fmt: skip
    assert len(ids) == 3
    stamps = {ids[0]: now_ms - 1_000, ids[1]: now_ms - 2_000, ids[-1]: now_ms - 300_000}
    wait, *_ = keys.backlog(prefix, eu)
    [eu_job] = await queues.redis.lrange(wait, 0, -1)
    eu_id = eu_job.decode() if isinstance(eu_job, bytes) else eu_job
    for queue, job_id, stamp in [*((us, i, t) for i, t in stamps.items()),
                                 (eu, eu_id, now_ms - 120_000)]:  # fmt: skip
        await queues.redis.hset(keys.job(prefix, queue, job_id), "timestamp", str(stamp))

    ages = await probes.oldest_waiting(api.ctx, [us, eu, "workflow.execute.none"], now_ms=now_ms)
    # The last job in line (a low-priority one) is found, not only the next to run.
    assert ages == {us: 300.0, eu: 120.0, "workflow.execute.none": 0.0}

    s = _samples((await api.client.get("/metrics")).text)
    age = s[("conveyor_queue_oldest_waiting_seconds", (("queue", us),))]
    assert 300 <= age < 330, "the same read, live per scrape"


async def test_redis_memory_database_and_readiness_are_read_per_scrape(api: Api) -> None:
    s = _samples((await api.client.get("/metrics")).text)
    info = await api.ctx.queues.redis.info("memory")
    assert s[("conveyor_redis_maxmemory_bytes", ())] == float(info["maxmemory"])
    assert s[("conveyor_redis_memory_used_bytes", ())] > 0
    policy_ok = 1.0 if info["maxmemory_policy"] == "noeviction" else 0.0
    assert s[("conveyor_redis_eviction_policy_ok", ())] == policy_ok
    assert s[("conveyor_database_up", ())] == 1
    ready = (await api.client.get("/api/health/ready")).status_code == 200
    assert s[("conveyor_ready", ())] == (1.0 if ready else 0.0)


async def test_tenant_counter_names_at_most_the_limit_per_process(api: Api) -> None:
    publisher = MetricsPublisher(api.ctx.queues)
    for n in range(TENANT_LIMIT + 5):
        publisher.count_tenant_execution(f"tenant-{n:03d}", "succeeded")
    publisher.count_tenant_execution("tenant-000", "failed")  # a named tenant stays named
    publisher.count_tenant_execution("tenant-200", "failed")  # a new one is "other"
    await publisher.flush()

    s = _samples((await api.client.get("/metrics")).text)
    name = "conveyor_tenant_executions_finished_total"
    tenants = {dict(labels)["tenant"] for (n, labels) in s if n == name}
    assert len(tenants) == TENANT_LIMIT + 1
    assert OTHER_TENANT in tenants and "tenant-104" not in tenants
    assert s[(name, (("status", "succeeded"), ("tenant", OTHER_TENANT)))] == 5
    assert s[(name, (("status", "failed"), ("tenant", "tenant-000")))] == 1
    assert s[(name, (("status", "failed"), ("tenant", OTHER_TENANT)))] == 1
    total = sum(v for (n, labels), v in s.items() if n == name)
    assert total == TENANT_LIMIT + 5 + 2, "nothing is dropped, only lumped"


async def test_step_durations_by_type_and_result_from_the_engine_hook(api: Api) -> None:
    store = api.ctx.store
    _, execution_id = await start(
        store,
        [
            {"id": "a", "type": "noop"},
            {"id": "b", "type": "transform", "expression": "input.n"},
            {"id": "c", "type": "transform", "expression": "abs(input.s)"},  # type error
        ],
        {"n": 1, "s": "x"},
    )
    publisher = MetricsPublisher(api.ctx.queues)
    seen: list[tuple[str, str, float]] = []

    def on_step(step_type: str, status: str, seconds: float) -> None:
        seen.append((step_type, status, seconds))
        publisher.observe_step(step_type, status, seconds)

    engine = Engine(store, api.settings)
    engine.on_step = on_step
    async with engine:
        outcome = await engine.run(execution_id)
    assert outcome.kind is OutcomeKind.FAILED
    assert [(t, st) for t, st, _ in seen] == [
        ("noop", "succeeded"),
        ("transform", "succeeded"),
        ("transform", "failed"),
    ]
    assert all(seconds >= 0 for *_, seconds in seen)
    await publisher.flush()

    s = _samples((await api.client.get("/metrics")).text)
    count = "conveyor_step_duration_seconds_count"
    assert s[(count, (("status", "succeeded"), ("type", "noop")))] == 1
    assert s[(count, (("status", "succeeded"), ("type", "transform")))] == 1
    assert s[(count, (("status", "failed"), ("type", "transform")))] == 1
    bucket = ("conveyor_step_duration_seconds_bucket",
              (("le", "+Inf"), ("status", "succeeded"), ("type", "noop")))  # fmt: skip
    assert s[bucket] == 1


async def test_a_worker_publishes_tenant_and_step_metrics_of_what_it_runs(api: Api) -> None:
    """The wiring in the worker process: the engine's step hook and the per-tenant counter."""
    headers = await api.tenant()
    workflow_id = await api.workflow(headers)  # one noop step
    supervisor = Supervisor("worker")
    task = asyncio.create_task(execution.serve(api.settings, supervisor))
    try:
        r = await api.client.post(
            f"/api/workflows/{workflow_id}/executions", json={}, headers=headers
        )
        assert r.status_code in (200, 201, 202), r.text
        execution_id = r.json()["data"]["id"]
        for _ in range(200):
            r = await api.client.get(f"/api/executions/{execution_id}", headers=headers)
            if r.json()["data"]["status"] == "succeeded":
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError(f"not finished: {r.text}")
    finally:
        supervisor.stop("test done")
        assert await asyncio.wait_for(task, 20) == 0  # the drain flushes the metrics

    s = _samples((await api.client.get("/metrics")).text)
    [(labels, value)] = [
        (dict(labels), v) for (n, labels), v in s.items()
        if n == "conveyor_tenant_executions_finished_total"
    ]  # fmt: skip
    assert value == 1 and labels["status"] == "succeeded"
    assert labels["tenant"] not in ("", OTHER_TENANT)
    step = ("conveyor_step_duration_seconds_count", (("status", "succeeded"), ("type", "noop")))
    assert s[step] == 1


@pytest.mark.parametrize(
    ("seconds", "le"),
    [(0.0, "0.001"), (0.001, "0.001"), (0.0011, "0.005"), (300.0, "300"), (300.5, "+Inf")],
)
def test_an_observation_lands_in_the_first_bucket_whose_bound_holds_it(
    seconds: float, le: str
) -> None:
    bounds = BUCKETS["step_duration_seconds"]
    hist = _Hist([0] * (len(bounds) + 1))
    hist.observe(bounds, seconds)
    labels = [*(format(b, "g") for b in bounds), "+Inf"]
    assert hist.buckets == [1 if x == le else 0 for x in labels]
