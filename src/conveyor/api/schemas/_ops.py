"""Models of the health probes and the admin API."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import ConfigDict, Field

from conveyor.api.schemas._common import ApiModel


# --- health ---------------------------------------------------------------------------------
class SentinelView(ApiModel):
    """What the Redis Sentinels say (only with ``QUEUE_REDIS_SENTINELS``)."""

    master: str = Field(description="The master's name the sentinels monitor.", examples=["main"])
    master_address: str | None = Field(
        None,
        description="`host:port` most answering sentinels name as the master.",
        examples=["10.0.0.5:6379"],
    )
    sentinels: int = Field(description="Sentinels configured.", examples=[3])
    reachable: int = Field(description="Sentinels that answered about the master.", examples=[3])
    quorum: int | None = Field(
        None, description="Sentinels that must agree before a failover.", examples=[2]
    )
    quorum_ok: bool = Field(
        description="`SENTINEL CKQUORUM`: enough sentinels are up to agree on a failover and "
        "authorise it; false means a failed master would not be replaced."
    )
    master_down: bool = Field(
        description="An answering sentinel sees the master down now (failover under way)."
    )
    errors: list[str] = Field(default_factory=list)


class ClusterView(ApiModel):
    """What the Redis Cluster says (only with ``QUEUE_REDIS_CLUSTER_NODES``)."""

    state: str | None = Field(
        None, description="`cluster_state` (`ok`: every slot is served).", examples=["ok"]
    )
    slots_ok: int | None = Field(None, description="Slots served (16384: all).", examples=[16384])
    masters: list[str] = Field(
        default_factory=list,
        description="`host:port` of the masters serving slots.",
        examples=[["10.0.0.5:6379", "10.0.0.6:6379", "10.0.0.7:6379"]],
    )
    replicas: int = Field(0, description="Replicas known.", examples=[3])
    known_nodes: int | None = Field(
        None, description="`cluster_known_nodes`: every node the cluster knows.", examples=[6]
    )
    failed: int = Field(0, description="Nodes flagged as failing (`fail`/`fail?`).")
    errors: list[str] = Field(default_factory=list)


class RedisTarget(ApiModel):
    address: str | None = Field(
        None,
        description="`host:port` of the Redis master in use (`null` when unreachable).",
        examples=["10.0.0.5:6379"],
    )
    sentinel: SentinelView | None = Field(
        None, description="The sentinels' view; `null` when Sentinel is not used."
    )
    cluster: ClusterView | None = Field(
        None, description="The cluster's view; `null` when Redis Cluster is not used."
    )


class QueueHealth(ApiModel):
    model_config = ConfigDict(extra="allow")
    driver: str = Field(description="`bullmq` or `inmemory`.", examples=["bullmq"])
    status: str = Field(description="`ready` or `unreachable`.", examples=["ready"])
    latency_ms: float | None = Field(None, description="Redis round-trip time.", examples=[0.4])
    durable: bool = Field(description="False for the in-memory driver.")
    persistence: dict[str, Any] | None = Field(
        None, description="Redis persistence: AOF and RDB.", examples=[{"aof": True, "rdb": True}]
    )
    eviction_policy: str | None = Field(None, examples=["noeviction"])
    redis_version: str | None = Field(None, examples=["7.0.15"])
    address: str | None = Field(
        None,
        description="`host:port` of the Redis master in use (with Sentinel: the one it named).",
        examples=["10.0.0.5:6379"],
    )
    sentinel: SentinelView | None = Field(
        None, description="The sentinels' view; `null` when Sentinel is not used."
    )
    cluster: ClusterView | None = Field(
        None, description="The cluster's view; `null` when Redis Cluster is not used."
    )
    warnings: list[str] = Field(default_factory=list)
    error: str | None = None


class DatabaseHealth(ApiModel):
    dialect: str = Field(examples=["postgresql"])
    status: str = Field(description="`ready` or `unreachable`.", examples=["ready"])
    latency_ms: float | None = Field(None, examples=[0.8])
    error: str | None = None


class HealthData(ApiModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "status": "ok",
                    "timestamp": "2024-05-15T18:19:00.000Z",
                    "queue": {
                        "driver": "bullmq",
                        "status": "ready",
                        "latencyMs": 0.4,
                        "durable": True,
                        "persistence": {"aof": True, "rdb": True},
                        "evictionPolicy": "noeviction",
                        "redisVersion": "7.0.15",
                        "address": "10.0.0.21:6379",
                        "sentinel": {
                            "master": "conveyor",
                            "masterAddress": "10.0.0.21:6379",
                            "sentinels": 3,
                            "reachable": 3,
                            "quorum": 2,
                            "quorumOk": True,
                            "masterDown": False,
                            "errors": [],
                        },
                        "warnings": [],
                    },
                    "database": {"dialect": "postgresql", "status": "ready", "latencyMs": 0.8},
                }
            ]
        }
    )
    status: Literal["ok", "degraded"]
    timestamp: str
    queue: QueueHealth
    database: DatabaseHealth


class RegionQueue(ApiModel):
    queue: str = Field(examples=["workflow.execute.us"])
    region: str = Field(examples=["us"])
    status: Literal["consumed", "idle", "unconsumed", "paused", "unknown"] = Field(
        description=(
            "`consumed`: a live worker heartbeat covers the region; `idle`: no worker and no "
            "waiting jobs; `unconsumed`: jobs are waiting and no worker consumes them; "
            "`paused`: the queue is paused (by the admin API or any BullMQ client): workers "
            "take nothing from it; `unknown`: Redis could not be read."
        )
    )
    workers: int = Field(description="Live worker processes consuming this region.")
    waiting: int | None = Field(None, description="Jobs waiting (incl. prioritized).")


class ReadyData(ApiModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "ready": True,
                    "checks": {"redis": True, "durable": True, "database": True},
                    "queues": [
                        {
                            "queue": "workflow.execute.us",
                            "region": "us",
                            "status": "consumed",
                            "workers": 1,
                            "waiting": 0,
                        }
                    ],
                    "redis": {"address": "127.0.0.1:6379", "sentinel": None},
                }
            ]
        }
    )
    ready: bool
    checks: dict[str, bool] = Field(
        description="The checks that decide readiness: redis, durable, database."
    )
    queues: list[RegionQueue] = Field(
        description="Informational: whether each regional queue is being consumed."
    )
    redis: RedisTarget | None = Field(
        None, description="Informational: the Redis master in use and the sentinels' view."
    )


# --- admin ----------------------------------------------------------------------------------
class QueueDepth(ApiModel):
    waiting: int = Field(description="Ready to run: BullMQ `waiting` + `prioritized`.")
    active: int = Field(description="Being processed by a worker.")
    delayed: int = Field(0, description="Deferred: timers, tenant-cap hold-backs, backoff.")
    paused: int = Field(
        0, description="Waiting jobs the pause holds back (0 unless the queue is paused)."
    )
    is_paused: bool = Field(False, description="The queue is paused: workers take no jobs.")
    failed: int = Field(0, description="Jobs BullMQ keeps as failed (not a counter).")
    total: int = Field(description="waiting + active + delayed.")


class QueueStateOut(ApiModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"queue": "workflow.execute.us", "region": "us", "paused": True}]
        }
    )
    queue: str = Field(examples=["workflow.execute.us"])
    region: str = Field(examples=["us"])
    paused: bool = Field(description="Workers take no jobs from the queue while it is paused.")


class WorkerStatus(ApiModel):
    model_config = ConfigDict(extra="allow")
    started: bool = Field(description="At least one live execution worker heartbeat.")
    queue_driver: str = Field(examples=["bullmq"])
    instances: int = 0
    concurrency: int = 0
    active_jobs: int = 0
    jobs_done: int = 0
    jobs_failed: int = 0
    metrics: dict[str, dict[str, QueueDepth]] = Field(
        description="`queueDepths` per `workflow.execute.<region>` queue, read live from Redis."
    )


class SchedulerStatus(ApiModel):
    model_config = ConfigDict(extra="allow")
    preferred_strategy: Literal["postgres", "redis"]
    redis: dict[str, Any] = Field(examples=[{"status": "ready", "latencyMs": 0.3}])
    started: bool = False
    instances: int = 0
    lock_holder: str | None = Field(None, description="Process id of the active scheduler.")
    lock_holder_host: str | None = None
    last_tick: Any = Field(None, description="When the active scheduler last ticked.")
    lag_ms: Any = None


class TimerStatus(ApiModel):
    model_config = ConfigDict(extra="allow")
    started: bool = False
    instances: int = 0
    next_due_at: Any = Field(None, description="The next durable timer due, if known.")
    backlog: int = 0
    lag_ms: Any = None


class StatusData(ApiModel):
    model_config = ConfigDict(
        extra="allow",
        json_schema_extra={
            "examples": [
                {
                    "timestamp": "2024-05-15T18:19:00.000Z",
                    "executionWorker": {
                        "started": True,
                        "queueDriver": "bullmq",
                        "metrics": {
                            "queueDepths": {
                                "workflow.execute.us": {"waiting": 2, "active": 1, "total": 3}
                            }
                        },
                    },
                    "scheduler": {"preferredStrategy": "postgres", "redis": {"status": "ready"}},
                }
            ]
        },
    )
    timestamp: str
    execution_worker: WorkerStatus
    scheduler: SchedulerStatus
    timer_dispatcher: TimerStatus
    queue: QueueHealth
    regions: list[RegionQueue]
    processes: list[dict[str, Any]] = Field(
        description="Every live process heartbeat: role, regions, pid, host, concurrency, ..."
    )
    errors: list[str] = Field(description="What could not be read (e.g. Redis unreachable).")


class TenantIn(ApiModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"name": "acme"}]})
    name: str = Field(min_length=1, max_length=200, description="Display name.")


class TenantOut(ApiModel):
    id: str = Field(examples=["0190a1b2c3d47e8f9a0b1c2d3e4f5a6b"])
    name: str = Field(examples=["acme"])
    created_at: datetime


class ApiKeyIn(ApiModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [{"name": "ci"}]})
    name: str = Field("default", min_length=1, max_length=200)


class ApiKeyOut(ApiModel):
    id: str
    tenant_id: str
    name: str = Field(examples=["ci"])
    prefix: str = Field(description="Public part of the key, for identification.")
    created_at: datetime
    revoked_at: datetime | None = None
    active: bool


class IssuedApiKeyOut(ApiKeyOut):
    key: str = Field(
        description="The bearer token. Shown only in this answer; it cannot be read back.",
        examples=["cvk_1a2b3c4d5e6f_Zm9vYmFyYmF6..."],
    )
