"""``conveyor check``: the settings parsed (the CLI did that), is Redis usable by BullMQ?

Exit 0 with a short summary when it is; exit 1 with one clear line when Redis is
unreachable, refuses the credentials, is too old, or the driver is ``inmemory``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from conveyor.cli.tables import redis_line
from conveyor.errors import QueueError
from conveyor.queue import QueueFactory
from conveyor.queue.connection import location
from conveyor.settings import Settings


def _onoff(value: Any) -> str:
    return "unknown" if value is None else ("on" if value else "off")


async def _check(settings: Settings) -> list[str]:
    async with QueueFactory(settings) as queues:
        await queues.assert_queue_is_ready()
        report = await queues.health()
    if report["status"] != "ready":
        raise QueueError(str(report.get("error", "Redis is not ready")))
    persistence = report["persistence"]
    lines = [
        f"redis: {location(settings)} version {report['redisVersion'] or 'unknown'} "
        f"(latency {report['latencyMs']} ms)",
        f"queue: driver {report['driver']}, prefix {settings.queue_prefix!r}, "
        f"durable {'yes' if report['durable'] else 'no'}",
        f"persistence: aof {_onoff(persistence['aof'])}, rdb {_onoff(persistence['rdb'])}; "
        f"maxmemory-policy {report['evictionPolicy'] or 'unknown'}",
    ]
    if settings.uses_sentinel or settings.uses_cluster:
        lines.append(str(redis_line(report)))
    lines.extend(f"warning: {w}" for w in report.get("warnings", []))
    return lines


def run(args: argparse.Namespace, settings: Settings) -> int:
    try:
        lines = asyncio.run(_check(settings))
    except QueueError as exc:
        print(f"conveyor check: {exc.message}", file=sys.stderr)
        return 1
    print("conveyor check: ok")
    for line in lines:
        print(f"  {line}")
    return 0
