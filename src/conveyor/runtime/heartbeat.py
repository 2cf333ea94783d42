"""Process registry: every long-running process publishes a heartbeat with an expiry.

Each beat writes, in one pipeline::

    SET  {prefix}:conveyor:process:{process_id}  <json>  PX 3*interval
    ZADD {prefix}:conveyor:processes  <now_ms>  <process_id>

so a process that dies disappears within three intervals. Readers
(:func:`list_processes`, the API's admin status) return only members whose key still exists and
prune index members older than the expiry. A process removes its own key on clean shutdown.

The JSON document: ``id, role, regions, pid, host, startedAt, lastHeartbeat`` plus whatever the
role's ``info_fn`` returns (worker: ``concurrency, tenantConcurrency`` (fleet-wide),
``tenantConcurrencyPerProcess, activeJobs, activeByTenant, leasesHeld, fleetSlotsWarm,
fleetSlotsReused, jobsDone, jobsFailed, jobsParkedFleet, jobsParkedRate, ...``; scheduler:
``strategy, lockHeld, lastTick, lagMs``; timers: ``nextDueAt, backlog, lagMs``).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisClusterException, RedisError

from conveyor.dispatch import keys

if TYPE_CHECKING:
    from conveyor.queue import QueueFactory
    from conveyor.settings import Settings

log = logging.getLogger(__name__)

InfoFn = Callable[[], Mapping[str, Any] | Awaitable[Mapping[str, Any]]]


TIMER_ROLES = ("timers", "timer_dispatcher", "timer-dispatcher", "timerDispatcher")
"""Roles a timer dispatcher may publish under (Conveyor's ``timers``; the others are
spellings of other producers of the status document, accepted when reading it)."""


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


def _now_ms() -> int:
    return int(time.time() * 1000)


class Heartbeat:
    """Publishes this process's status every ``settings.heartbeat_interval_ms``.

    ``run()`` is meant to be spawned as a supervised loop; a failed beat (Redis blip) is logged
    and retried at the next interval, it never ends the loop. ``remove()`` deletes the key.
    """

    def __init__(
        self,
        queues: QueueFactory,
        *,
        role: str,
        info_fn: InfoFn | None = None,
        settings: Settings | None = None,
        regions: Sequence[str] | None = None,
        process_id: str | None = None,
    ) -> None:
        resolved = settings if settings is not None else getattr(queues, "settings", None)
        if resolved is None:
            raise TypeError("Heartbeat needs settings (pass settings=...)")
        self._queues = queues
        self._settings: Settings = resolved
        self._cluster = self._queues.settings.uses_cluster
        self.role = role
        self._info_fn = info_fn
        self.regions = list(regions if regions is not None else resolved.execution_regions)
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.process_id = process_id or f"{role}-{self.host}-{self.pid}-{uuid.uuid4().hex[:6]}"
        self.started_ms = _now_ms()
        self.beats = 0

    @property
    def interval_s(self) -> float:
        return self._settings.heartbeat_interval_ms / 1000.0

    @property
    def ttl_ms(self) -> int:
        return 3 * self._settings.heartbeat_interval_ms

    @property
    def key(self) -> str:
        return keys.process(
            self._queues.settings.queue_prefix, self.process_id, cluster=self._cluster
        )

    async def document(self) -> dict[str, Any]:
        """The JSON document of one beat."""
        doc: dict[str, Any] = {
            "id": self.process_id,
            "role": self.role,
            "regions": self.regions,
            "pid": self.pid,
            "host": self.host,
            "startedAt": _iso(self.started_ms),
            "lastHeartbeat": _iso(_now_ms()),
        }
        if self._info_fn is not None:
            info = self._info_fn()
            if inspect.isawaitable(info):
                info = await info
            doc.update(info)
        return doc

    async def beat(self) -> None:
        """Write one heartbeat (raises on Redis errors)."""
        doc = await self.document()
        now = _now_ms()
        pipe = self._queues.redis.pipeline(transaction=False)
        pipe.set(self.key, json.dumps(doc, default=str), px=self.ttl_ms)
        pipe.zadd(
            keys.processes(self._queues.settings.queue_prefix, cluster=self._cluster),
            {self.process_id: now},
        )
        pipe.zremrangebyscore(
            keys.processes(self._queues.settings.queue_prefix, cluster=self._cluster),
            "-inf",
            now - self.ttl_ms,
        )
        await pipe.execute()
        self.beats += 1

    async def remove(self) -> None:
        """Delete this process's key and index entry (clean shutdown); never raises."""
        try:
            pipe = self._queues.redis.pipeline(transaction=False)
            pipe.delete(self.key)
            pipe.zrem(
                keys.processes(self._queues.settings.queue_prefix, cluster=self._cluster),
                self.process_id,
            )
            await pipe.execute()
        except (RedisError, RedisClusterException, OSError) as exc:
            log.warning("heartbeat.remove_failed", extra={"role": self.role, "error": repr(exc)})


async def list_processes(queues: QueueFactory, *, role: str | None = None) -> list[dict[str, Any]]:
    """The live processes (their key still exists), optionally of one ``role``.

    Index members whose key has expired are pruned. Sorted by role, then id.
    """
    cluster = queues.settings.uses_cluster
    index = keys.processes(queues.settings.queue_prefix, cluster=cluster)
    ids = [_text(m) for m in await queues.redis.zrange(index, 0, -1)]
    if not ids:
        return []
    raw = await queues.redis.mget(
        [keys.process(queues.settings.queue_prefix, p, cluster=cluster) for p in ids]
    )
    live: list[dict[str, Any]] = []
    dead: list[str] = []
    for pid, value in zip(ids, raw, strict=True):
        if value is None:
            dead.append(pid)
            continue
        try:
            doc = json.loads(value)
        except ValueError:
            dead.append(pid)
            continue
        if role is None or doc.get("role") == role:
            live.append(doc)
    if dead:
        await queues.redis.zrem(index, *dead)
    live.sort(key=lambda d: (str(d.get("role")), str(d.get("id"))))
    return live


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
