"""The API's ``/metrics`` collector: renders the :class:`MetricsSnapshot` read from Redis.

Apart from :mod:`conveyor.runtime.metrics` so that worker, scheduler and timer processes, which
only publish, never load ``prometheus_client``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from conveyor.runtime.metrics import (
    BUCKETS,
    OTHER_TENANT,
    TENANT_LIMIT,
    MetricsSnapshot,
    text_value,
)

__all__ = ["ConveyorCollector"]

#: Label names of each labelled histogram (the others have none).
_HIST_LABELS: dict[str, list[str]] = {
    "execution_duration_seconds": ["status"],
    "step_duration_seconds": ["type", "status"],
}

_HELP: dict[str, str] = {
    "execution_duration_seconds": "Wall time of one execution run (claim to final state).",
    "start_latency_seconds": "Time from enqueue to the worker starting the execution.",
    "scheduler_lag_seconds": "Delay between a schedule's due time and its enqueue.",
    "timer_lag_seconds": "Delay between a durable timer's due time and its enqueue.",
    "step_duration_seconds": (
        "Wall time of one step (all its attempts, retries' backoff included) by step type and "
        "result."
    ),
    "executions_finished_total": "Execution runs finished by workers, by final status.",
    "tenant_executions_finished_total": (
        f"Execution runs finished by workers, by tenant and final status. Each worker process "
        f"names at most {TENANT_LIMIT} tenants (the first it sees); the rest count as "
        f'tenant="{OTHER_TENANT}".'
    ),
    "scheduler_misfires_total": (
        "Cron ticks missed beyond SCHEDULER_MISFIRE_GRACE_MS, by policy: collapsed into one run "
        "(fire_once) or skipped (skip); each is recorded as a tick with that outcome."
    ),
    "retention_pruned_rows_total": (
        "Rows deleted by retention (finished executions past EXECUTION_RETENTION or the "
        "per-tenant cap, with their step runs, timers and schedule ticks), by table."
    ),
    "jobs_parked_total": (
        "Execution jobs held back by a tenant limit without taking a worker slot, by reason: "
        "concurrency (the tenant's EXECUTION_TENANT_CONCURRENCY, cluster-wide or per process) or "
        "rate (EXECUTION_TENANT_START_RATE; parked until its start time)."
    ),
    "jobs_stalled_total": (
        "Jobs taken back from a worker that stopped renewing their lock (crashed, frozen or cut "
        "off from Redis) by a stalled-job check, to run again."
    ),
}


class ConveyorCollector(Collector):
    """A prometheus_client collector rendering the latest :class:`MetricsSnapshot`.

    ``collect()`` is synchronous, so the API reads Redis first (``update``) and renders right
    after, with no ``await`` in between.
    """

    def __init__(self, namespace: str = "conveyor") -> None:
        self.namespace = namespace
        self.snapshot = MetricsSnapshot()

    def update(self, snapshot: MetricsSnapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap, ns = self.snapshot, self.namespace
        yield GaugeMetricFamily(
            f"{ns}_metrics_redis_up",
            "1 if Redis answered while collecting this scrape, else 0.",
            value=1.0 if snap.redis_up else 0.0,
        )
        depth = GaugeMetricFamily(
            f"{ns}_queue_jobs", "Jobs in each BullMQ queue by state.", labels=["queue", "state"]
        )
        for queue, counts in sorted(snap.queue_depths.items()):
            for state, n in sorted(counts.items()):
                depth.add_metric([queue, state], n)
        yield depth
        paused = GaugeMetricFamily(
            f"{ns}_queue_paused",
            "1 while the queue is paused (workers take no jobs from it), else 0.",
            labels=["queue"],
        )
        for queue, flag in sorted(snap.queue_paused.items()):
            paused.add_metric([queue], 1.0 if flag else 0.0)
        yield paused
        procs = GaugeMetricFamily(
            f"{ns}_processes", "Live Conveyor processes (heartbeats) by role.", labels=["role"]
        )
        for role, n in sorted(snap.processes.items()):
            procs.add_metric([role], n)
        yield procs
        oldest = GaugeMetricFamily(
            f"{ns}_queue_oldest_waiting_seconds",
            "Age of the oldest job ready to run (waiting or prioritized) per queue; 0 if none.",
            labels=["queue"],
        )
        for queue, age in sorted(snap.oldest_waiting_s.items()):
            oldest.add_metric([queue], age)
        yield oldest
        yield from self._live(snap)
        yield from self._counters(snap)
        yield from self._histograms(snap)
        for gauge in ("scheduler_lag_seconds", "timer_lag_seconds"):
            if gauge in snap.gauges:
                yield GaugeMetricFamily(
                    f"{ns}_{gauge.replace('_seconds', '_last_seconds')}",
                    f"Last observed value of {gauge}.",
                    value=snap.gauges[gauge],
                )

    def _live(self, snap: MetricsSnapshot) -> Iterable[Metric]:
        """Families read live on each scrape: heartbeats, Redis memory, probes."""
        ns = self.namespace
        if snap.redis_up:
            yield GaugeMetricFamily(
                f"{ns}_worker_active_jobs",
                "Jobs running now, summed over live worker heartbeats.",
                value=snap.worker_active_jobs,
            )
            yield GaugeMetricFamily(
                f"{ns}_worker_concurrency",
                "Job slots (EXECUTION_WORKER_CONCURRENCY) summed over live worker heartbeats.",
                value=snap.worker_concurrency,
            )
            yield GaugeMetricFamily(
                f"{ns}_scheduler_leader",
                "1 when a live scheduler heartbeat says it holds the leader lock, else 0.",
                value=1.0 if snap.scheduler_leader else 0.0,
            )
        mem = snap.redis_memory
        if "used_memory" in mem:
            yield GaugeMetricFamily(
                f"{ns}_redis_memory_used_bytes", "Redis INFO used_memory.",
                value=float(mem["used_memory"]),
            )  # fmt: skip
        if "maxmemory" in mem:
            yield GaugeMetricFamily(
                f"{ns}_redis_maxmemory_bytes", "Redis INFO maxmemory (0: no limit).",
                value=float(mem["maxmemory"]),
            )  # fmt: skip
        if "maxmemory_policy" in mem:
            yield GaugeMetricFamily(
                f"{ns}_redis_eviction_policy_ok",
                "1 when Redis maxmemory-policy is noeviction (BullMQ requires it), else 0.",
                value=1.0 if text_value(mem["maxmemory_policy"]) == "noeviction" else 0.0,
            )
        if snap.database_up is not None:
            yield GaugeMetricFamily(
                f"{ns}_database_up",
                "1 if the database answered this scrape's probe (SELECT 1), else 0.",
                value=1.0 if snap.database_up else 0.0,
            )
        if snap.ready is not None:
            yield GaugeMetricFamily(
                f"{ns}_ready",
                "1 if this API is ready (/api/health/ready would answer 200), else 0.",
                value=1.0 if snap.ready else 0.0,
            )

    def _counters(self, snap: MetricsSnapshot) -> Iterable[Metric]:
        for name, label_names in (
            ("executions_finished_total", ["status"]),
            ("jobs_stalled_total", ["queue"]),
            ("jobs_parked_total", ["reason"]),
            ("scheduler_misfires_total", ["policy"]),
            ("retention_pruned_rows_total", ["table"]),
            ("tenant_executions_finished_total", ["tenant", "status"]),
        ):
            family = CounterMetricFamily(
                f"{self.namespace}_{name.removesuffix('_total')}", _HELP[name], labels=label_names
            )
            for labels, value in snap.counters.get(name, []):
                family.add_metric([labels.get(n, "") for n in label_names], value)
            yield family

    def _histograms(self, snap: MetricsSnapshot) -> Iterable[Metric]:
        for name in BUCKETS:
            label_names = _HIST_LABELS.get(name, [])
            family = HistogramMetricFamily(
                f"{self.namespace}_{name}", _HELP[name], labels=label_names
            )
            for series in snap.histograms.get(name, []):
                family.add_metric(
                    [series.labels.get(n, "") for n in label_names], series.buckets, series.sum
                )
            yield family
