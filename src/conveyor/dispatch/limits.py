"""Tenant limits shared by the whole fleet: concurrency leases and a start-rate bucket in Redis.

* **Concurrency** — a tenant runs at most ``concurrency`` executions across all workers. Each
  running execution holds a *lease* in the tenant's sorted set (member: the job id, score: its
  expiry). The worker renews its leases with the job locks (same duration); a crashed worker's
  leases expire and free their slots within ``EXECUTION_LOCK_DURATION_MS``.
* **Start rate** — at most ``start_rate`` starts per second with bursts of ``start_burst``
  (a token bucket kept as GCRA: one "theoretical arrival time" per tenant). A job that may not
  start yet gets its start time *reserved* and waits, parked, until then: one park per job,
  starts spaced exactly, no polling.
* A job refused by the cap is added to the tenant's *parked* set (oldest first) in the same
  script; whoever frees a slot (a release, or a sweep finding expired leases) pops the oldest
  parked jobs into the free slots and promotes them.

Every decision is one Lua script (atomic); the scripts and key names are in
:mod:`conveyor.dispatch.keys`. Concurrent calls of one process share round trips
(:class:`~conveyor.queue.scripts.ScriptBatcher`: a lone call goes at once, calls made while it
is on its way go together as the next pipeline). Nothing here is the source of truth: losing these keys loses no
execution (at worst a parked job waits for its fallback delay).
"""

from __future__ import annotations

import asyncio
import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from conveyor.dispatch import keys
from conveyor.queue.scripts import ScriptBatcher

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from conveyor.settings import Settings
    from conveyor.store import TenantLimits

__all__ = [
    "MAX_RESERVE_MS",
    "EffectiveLimits",
    "TenantLimiter",
    "Verdict",
    "effective_limits",
    "parked_member",
]

MAX_RESERVE_MS = 300_000
"""Start times are reserved at most this far ahead; a job beyond it waits this long and asks
again (so a lowered rate or a very long backlog is not fixed in advance)."""
PARKED_TTL_MS = 600_000
"""A tenant's parked set expires this long after its last park (garbage collection only)."""
RESERVATION_SLACK_MS = 100
"""A job back this much before its reserved start time is let through (clock jitter)."""


@dataclass(frozen=True, slots=True)
class EffectiveLimits:
    """The limits in force for one tenant: its overrides, else the settings."""

    concurrency: int
    start_rate: float | None = None
    start_burst: int | None = None


def default_burst(rate: float) -> int:
    """One second's worth of starts, at least one."""
    return max(1, math.ceil(rate))


def effective_limits(settings: Settings, override: TenantLimits | None = None) -> EffectiveLimits:
    """A tenant's limits: each field its own override when set, else the setting."""
    concurrency = settings.tenant_concurrency
    rate = settings.execution_tenant_start_rate
    burst = settings.execution_tenant_start_burst
    if override is not None:
        concurrency = override.concurrency or concurrency
        rate = override.start_rate or rate
        burst = override.start_burst or burst
    if rate is None:
        return EffectiveLimits(concurrency)
    return EffectiveLimits(concurrency, rate, burst or default_burst(rate))


@dataclass(frozen=True, slots=True)
class Verdict:
    """What :meth:`TenantLimiter.acquire` decided."""

    started: bool
    reason: str = ""
    """``concurrency`` or ``rate`` when not started."""
    parked: int = 0
    """For ``concurrency``: the tenant's parked jobs, this one included."""
    wait_ms: int = 0
    """For ``concurrency``: until the earliest lease expires (a hint); for ``rate``: until the
    job's reserved start."""
    promote: tuple[tuple[str, str], ...] = ()
    """For ``concurrency`` with ``replaces``: the ``(queue, job_id)`` of the parked jobs popped
    into the slot the dropped lease freed, oldest first — the caller promotes them."""


def _sha(source: str) -> str:
    return hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()


def parked_member(queue: str, job_id: str) -> str:
    return f"{queue}|{job_id}"


def _split(member: Any) -> tuple[str, str]:
    text = member.decode() if isinstance(member, bytes) else str(member)
    queue, _, job_id = text.partition("|")
    return queue, job_id


