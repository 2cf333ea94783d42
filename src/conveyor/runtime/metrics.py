"""Execution metrics shared across processes through Redis, rendered by the API's ``/metrics``.

Worker, scheduler and timer processes do not expose their own metrics port: they aggregate
observations in memory with a :class:`MetricsPublisher` and flush them every few seconds in one
pipelined batch of ``HINCRBY``/``HINCRBYFLOAT``/``HSET`` into three kinds of hash::

    {prefix}:conveyor:metrics:counters           field "<name>|<labels>"       -> int
    {prefix}:conveyor:metrics:hist:<name>        field "<labels>|le=<bound>"   -> int (per bucket)
                                                 field "<labels>|sum"          -> float
                                                 field "<labels>|count"        -> int
    {prefix}:conveyor:metrics:gauges             field "<name>"                -> float (last value)

``<labels>`` is ``key=value`` pairs joined by ``,`` (empty for none). Bucket counts are stored
per bucket (not cumulative) so that writers with the same bucket list merge by addition; the
reader (:func:`read_metrics`) makes them cumulative. Every API process renders the same totals,
so Prometheus may scrape any of them (:class:`conveyor.runtime.prometheus.ConveyorCollector`,
apart so that the processes which only publish never load ``prometheus_client``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from conveyor.dispatch import keys
from conveyor.queue import health

if TYPE_CHECKING:
    from conveyor.queue import QueueFactory

log = logging.getLogger(__name__)

#: Histogram bucket upper bounds (seconds) per metric. Writers and readers share this table.
BUCKETS: dict[str, tuple[float, ...]] = {
    "execution_duration_seconds": (
        0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
        3600.0,
    ),
    "start_latency_seconds": (
        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
    ),
    "scheduler_lag_seconds": (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
    "timer_lag_seconds": (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0),
    "step_duration_seconds": (
        0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
    ),
}  # fmt: skip

TENANT_LIMIT = 100
"""Distinct tenants one publisher (one worker process) counts by name in
``tenant_executions_finished_total``; executions of any further tenant count as ``other``. The
family therefore holds at most ``TENANT_LIMIT`` x worker processes (+1) tenants per status."""
OTHER_TENANT = "other"


DEFAULT_FLUSH_INTERVAL_S = 5.0


def _le(bound: float) -> str:
    return "+Inf" if math.isinf(bound) else format(bound, "g")


def _labels(labels: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items()))


@lru_cache(maxsize=256)
def _step_labels(step_type: str, status: str) -> str:
    """The labels of a step observation (a closed set: step types x statuses), built once."""
    return _labels({"type": step_type, "status": status})


def _parse_labels(text: str) -> dict[str, str]:
    if not text:
        return {}
    return dict(part.split("=", 1) for part in text.split(",") if "=" in part)


@dataclass
class _Hist:
    buckets: list[int]
    sum: float = 0.0
    count: int = 0

    def observe(self, bounds: tuple[float, ...], value: float) -> None:
        # the first bucket whose bound is >= value (len(bounds): +Inf)
        self.buckets[bisect_left(bounds, value)] += 1
        self.sum += value
        self.count += 1

    def merge(self, other: _Hist) -> None:
        self.buckets = [a + b for a, b in zip(self.buckets, other.buckets, strict=True)]
        self.sum += other.sum
        self.count += other.count


@dataclass
class _Pending:
    counters: dict[tuple[str, str], int] = field(default_factory=dict)
    hists: dict[tuple[str, str], _Hist] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)

    def empty(self) -> bool:
        return not (self.counters or self.hists or self.gauges)

    def merge(self, newer: _Pending) -> None:
        for key, n in newer.counters.items():
            self.counters[key] = self.counters.get(key, 0) + n
        for key, hist in newer.hists.items():
            if key in self.hists:
                self.hists[key].merge(hist)
            else:
                self.hists[key] = hist
        self.gauges.update(newer.gauges)


class MetricsPublisher:
    """Aggregates observations in memory; :meth:`flush` writes them to Redis in one batch.

    Observing is synchronous and never touches the network. Run :meth:`run` as a supervised
    loop and call :meth:`flush` once more on shutdown. If Redis is unavailable the pending
    observations are kept and sent with the next successful flush.
    """

    def __init__(
        self, queues: QueueFactory, *, flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S
    ) -> None:
        self._queues = queues
        self._interval = flush_interval_s
        self._pending = _Pending()
        self._tenants: set[str] = set()

    # --- observations (called from hot paths; cheap and synchronous) ------------------------
    def observe_execution(self, duration_s: float, status: str) -> None:
        """One execution run ended in ``status`` after ``duration_s`` seconds."""
        labels = _labels({"status": status})
        key = ("executions_finished_total", labels)
        self._pending.counters[key] = self._pending.counters.get(key, 0) + 1
        self._observe("execution_duration_seconds", duration_s, labels)

    def observe_step(self, step_type: str, status: str, duration_s: float) -> None:
        """One step of type ``step_type`` ended (``succeeded``/``failed``) after ``duration_s``
        seconds. Step types are the closed set the workflow schema accepts."""
        self._observe("step_duration_seconds", duration_s, _step_labels(step_type, status))

    def count_tenant_execution(self, tenant: str, status: str) -> None:
        """One execution run of ``tenant`` ended in ``status``. Only the first
        :data:`TENANT_LIMIT` tenants this publisher sees are named; later ones count as
        ``other``, so the series stay bounded whatever the number of tenants."""
        if tenant not in self._tenants:
            if len(self._tenants) >= TENANT_LIMIT:
                tenant = OTHER_TENANT
            else:
                self._tenants.add(tenant)
        key = ("tenant_executions_finished_total", _labels({"tenant": tenant, "status": status}))
        self._pending.counters[key] = self._pending.counters.get(key, 0) + 1

    def count_parked(self, reason: str) -> None:
        """A job was parked by a tenant limit (``concurrency`` or ``rate``)."""
        key = ("jobs_parked_total", _labels({"reason": reason}))
        self._pending.counters[key] = self._pending.counters.get(key, 0) + 1

    def count_stalled(self, queue: str) -> None:
        """A job of ``queue`` whose worker stopped renewing its lock (crashed, frozen, cut off)
        was taken back by a stalled-job check, to run again."""
        key = ("jobs_stalled_total", _labels({"queue": queue}))
        self._pending.counters[key] = self._pending.counters.get(key, 0) + 1

    def count_scheduler_misfires(self, policy: str, ticks: int = 1) -> None:
        """``ticks`` cron ticks missed beyond the grace were collapsed (``fire_once``) or
        skipped (``skip``); each is also recorded as a tick row with that outcome."""
        key = ("scheduler_misfires_total", _labels({"policy": policy}))
        self._pending.counters[key] = self._pending.counters.get(key, 0) + ticks

    def count_pruned(self, table: str, rows: int) -> None:
        """Retention deleted ``rows`` rows of ``table`` (``executions``, ``step_runs``,
        ``timers``, ``schedule_ticks``, ``events``)."""
        if rows:
            key = ("retention_pruned_rows_total", _labels({"table": table}))
            self._pending.counters[key] = self._pending.counters.get(key, 0) + rows

    def observe_start_latency(self, seconds: float) -> None:
        """Enqueue-to-start latency of one execution job."""
        self._observe("start_latency_seconds", seconds)

    def observe_scheduler_lag(self, seconds: float) -> None:
        """How late a schedule tick was enqueued."""
        self._observe("scheduler_lag_seconds", seconds)
        self._pending.gauges["scheduler_lag_seconds"] = seconds

    def observe_timer_lag(self, seconds: float) -> None:
        """How late a durable timer was enqueued."""
        self._observe("timer_lag_seconds", seconds)
        self._pending.gauges["timer_lag_seconds"] = seconds

    def _observe(self, name: str, value: float, labels: str = "") -> None:
        bounds = BUCKETS[name]
        hist = self._pending.hists.get((name, labels))
        if hist is None:
            hist = self._pending.hists[(name, labels)] = _Hist([0] * (len(bounds) + 1))
        hist.observe(bounds, max(0.0, float(value)))

    # --- flushing ----------------------------------------------------------------------------
    async def flush(self) -> None:
        """Write pending observations to Redis in one pipelined round trip.

        On failure the observations are put back (merged with any made meanwhile) and the
        Redis error propagates.
        """
        batch, self._pending = self._pending, _Pending()
        if batch.empty():
            return
        try:
            await self._write(batch)
        except BaseException:
            batch.merge(self._pending)
            self._pending = batch
            raise

    async def _write(self, batch: _Pending) -> None:
        q = self._queues
        pipe = q.redis.pipeline(transaction=False)
        counters_key = keys.metrics_counters(
            q.settings.queue_prefix, cluster=q.settings.uses_cluster
        )
        for (name, labels), n in batch.counters.items():
            pipe.hincrby(counters_key, f"{name}|{labels}", n)
        for (name, labels), hist in batch.hists.items():
            key = keys.metrics_histogram(
                q.settings.queue_prefix, name, cluster=q.settings.uses_cluster
            )
            bounds = (*BUCKETS[name], math.inf)
            for bound, n in zip(bounds, hist.buckets, strict=True):
                if n:
                    pipe.hincrby(key, f"{labels}|le={_le(bound)}", n)
            pipe.hincrbyfloat(key, f"{labels}|sum", hist.sum)
            pipe.hincrby(key, f"{labels}|count", hist.count)
        if batch.gauges:
            gauges_key = keys.metrics_gauges(
                q.settings.queue_prefix, cluster=q.settings.uses_cluster
            )
            for name, value in batch.gauges.items():
                pipe.hset(gauges_key, name, repr(value))
            pipe.hset(gauges_key, "updated_at", repr(time.time()))
        await pipe.execute()

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Flush every interval until ``stop`` is set (or cancelled); then flush once more."""
        stop = stop or asyncio.Event()
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=self._interval)
                await self._flush_logged()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._flush_logged(), timeout=2.0)

    async def _flush_logged(self) -> None:
        try:
            await self.flush()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("metrics.flush_failed", extra={"error": repr(exc)})


