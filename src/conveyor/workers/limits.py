"""Process-wide concurrency: one global budget, a per-process cap per tenant, and parked jobs;
and :class:`TenantLimitsBook`, the fleet-wide limits in force for each tenant.

The fleet-wide limits (``EXECUTION_TENANT_CONCURRENCY`` across all workers, the start rate)
live in Redis (:mod:`conveyor.dispatch.limits`); this module is the process's own part:

* The global budget (``EXECUTION_WORKER_CONCURRENCY``) is shared by every region's BullMQ worker
  of the process: a FIFO semaphore, so regions get slots in arrival order.
* A tenant at its per-process cap (``EXECUTION_TENANT_CONCURRENCY_PER_PROCESS``, default: no cap
  below the budget) does not get a slot: its job is *parked*
  (the processor raises ``JobDeferred``: back to BullMQ's delayed set, no attempt used, no slot
  held). The job id is remembered locally, oldest first; when one of that tenant's jobs ends,
  the oldest parked job is promoted (delayed -> waiting) so it runs next. The delay is only the
  fallback if this process dies: roughly the time the job would have waited for its turn
  anyway, so a long parked backlog does not cycle through Redis.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from conveyor.dispatch import EffectiveLimits, effective_limits

if TYPE_CHECKING:
    from conveyor.settings import Settings
    from conveyor.store import TenantLimits

log = logging.getLogger(__name__)

PARK_BASE_MS = 5_000
"""Fallback delay of a parked job when the process that parked it is gone."""
PARK_MAX_MS = 300_000
"""Upper bound of the fallback delay."""
_EWMA_ALPHA = 0.1
LIMITS_REFRESH_S = 5.0
"""How often a worker reloads the per-tenant limit overrides from the database."""


def fallback_delay_ms(parked: int, avg_duration_s: float, cap: int) -> int:
    """The delay of a parked job: roughly when its turn would come, bounded."""
    wait_s = parked * avg_duration_s / max(1, cap)
    return int(min(PARK_MAX_MS, PARK_BASE_MS + wait_s * 1000))


@dataclass
class TenantState:
    active: int = 0
    parked: OrderedDict[str, str] = field(default_factory=OrderedDict)
    """job id -> queue name, oldest first."""


class ConcurrencyLimits:
    """Book-keeping of slots, per-tenant counts and parked jobs (no I/O)."""

    def __init__(self, concurrency: int, tenant_concurrency: int) -> None:
        self.concurrency = concurrency
        self.tenant_concurrency = max(1, min(tenant_concurrency, concurrency))
        self._slots = asyncio.Semaphore(concurrency)
        self._tenants: dict[str, TenantState] = {}
        self.active = 0
        self.avg_duration_s = 0.1

    # --- global budget --------------------------------------------------------------------
    async def acquire_slot(self) -> None:
        await self._slots.acquire()

    def release_slot(self) -> None:
        self._slots.release()

    # --- tenants ----------------------------------------------------------------------------
    def _tenant(self, tenant: str) -> TenantState:
        state = self._tenants.get(tenant)
        if state is None:
            state = self._tenants[tenant] = TenantState()
        return state

    def running(self, tenant: str) -> int:
        """Executions of ``tenant`` running in this process now."""
        state = self._tenants.get(tenant)
        return 0 if state is None else state.active

    def try_start(self, tenant: str, job_id: str) -> bool:
        """Take one of ``tenant``'s slots for ``job_id`` if it has one free."""
        state = self._tenant(tenant)
        if state.active >= self.tenant_concurrency:
            return False
        if state.parked:
            state.parked.pop(job_id, None)  # its fallback delay fired before its promotion
        state.active += 1
        self.active += 1
        return True

    def cancel_start(self, tenant: str) -> None:
        """Undo :meth:`try_start` (the fleet's limits refused the job): no promotion, since
        the slot was never used."""
        state = self._tenant(tenant)
        state.active -= 1
        self.active -= 1
        if state.active == 0 and not state.parked:
            del self._tenants[tenant]

    def finish(self, tenant: str, duration_s: float | None = None) -> tuple[str, str] | None:
        """Give ``tenant``'s slot back; returns the oldest parked ``(queue, job_id)`` to promote."""
        state = self._tenant(tenant)
        state.active -= 1
        self.active -= 1
        if duration_s is not None:
            self.avg_duration_s += _EWMA_ALPHA * (duration_s - self.avg_duration_s)
        if state.parked:
            job_id, queue = state.parked.popitem(last=False)
            return queue, job_id
        if state.active == 0:
            del self._tenants[tenant]
        return None

    def park(self, tenant: str, queue: str, job_id: str) -> int:
        """Remember a held-back job; returns its fallback delay in ms.

        A job parked again (its fallback fired while the tenant was still busy) keeps its place.
        """
        state = self._tenant(tenant)
        if job_id not in state.parked:
            state.parked[job_id] = queue
        return fallback_delay_ms(len(state.parked), self.avg_duration_s, self.tenant_concurrency)

    def unpark_front(self, tenant: str, queue: str, job_id: str) -> None:
        """Put a job back at the front of the parked list (its promotion must be retried)."""
        state = self._tenant(tenant)
        state.parked[job_id] = queue
        state.parked.move_to_end(job_id, last=False)

    def take_parked(self, tenant: str) -> tuple[str, str] | None:
        """The oldest parked ``(queue, job_id)`` of ``tenant`` if it has a free slot."""
        state = self._tenants.get(tenant)
        if state is None or not state.parked or state.active >= self.tenant_concurrency:
            return None
        job_id, queue = state.parked.popitem(last=False)
        return queue, job_id

    def drain_parked(self) -> list[tuple[str, str]]:
        """Every parked ``(queue, job_id)``, forgetting them (shutdown: hand them back)."""
        out: list[tuple[str, str]] = []
        for state in self._tenants.values():
            out.extend((queue, job_id) for job_id, queue in state.parked.items())
            state.parked.clear()
        return out

    # --- status ------------------------------------------------------------------------------
    def active_by_tenant(self) -> dict[str, int]:
        return {t: s.active for t, s in self._tenants.items() if s.active}

    @property
    def parked_count(self) -> int:
        return sum(len(s.parked) for s in self._tenants.values())


class TenantLimitsBook:
    """The fleet-wide limits in force for each tenant: its overrides (the ``tenant_limits``
    table, reloaded every :data:`LIMITS_REFRESH_S`), else the settings. No I/O on lookup."""

    def __init__(
        self,
        settings: Settings,
        load: Callable[[], Awaitable[Sequence[TenantLimits]]],
        *,
        refresh_s: float = LIMITS_REFRESH_S,
    ) -> None:
        self._settings = settings
        self._load = load
        self.refresh_s = refresh_s
        self.default = effective_limits(settings)
        self._own: dict[str, EffectiveLimits] = {}
        self.loaded_at: float | None = None

    def get(self, tenant: str) -> EffectiveLimits:
        return self._own.get(tenant, self.default)

    @property
    def overrides(self) -> int:
        return len(self._own)

    async def refresh(self) -> None:
        rows = await self._load()
        self._own = {r.tenant_id: effective_limits(self._settings, r) for r in rows}
        self.loaded_at = time.monotonic()

    async def run(self) -> None:
        """Reload now and then; a failed reload keeps the last limits. Never ends by itself."""
        while True:
            try:
                await self.refresh()
            except Exception as exc:
                log.warning("worker.limits_reload_failed", extra={"error": repr(exc)})
            await asyncio.sleep(self.refresh_s)
