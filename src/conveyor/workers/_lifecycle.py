"""Process plumbing shared by ``conveyor scheduler`` and ``conveyor timers``."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Coroutine
from typing import Any

from redis.exceptions import RedisError

from conveyor.heartbeat import Heartbeat

log = logging.getLogger(__name__)


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """Run ``main`` on uvloop when available (as every Conveyor process does)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop ships with uvicorn[standard]
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


async def heartbeat_loop(heartbeat: Heartbeat, stop: asyncio.Event) -> None:
    """Beat every interval until ``stop`` is set (or cancelled); a failed beat is retried."""
    while not stop.is_set():
        try:
            await heartbeat.beat()
        except (RedisError, OSError) as exc:
            log.warning("heartbeat.failed", extra={"role": heartbeat.role, "error": repr(exc)})
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=heartbeat.interval_s)