# --- reading --------------------------------------------------------------------------------
@dataclass
class HistogramData:
    """One labelled histogram series: cumulative ``(le, count)`` buckets ending in ``+Inf``."""

    labels: dict[str, str]
    buckets: list[tuple[str, float]]
    sum: float
    count: int


@dataclass
class MetricsSnapshot:
    """What the publishers wrote, plus live queue depths read by the API."""

    counters: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)
    histograms: dict[str, list[HistogramData]] = field(default_factory=dict)
    gauges: dict[str, float] = field(default_factory=dict)
    queue_depths: dict[str, dict[str, int]] = field(default_factory=dict)
    queue_paused: dict[str, bool] = field(default_factory=dict)
    """Per queue: paused (BullMQ's flag)."""
    processes: dict[str, int] = field(default_factory=dict)
    redis_up: bool = False
    oldest_waiting_s: dict[str, float] = field(default_factory=dict)
    """Per queue: age of the oldest job ready to run (``conveyor.api.probes.oldest_waiting``)."""
    worker_active_jobs: int = 0
    """Sum of ``activeJobs`` over live worker heartbeats."""
    worker_concurrency: int = 0
    """Sum of ``concurrency`` (slots) over live worker heartbeats."""
    scheduler_leader: bool = False
    """A live scheduler heartbeat says it holds the leader lock."""
    redis_memory: dict[str, Any] = field(default_factory=dict)
    """``INFO memory`` (``used_memory``, ``maxmemory``, ``maxmemory_policy``)."""
    database_up: bool | None = None
    """The database answered this scrape's probe (``None``: not probed)."""
    ready: bool | None = None
    """``/api/health/ready``'s verdict for this scrape (``None``: not probed)."""

    def add_heartbeats(self, processes: Iterable[Mapping[str, Any]]) -> None:
        """Count live processes by role; sum worker slots; is there a scheduler leader?"""
        for proc in processes:
            role = str(proc.get("role"))
            self.processes[role] = self.processes.get(role, 0) + 1
            if role == "worker":
                self.worker_active_jobs += _int(proc.get("activeJobs"))
                self.worker_concurrency += _int(proc.get("concurrency"))
            elif role == "scheduler" and proc.get("lockHeld") is True:
                self.scheduler_leader = True


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def text_value(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def read_metrics(queues: QueueFactory) -> MetricsSnapshot:
    """Read every published metric with one pipelined round trip."""
    names = list(BUCKETS)
    pipe = queues.redis.pipeline(transaction=False)
    pipe.hgetall(
        keys.metrics_counters(queues.settings.queue_prefix, cluster=queues.settings.uses_cluster)
    )
    pipe.hgetall(
        keys.metrics_gauges(queues.settings.queue_prefix, cluster=queues.settings.uses_cluster)
    )
    cluster = queues.settings.uses_cluster
    if not cluster:  # a cluster pipeline refuses INFO: asked of every master below
        pipe.info("memory")
    for name in names:
        pipe.hgetall(
            keys.metrics_histogram(
                queues.settings.queue_prefix, name, cluster=queues.settings.uses_cluster
            )
        )
    if cluster:
        counters_raw, gauges_raw, *hists_raw = await pipe.execute()
        memory = await health.memory_info(queues.redis, cluster=True)
    else:
        counters_raw, gauges_raw, memory, *hists_raw = await pipe.execute()
    snap = MetricsSnapshot()
    snap.redis_memory = {
        k: memory.get(k) for k in ("used_memory", "maxmemory", "maxmemory_policy") if k in memory
    }
    for raw_field, raw_value in counters_raw.items():
        name, _, labels = text_value(raw_field).partition("|")
        snap.counters.setdefault(name, []).append(
            (_parse_labels(labels), float(text_value(raw_value)))
        )
    for raw_field, raw_value in gauges_raw.items():
        with contextlib.suppress(ValueError):
            snap.gauges[text_value(raw_field)] = float(text_value(raw_value))
    for name, raw in zip(names, hists_raw, strict=True):
        snap.histograms[name] = _histograms(name, raw)
    return snap


def _histograms(name: str, raw: Mapping[Any, Any]) -> list[HistogramData]:
    series: dict[str, dict[str, float]] = {}
    for raw_field, raw_value in raw.items():
        labels, _, part = text_value(raw_field).rpartition("|")
        series.setdefault(labels, {})[part] = float(text_value(raw_value))
    out: list[HistogramData] = []
    for labels, parts in sorted(series.items()):
        running = 0.0
        buckets: list[tuple[str, float]] = []
        for bound in (*BUCKETS[name], math.inf):
            le = _le(bound)
            running += parts.get(f"le={le}", 0.0)
            buckets.append((le, running))
        out.append(
            HistogramData(
                labels=_parse_labels(labels),
                buckets=buckets,
                sum=parts.get("sum", 0.0),
                count=int(parts.get("count", running)),
            )
        )
    return out
