"""Models of the per-tenant execution limits (``/api/admin/tenants/{tenantId}/limits``)."""

from __future__ import annotations

from pydantic import ConfigDict, Field

from conveyor.api.schemas._common import ApiModel

MAX_CONCURRENCY = 100_000
MAX_RATE = 1_000_000.0
MAX_BURST = 1_000_000


class TenantLimitsIn(ApiModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"concurrency": 3, "startRate": 5, "startBurst": 10}]},
    )
    concurrency: int | None = Field(
        None,
        ge=1,
        le=MAX_CONCURRENCY,
        strict=True,
        description=(
            "Executions of this tenant running at once across all workers; `null`: "
            "`EXECUTION_TENANT_CONCURRENCY` applies."
        ),
    )
    start_rate: float | None = Field(
        None,
        gt=0,
        le=MAX_RATE,
        allow_inf_nan=False,
        strict=True,
        description=(
            "Executions of this tenant started per second across all workers (decimals "
            "allowed: `0.5` is one every two seconds); `null`: `EXECUTION_TENANT_START_RATE` "
            "applies."
        ),
    )
    start_burst: int | None = Field(
        None,
        ge=1,
        le=MAX_BURST,
        strict=True,
        description=(
            "Starts allowed at once after an idle period; `null`: "
            "`EXECUTION_TENANT_START_BURST` applies."
        ),
    )


class TenantLimitsOut(ApiModel):
    tenant_id: str
    concurrency: int | None = Field(description="The tenant's own cap; `null`: none.")
    start_rate: float | None = Field(description="The tenant's own start rate; `null`: none.")
    start_burst: int | None = Field(description="The tenant's own burst; `null`: none.")
    effective_concurrency: int = Field(
        description="The cap in force (its own, else `EXECUTION_TENANT_CONCURRENCY`).",
        examples=[3],
    )
    effective_start_rate: float | None = Field(
        description="The start rate in force (`null`: not rate limited).", examples=[5.0]
    )
    effective_start_burst: int | None = Field(
        description="The burst in force (`null` when not rate limited).", examples=[10]
    )
