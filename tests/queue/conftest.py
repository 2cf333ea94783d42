"""Fixtures for the queue tests: settings per test, a factory per driver, running workers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from conveyor.queue import QueueFactory, Worker
from conveyor.settings import Settings, load_settings
from tests.conftest import REDIS_HOST, REDIS_PORT
from tests.queue.payload import TEST_QUEUE  # registers the test payload model


def make_settings(prefix: str, **env: str) -> Settings:
    base = {
        "QUEUE_REDIS_HOST": REDIS_HOST,
        "QUEUE_REDIS_PORT": str(REDIS_PORT),
        "QUEUE_PREFIX": prefix,
        "SHUTDOWN_GRACE_MS": "3000",
        "QUEUE_REDIS_CONNECT_TIMEOUT_MS": "1000",
        "QUEUE_REDIS_SOCKET_TIMEOUT_MS": "2000",
    }
    base.update(env)
    return load_settings(base)


@pytest.fixture(params=["bullmq", "inmemory"])
async def qf(request: pytest.FixtureRequest, redis_prefix: str) -> AsyncIterator[QueueFactory]:
    """A QueueFactory for each driver; the shared behavioural tests run against both."""
    settings = make_settings(redis_prefix, QUEUE_DRIVER=request.param)
    async with QueueFactory(settings) as factory:
        yield factory


@pytest.fixture
async def bull_qf(redis_prefix: str) -> AsyncIterator[QueueFactory]:
    async with QueueFactory(make_settings(redis_prefix)) as factory:
        yield factory


@asynccontextmanager
async def running(worker: Worker, close_timeout: float = 2.0) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``worker`` in a task for the block; close it (bounded) afterwards."""
    task = asyncio.create_task(worker.run())
    try:
        yield task
    finally:
        await worker.close(timeout_s=close_timeout)
        await asyncio.wait_for(task, 10)


async def eventually(
    predicate: Callable[[], Any] | Callable[[], Awaitable[Any]],
    within: float = 5.0,
    interval: float = 0.02,
) -> Any:
    """Poll ``predicate`` (sync or async) until truthy; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(interval)


__all__ = ["TEST_QUEUE", "eventually", "make_settings", "running"]
