"""Unit tests of the worker's concurrency book-keeping (no I/O)."""

from __future__ import annotations

import asyncio

from conveyor.dispatch import EffectiveLimits
from conveyor.settings import load_settings
from conveyor.store import TenantLimits
from conveyor.workers.limits import (
    PARK_BASE_MS,
    PARK_MAX_MS,
    ConcurrencyLimits,
    TenantLimitsBook,
    fallback_delay_ms,
)


def test_tenant_cap_and_parking_order() -> None:
    limits = ConcurrencyLimits(concurrency=4, tenant_concurrency=1)
    assert limits.try_start("a", "a1")
    assert not limits.try_start("a", "a2")
    assert limits.try_start("b", "b1")  # another tenant is not held back
    d2 = limits.park("a", "q", "a2")
    limits.park("a", "q", "a3")
    limits.park("a", "q", "a2")  # parked again: keeps its place
    assert PARK_BASE_MS <= d2 <= PARK_MAX_MS
    assert limits.parked_count == 2
    assert limits.active_by_tenant() == {"a": 1, "b": 1}
    # a's slot frees: the oldest parked job is handed out for promotion
    assert limits.finish("a", 0.01) == ("q", "a2")
    assert limits.finish("b", 0.01) is None
    assert limits.active == 0
    # a2 comes back and starts; a3 stays parked until a2 ends
    assert limits.try_start("a", "a2")
    assert limits.take_parked("a") is None
    assert limits.finish("a") == ("q", "a3")
    assert limits.parked_count == 0


def test_started_job_is_forgotten_from_parked() -> None:
    limits = ConcurrencyLimits(concurrency=2, tenant_concurrency=1)
    limits.park("a", "q", "a1")  # its fallback fired and it came back while a had a free slot
    assert limits.try_start("a", "a1")
    assert limits.finish("a") is None


def test_unpark_front_and_drain() -> None:
    limits = ConcurrencyLimits(concurrency=2, tenant_concurrency=1)
    limits.park("a", "q", "a1")
    limits.park("a", "q", "a2")
    assert limits.take_parked("a") == ("q", "a1")
    limits.unpark_front("a", "q", "a1")
    assert limits.drain_parked() == [("q", "a1"), ("q", "a2")]
    assert limits.parked_count == 0


def test_fallback_delay_grows_with_the_parked_backlog_and_is_bounded() -> None:
    limits = ConcurrencyLimits(concurrency=4, tenant_concurrency=2)
    limits.avg_duration_s = 1.0
    first = limits.park("a", "q", "j0")
    delays = [limits.park("a", "q", f"j{i}") for i in range(1, 2000)]
    assert first < delays[10] < delays[100]
    assert max(delays) == PARK_MAX_MS


def test_tenant_cap_never_exceeds_the_process_budget() -> None:
    limits = ConcurrencyLimits(concurrency=2, tenant_concurrency=10)
    assert limits.tenant_concurrency == 2


async def test_global_slots_are_shared_fifo() -> None:
    limits = ConcurrencyLimits(concurrency=1, tenant_concurrency=1)
    order: list[str] = []

    async def job(name: str) -> None:
        await limits.acquire_slot()
        try:
            order.append(name)
            await asyncio.sleep(0.01)
        finally:
            limits.release_slot()

    await asyncio.gather(job("us"), job("eu"), job("us2"))
    assert order == ["us", "eu", "us2"]


def test_cancel_start_frees_the_slot_without_promoting() -> None:
    limits = ConcurrencyLimits(concurrency=4, tenant_concurrency=1)
    assert limits.try_start("a", "a1")
    assert not limits.try_start("a", "a2")
    limits.park("a", "q", "a2")
    limits.cancel_start("a")  # the fleet refused a1: its slot was never used
    assert limits.active == 0 and limits.parked_count == 1  # a2 stays parked (no churn)
    assert limits.try_start("a", "a3")
    limits.cancel_start("a")
    assert limits.active_by_tenant() == {}


def test_fallback_delay_grows_with_the_parked_backlog() -> None:
    assert fallback_delay_ms(0, 0.1, 3) == PARK_BASE_MS
    assert fallback_delay_ms(30, 1.0, 3) == PARK_BASE_MS + 10_000
    assert fallback_delay_ms(10**6, 1.0, 1) == PARK_MAX_MS


async def test_limits_book_applies_overrides_and_keeps_them_on_failure() -> None:
    settings = load_settings({"EXECUTION_WORKER_CONCURRENCY": "4"})
    rows = [TenantLimits("a", concurrency=2, start_rate=0.5)]
    fail = False

    async def load() -> list[TenantLimits]:
        if fail:
            raise OSError("database down")
        return list(rows)

    book = TenantLimitsBook(settings, load, refresh_s=0.01)
    assert book.get("a") == EffectiveLimits(4)  # before the first load: the settings
    await book.refresh()
    assert book.get("a") == EffectiveLimits(2, 0.5, 1) and book.get("b") == EffectiveLimits(4)
    fail = True
    task = asyncio.create_task(book.run())
    await asyncio.sleep(0.05)  # reloads fail: the last limits stay
    task.cancel()
    assert book.get("a") == EffectiveLimits(2, 0.5, 1) and book.overrides == 1
    fail, rows = False, []
    await book.refresh()  # the override was removed
    assert book.get("a") == EffectiveLimits(4)
