"""Process heartbeats: written with an expiry, listed while alive, removed on clean stop."""

from __future__ import annotations

import json

import redis.asyncio as aioredis

from conveyor.dispatch import keys
from conveyor.queue import QueueFactory
from conveyor.runtime import Heartbeat, list_processes
from tests.worker._support import make_settings


async def test_heartbeat_lifecycle(redis_prefix: str, redis_client: aioredis.Redis) -> None:
    settings = make_settings(redis_prefix, HEARTBEAT_INTERVAL_MS="1000")
    async with QueueFactory(settings) as qf:
        beat = Heartbeat(
            qf,
            role="worker",
            settings=settings,
            info_fn=lambda: {"concurrency": 3, "activeJobs": 1},
        )

        async def timers_info() -> dict[str, object]:
            return {"nextDueAt": None, "backlog": 0}

        other = Heartbeat(qf, role="timers", settings=settings, info_fn=timers_info, regions=[])
        await beat.beat()
        await other.beat()
        ttl = await redis_client.pttl(beat.key)
        assert 0 < ttl <= 3000
        live = await list_processes(qf)
        assert [p["role"] for p in live] == ["timers", "worker"]
        doc = next(p for p in live if p["role"] == "worker")
        assert doc["id"] == beat.process_id and doc["regions"] == ["us"]
        assert doc["concurrency"] == 3 and doc["activeJobs"] == 1
        assert {"pid", "host", "startedAt", "lastHeartbeat"} <= set(doc)
        assert [p["id"] for p in await list_processes(qf, role="timers")] == [other.process_id]

        # a process whose key expired (it died) disappears and is pruned from the index
        await redis_client.delete(other.key)
        assert [p["role"] for p in await list_processes(qf)] == ["worker"]
        assert (
            await redis_client.zscore(keys.processes(qf.settings.queue_prefix), other.process_id)
            is None
        )

        await beat.remove()
        assert await list_processes(qf) == []
        assert json.loads(json.dumps(doc))  # JSON-clean
