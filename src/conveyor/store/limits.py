"""Per-tenant execution limits (the ``tenant_limits`` table): overrides of
``EXECUTION_TENANT_CONCURRENCY``, ``EXECUTION_TENANT_START_RATE`` and
``EXECUTION_TENANT_START_BURST``, set through the admin API and read by every execution worker
(the whole table, every few seconds: one row per tenant that overrides something).

``None`` (or no row) means the setting applies. Setting every field to ``None`` deletes the row.
"""

from __future__ import annotations

import builtins
from dataclasses import dataclass

from sqlalchemy import delete, select

from conveyor.errors import NotFound
from conveyor.store._base import ServiceBase
from conveyor.store._types import utcnow
from conveyor.store.schema import tenant_limits, tenants

__all__ = ["TenantLimits", "TenantLimitsService"]

_L = tenant_limits.c


@dataclass(frozen=True, slots=True)
class TenantLimits:
    """A tenant's own limits; ``None``: the setting applies."""

    tenant_id: str
    concurrency: int | None = None
    start_rate: float | None = None
    start_burst: int | None = None

    @property
    def empty(self) -> bool:
        return self.concurrency is None and self.start_rate is None and self.start_burst is None


class TenantLimitsService(ServiceBase):
    """Read and replace per-tenant limit overrides."""

    async def get(self, tenant_id: str) -> TenantLimits:
        """The tenant's overrides (all ``None`` when it has none); NotFound for no tenant."""
        query = (
            select(tenants.c.id, _L.concurrency, _L.start_rate, _L.start_burst)
            .select_from(tenants.outerjoin(tenant_limits, _L.tenant_id == tenants.c.id))
            .where(tenants.c.id == tenant_id)
        )
        async with self._auto() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            raise NotFound("tenant not found", tenant_id=tenant_id)
        return TenantLimits(tenant_id, row.concurrency, row.start_rate, row.start_burst)

    async def set(self, limits: TenantLimits) -> TenantLimits:
        """Replace the tenant's overrides (all ``None`` removes them); NotFound for no tenant."""
        tenant_id = limits.tenant_id
        async with self._tx() as conn:
            exists = (
                await conn.execute(select(tenants.c.id).where(tenants.c.id == tenant_id))
            ).first()
            if exists is None:
                raise NotFound("tenant not found", tenant_id=tenant_id)
            await conn.execute(delete(tenant_limits).where(_L.tenant_id == tenant_id))
            if not limits.empty:
                await conn.execute(
                    tenant_limits.insert().values(
                        tenant_id=tenant_id,
                        concurrency=limits.concurrency,
                        start_rate=limits.start_rate,
                        start_burst=limits.start_burst,
                        updated_at=utcnow(),
                    )
                )
        return limits

    async def all(self) -> builtins.list[TenantLimits]:
        """Every tenant's overrides (tenants without any are left out)."""
        query = select(_L.tenant_id, _L.concurrency, _L.start_rate, _L.start_burst)
        async with self._auto() as conn:
            rows = (await conn.execute(query)).all()
        return [TenantLimits(r.tenant_id, r.concurrency, r.start_rate, r.start_burst) for r in rows]