class TenantLimiter:
    """One process's handle on the fleet's tenant limits; remembers the leases it holds.

    ``clock`` (ms) is for tests; by default every script reads Redis's own clock, so all
    workers agree on expiries whatever their local clocks say.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        prefix: str,
        *,
        lease_ttl_ms: int,
        cluster: bool = False,
        clock: Callable[[], int] | None = None,
    ) -> None:
        self._redis = redis
        self._prefix = prefix
        self._cluster = cluster
        self.lease_ttl_ms = lease_ttl_ms
        self._clock = clock
        self.held: dict[str, str] = {}
        """Leases this process holds: job id -> tenant."""
        self._batcher = ScriptBatcher(redis, cluster=cluster)
        self._shas = {
            source: _sha(source)
            for source in (
                keys.LIMIT_ACQUIRE_SCRIPT,
                keys.LIMIT_RENEW_SCRIPT,
                keys.LIMIT_RELEASE_SCRIPT,
                keys.LIMIT_SWEEP_SCRIPT,
            )
        }

    async def _run(self, source: str, names: Sequence[Any], args: Sequence[Any]) -> Any:
        return await self._batcher.call(source, self._shas[source], names, args)

    def _now(self) -> int | str:
        return "" if self._clock is None else self._clock()

    async def acquire(
        self,
        tenant: str,
        job_id: str,
        queue: str,
        limits: EffectiveLimits,
        *,
        replaces: str | None = None,
        lease: str | None = None,
        hand_off: bool = False,
    ) -> Verdict:
        """Take a slot (and a start token) for ``job_id``, or say why not: at the cap the job
        is parked in the tenant's set; over the rate its start time is reserved. ``replaces``:
        a lease of the same tenant to drop first (a run that ended here, not released yet).
        ``lease``: the lease's member in Redis (default: the job id). ``hand_off``: the slot
        of ``replaces`` goes to the tenant's parked jobs first (this job is parked behind them
        unless a slot is left) — in one script, so the tenant's count never holds both leases
        at once. A refusal that dropped ``replaces`` pops the parked jobs the freed slot makes
        room for (:attr:`Verdict.promote`)."""
        if replaces is not None:
            self.held.pop(replaces, None)  # dropped by the script: no longer ours to renew
        names = keys.limit_acquire_keys(self._prefix, tenant, cluster=self._cluster)
        args: list[Any] = [
            self._now(),
            tenant,
            job_id,
            parked_member(queue, job_id),
            limits.concurrency,
            self.lease_ttl_ms,
            limits.start_rate or 0,
            limits.start_burst or 1,
            MAX_RESERVE_MS,
            PARKED_TTL_MS,
            RESERVATION_SLACK_MS,
            replaces or "",
            lease or "",
            "1" if hand_off else "",
        ]
        result = await self._run(keys.LIMIT_ACQUIRE_SCRIPT, names, args)
        if int(result[0]) == 1:
            self.held[lease or job_id] = tenant
            return Verdict(True)
        reason = result[1].decode() if isinstance(result[1], bytes) else str(result[1])
        promote = tuple(_split(member) for member in result[4:])
        return Verdict(False, reason, int(result[2]), int(result[3]), promote)

    async def release(self, tenant: str, job_id: str | None) -> list[tuple[str, str]]:
        """Give ``job_id``'s slot back (``None``: only look for free slots); returns the
        ``(queue, job_id)`` of the parked jobs to promote into the free slots, oldest first."""
        (result,) = await self.release_many([(tenant, job_id)])
        if isinstance(result, BaseException):
            raise result
        return result

    async def release_many(
        self, items: Sequence[tuple[str, str | None]]
    ) -> list[list[tuple[str, str]] | BaseException]:
        """:meth:`release` for each ``(tenant, job_id)``, all submitted before this awaits
        anything (so an acquire made later cannot overtake them); per item, the jobs to
        promote or the error."""
        source = keys.LIMIT_RELEASE_SCRIPT
        futures = []
        for tenant, job_id in items:
            if job_id is not None:
                self.held.pop(job_id, None)
            names = keys.limit_release_keys(self._prefix, tenant, cluster=self._cluster)
            args = [self._now(), tenant, job_id or ""]
            futures.append(self._batcher.submit(source, self._shas[source], names, args))
        results = await asyncio.gather(*futures, return_exceptions=True)
        return [r if isinstance(r, BaseException) else [_split(m) for m in r] for r in results]

    async def renew(self, job_ids: Iterable[str] | None = None) -> list[str]:
        """Extend the leases this process holds (or those of ``job_ids``) by the lease TTL, in
        one round trip. Returns the job ids whose lease had expired (re-added)."""
        ids = [j for j in (self.held if job_ids is None else job_ids) if j in self.held]
        if not ids:
            return []
        names = keys.limit_renew_keys(
            self._prefix, [self.held[j] for j in ids], cluster=self._cluster
        )
        lost = await self._run(
            keys.LIMIT_RENEW_SCRIPT, names, [self._now(), self.lease_ttl_ms, *ids]
        )
        return [ids[int(i) - 1] for i in lost]

    async def sweep(self) -> tuple[list[tuple[str, str]], int | None]:
        """Free the slots of crashed workers (expired leases) of every tenant with parked jobs
        and pop parked jobs into them. Returns ``(queue, job_id)`` pairs to promote and the ms
        until the earliest lease of a still-waiting tenant expires (``None``: nobody waits)."""
        waiting = keys.limit_waiting(self._prefix, cluster=self._cluster)
        tenants = sorted(
            t.decode() if isinstance(t, bytes) else str(t)
            for t in await self._redis.smembers(waiting)
        )
        if not tenants:
            return [], None
        names = keys.limit_sweep_keys(self._prefix, tenants, cluster=self._cluster)
        result = await self._run(keys.LIMIT_SWEEP_SCRIPT, names, [self._now(), *tenants])
        wait = int(result[0])
        return [_split(m) for m in result[1:]], (None if wait < 0 else wait)
