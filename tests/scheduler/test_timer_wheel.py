"""The in-memory firing core: each timer once, never before its instant, retried on failure."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from conveyor.workers.timer_wheel import TimerWheel, sleep_until


@dataclass(frozen=True)
class FakeTimer:
    id: str
    due_at: datetime


def at(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


async def test_sleep_until_is_never_early() -> None:
    for _ in range(20):
        target = time.time() + 0.013
        assert await sleep_until(target)
        assert time.time() >= target


async def test_sleep_until_wakes_on_event() -> None:
    wake = asyncio.Event()
    asyncio.get_running_loop().call_later(0.02, wake.set)
    started = time.monotonic()
    assert not await sleep_until(time.time() + 5, wake)
    assert time.monotonic() - started < 1


async def test_wheel_fires_each_timer_once_at_its_instant() -> None:
    fired: list[tuple[str, float, float]] = []

    async def fire(timer: FakeTimer) -> None:
        fired.append((timer.id, time.time(), timer.due_at.timestamp()))

    wheel: TimerWheel[FakeTimer] = TimerWheel(fire)
    task = asyncio.create_task(wheel.run())
    base = time.time() + 0.1
    timers = [FakeTimer(f"t{i}", at(base + (i * 7919 % 400) / 1000)) for i in range(200)]
    assert wheel.add(timers[:150]) == 150
    await asyncio.sleep(0.05)
    assert wheel.add(timers[100:]) == 50  # ids already held are ignored
    # a timer that arrives late (already due) fires at once
    wheel.add([FakeTimer("late", at(time.time() - 1))])
    await asyncio.sleep(0.6)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert sorted(i for i, _f, _d in fired) == sorted([t.id for t in timers] + ["late"])
    assert all(f >= d for _i, f, d in fired), "a timer fired early"
    late = sorted(f - d for i, f, d in fired if i != "late")
    assert late[len(late) // 2] < 0.05
    assert len(wheel) == 0 and wheel.fired == 201


async def test_wheel_retries_a_failed_enqueue_and_keeps_the_timer() -> None:
    attempts: list[float] = []

    async def fire(timer: FakeTimer) -> None:
        attempts.append(time.time())
        if len(attempts) == 1:
            raise ConnectionError("redis blip")

    wheel: TimerWheel[FakeTimer] = TimerWheel(fire, retry_s=0.05)
    task = asyncio.create_task(wheel.run())
    wheel.add([FakeTimer("a", at(time.time() + 0.01))])
    assert "a" in wheel
    await asyncio.sleep(0.3)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert len(attempts) == 2 and attempts[1] - attempts[0] >= 0.05
    assert wheel.failed == 1 and wheel.fired == 1 and "a" not in wheel
