"""MetricsPublisher → Redis → the API's /metrics (Prometheus text)."""

from __future__ import annotations

import asyncio

import pytest
from prometheus_client.parser import text_string_to_metric_families

from conveyor.dispatch import keys
from conveyor.queue import QueueFactory, WorkflowExecute
from conveyor.runtime import MetricsPublisher
from tests.api._support import restartable_redis
from tests.api.conftest import Api, make_settings


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
            assert _samples(r.text)[("conveyor_metrics_redis_up", ())] == 0
