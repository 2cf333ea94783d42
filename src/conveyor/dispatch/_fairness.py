"""The worker's half of tenant fairness (the enqueue half is the dispatcher's count).

When a job *starts* (it passed the tenant cap) its tenant's pending counter is decremented.
Decrements are batched in memory and flushed every ~50 ms in one pipeline (one Lua call per
queue, clamped at 0, zero entries deleted). Every ``clamp_interval_s`` each counter is clamped
to the queue's real backlog (wait + paused + prioritized + delayed), and the hash is deleted
when the queue is empty: drift from duplicates, lost decrements (a crash between start and
flush) or producers that bypass the dispatcher cannot grow without bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisClusterException, RedisError

from conveyor.dispatch import keys
from conveyor.queue import is_missing_script

if TYPE_CHECKING:
    from conveyor.queue import QueueFactory
    from conveyor.settings import Settings

log = logging.getLogger(__name__)


class FairnessLedger:
    """Batches "job started" decrements and bounds the counters' drift."""

    def __init__(
        self,
        queues: QueueFactory,
        settings: Settings,
        queue_names: Sequence[str],
        *,
        flush_interval_s: float = 0.05,
        clamp_interval_s: float = 30.0,
    ) -> None:
        self._queues = queues
        self._prefix = settings.queue_prefix
        self._cluster = settings.uses_cluster
        self._loaded = False
        """On Redis Cluster: the decrement script was loaded on the masters (see :meth:`flush`)."""
        self.queue_names = list(queue_names)
        self.flush_interval_s = flush_interval_s
        self.clamp_interval_s = clamp_interval_s
        self._pending: dict[str, dict[str, int]] = {}
        self._dirty = asyncio.Event()
        self._decrement: Any = None
        self._clamp: Any = None
        self.flushes = 0

    def started(self, queue_name: str, tenant: str) -> None:
        """A job of ``tenant`` started on ``queue_name`` (no I/O)."""
        per = self._pending.get(queue_name)
        if per is None:
            per = self._pending[queue_name] = {}
        per[tenant] = per.get(tenant, 0) + 1
        self._dirty.set()

    def unstarted(self, queue_name: str, tenant: str) -> None:
        """A job counted by :meth:`started` went back to the queue without running (deferred:
        the database down, the execution busy elsewhere, the worker stopping): pending again,
        as the enqueue counted it (no I/O: the flush sends the net change, an increment when
        the decrement already went). Its next start decrements once more; uncounted, every
        deferral would lower the tenant's count for good — the clamp only lowers counts — and
        its next enqueues would jump its own backlog."""
        per = self._pending.get(queue_name)
        if per is None:
            per = self._pending[queue_name] = {}
        per[tenant] = per.get(tenant, 0) - 1
        self._dirty.set()

    def _scripts(self) -> tuple[Any, Any]:
        if self._decrement is None:
            self._decrement = self._queues.redis.register_script(keys.DECREMENT_SCRIPT)
            self._clamp = self._queues.redis.register_script(keys.CLAMP_SCRIPT)
        return self._decrement, self._clamp

    async def flush(self) -> None:
        """Send the batched decrements in one pipeline; on failure they are kept for later.

        On Redis Cluster the pipeline does not load the script (a plain one checks
        ``SCRIPT EXISTS``): it is loaded on every master first, and the decrements a master
        refused for want of it (restarted, or a promoted replica) are sent again once."""
        if not self._pending:
            return
        batch, self._pending = self._pending, {}
        self._dirty.clear()
        items = list(batch.items())
        for attempt in (1, 2):
            try:
                results = await self._send(items)
            except BaseException:
                self._loaded = False
                self._keep(items)
                raise
            failed = [(item, r) for item, r in zip(items, results, strict=True)
                      if isinstance(r, Exception)]  # fmt: skip
            if not failed:
                break
            items = [item for item, _ in failed]
            self._loaded = False  # load again first: a master lost the script
            if attempt == 2 or not all(is_missing_script(r) for _, r in failed):
                self._keep(items)
                raise failed[0][1]
        self.flushes += 1

    async def _send(self, items: list[tuple[str, dict[str, int]]]) -> list[Any]:
        decrement, _clamp = self._scripts()
        if self._cluster and not self._loaded:
            await self._queues.redis.script_load(keys.DECREMENT_SCRIPT)
            self._loaded = True
        pipe = self._queues.redis.pipeline(transaction=False)
        for queue_name, per in items:
            args: list[Any] = [x for tenant, n in per.items() if n for x in (tenant, n)]
            await decrement(
                keys=[keys.fair(self._prefix, queue_name, cluster=self._cluster)],
                args=args,
                client=pipe,
            )
        results: list[Any] = await pipe.execute(raise_on_error=False)
        return results

    def _keep(self, items: list[tuple[str, dict[str, int]]]) -> None:
        """Put decrements that were not applied back (the next flush sends them)."""
        for queue_name, per in items:
            kept = self._pending.setdefault(queue_name, {})
            for tenant, n in per.items():
                kept[tenant] = kept.get(tenant, 0) + n
        self._dirty.set()

    async def clamp(self) -> dict[str, int]:
        """Clamp every counter to its queue's backlog; returns the backlog per queue."""
        _decrement, clamp = self._scripts()
        out: dict[str, int] = {}
        for name in self.queue_names:
            names = [
                keys.fair(self._prefix, name, cluster=self._cluster),
                *keys.backlog(self._prefix, name, cluster=self._cluster),
            ]
            out[name] = int(await clamp(keys=names, args=[]))
        return out

    async def run(self) -> None:
        """Flush while there is something to flush; clamp now and then. Never ends by itself."""
        next_clamp = time.monotonic()
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), timeout=self.clamp_interval_s)
            await asyncio.sleep(self.flush_interval_s)
            try:
                await self.flush()
                if time.monotonic() >= next_clamp:
                    await self.clamp()
                    next_clamp = time.monotonic() + self.clamp_interval_s
            except (RedisError, RedisClusterException, OSError) as exc:
                log.warning("fairness.flush_failed", extra={"error": repr(exc)})
                await asyncio.sleep(1.0)
