"""Models of ``GET /api/admin/storage`` and the per-tenant retention overrides."""

from __future__ import annotations

from datetime import date, datetime

from pydantic import ConfigDict, Field, field_validator

from conveyor.api.schemas._common import ApiModel
from conveyor.settings import MIN_RETENTION_S, parse_duration

MAX_RETENTION_S = 3650 * 86400
"""Ten years: the longest per-tenant retention accepted."""
MAX_EXECUTIONS = 1_000_000_000


# --- per-tenant retention ---------------------------------------------------------------------
class RetentionIn(ApiModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"retention": "30d", "maxExecutions": 100000}]},
    )
    retention: int | str | None = Field(
        None,
        description=(
            "How long this tenant's finished executions are kept: a duration (`30d`, `36h`, "
            f"`90m`) or seconds, at least {MIN_RETENTION_S} s and at most 3650 days; `null`: "
            "`EXECUTION_RETENTION` applies."
        ),
        examples=["30d"],
    )
    max_executions: int | None = Field(
        None,
        ge=1,
        le=MAX_EXECUTIONS,
        description=(
            "Most finished executions this tenant keeps (its oldest go first); `null`: "
            "`EXECUTION_RETENTION_MAX_PER_TENANT` applies."
        ),
    )

    @field_validator("retention", mode="after")
    @classmethod
    def _seconds(cls, value: int | str | None) -> int | None:
        if value is None:
            return None
        seconds = parse_duration(value) if isinstance(value, str) else value
        if not MIN_RETENTION_S <= seconds <= MAX_RETENTION_S:
            raise ValueError(
                f"must be from {MIN_RETENTION_S} seconds to 3650 days (got {seconds} seconds)"
            )
        return seconds


class RetentionOut(ApiModel):
    tenant_id: str
    retention_s: int | None = Field(description="The tenant's own retention; `null`: none.")
    max_executions: int | None = Field(description="The tenant's own cap; `null`: none.")
    effective_retention_s: int = Field(
        description="The retention in force (its own, else `EXECUTION_RETENTION`).",
        examples=[1209600],
    )
    effective_max_executions: int | None = Field(
        description="The cap in force (its own, else `EXECUTION_RETENTION_MAX_PER_TENANT`)."
    )


# --- storage ----------------------------------------------------------------------------------
class TableStorage(ApiModel):
    name: str = Field(examples=["executions"])
    rows: int = Field(examples=[1250000])
    rows_exact: bool = Field(
        description="`false`: PostgreSQL's planner estimate (large tables), else a count."
    )
    bytes: int | None = Field(
        description="Table, indexes and TOAST; `null` when the database cannot tell.",
        examples=[2831155200],
    )
    oldest: datetime | None = Field(description="Time of the oldest row (`null`: empty).")


class PartitionStorage(ApiModel):
    table: str = Field(description="`executions` or `step_runs`.", examples=["executions"])
    name: str = Field(examples=["executions_p20240515"])
    day: date | None = Field(
        description="The UTC day of the execution ids it holds; `null`: the default partition "
        "(ids no daily partition covers)."
    )
    lower: str | None = Field(description="Lowest execution id it holds (inclusive).")
    upper: str | None = Field(description="Execution ids below this one.")
    rows: int = Field(description="The planner's estimate (0 before the first analyze).")
    bytes: int = Field(description="Table, indexes and TOAST.")


class DatabaseStorage(ApiModel):
    dialect: str = Field(examples=["postgresql"])
    total_bytes: int | None = Field(description="The whole database.")
    tables: list[TableStorage]
    partitions: list[PartitionStorage] = Field(
        default_factory=list,
        description="PostgreSQL: the daily partitions of `executions` and `step_runs` (by "
        "table, oldest first, the default partition last); SQLite: none.",
    )


class QueueStorage(ApiModel):
    queue: str = Field(examples=["workflow.execute.us"])
    completed: int = Field(description="Completed jobs kept (QUEUE_KEEP_COMPLETED).")
    failed: int = Field(description="Failed jobs kept (QUEUE_KEEP_FAILED).")
    events: int = Field(description="Entries of the events stream (QUEUE_EVENTS_MAX_LEN).")


class RedisStorage(ApiModel):
    status: str = Field(description="`ready` or `unreachable`.", examples=["ready"])
    used_memory: int | None = Field(None, description="INFO used_memory, bytes.")
    maxmemory: int | None = Field(None, description="INFO maxmemory (0: no limit).")
    queues: list[QueueStorage] = Field(default_factory=list)
    error: str | None = None


class KeepOut(ApiModel):
    count: int
    age_s: int


class RetentionSettings(ApiModel):
    execution_retention_s: int = Field(examples=[1209600])
    max_per_tenant: int | None
    tenants_overriding: int = Field(description="Tenants with their own retention or cap.")
    queue_keep_completed: KeepOut
    queue_keep_failed: KeepOut
    queue_events_max_len: int


class StorageData(ApiModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "timestamp": "2024-05-15T18:19:00.000Z",
                    "database": {
                        "dialect": "postgresql",
                        "totalBytes": 3221225472,
                        "tables": [
                            {"name": "executions", "rows": 1250000, "rowsExact": False,
                             "bytes": 2831155200, "oldest": "2024-05-01T18:19:00Z"},
                        ],
                        "partitions": [
                            {"table": "executions", "name": "executions_p20240515",
                             "day": "2024-05-15", "lower": "018f798c780000000000000000000000",
                             "upper": "018f7eb2d40000000000000000000000", "rows": 89000,
                             "bytes": 201326592},
                        ],
                    },
                    "redis": {
                        "status": "ready", "usedMemory": 5242880, "maxmemory": 0,
                        "queues": [{"queue": "workflow.execute.us", "completed": 1000,
                                    "failed": 12, "events": 10012}],
                    },
                    "retention": {
                        "executionRetentionS": 1209600, "maxPerTenant": None,
                        "tenantsOverriding": 0,
                        "queueKeepCompleted": {"count": 1000, "ageS": 86400},
                        "queueKeepFailed": {"count": 10000, "ageS": 604800},
                        "queueEventsMaxLen": 10000,
                    },
                }
            ]
        }
    )  # fmt: skip
    timestamp: str
    database: DatabaseStorage
    redis: RedisStorage
    retention: RetentionSettings
