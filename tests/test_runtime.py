"""The process runtime: signals set the stop event, a dying loop stops the process loudly."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time

import pytest

from conveyor.runtime import LoopDied, Supervisor, bounded, cancel_tasks


async def test_sigterm_sets_stop_event(caplog: pytest.LogCaptureFixture) -> None:
    supervisor = Supervisor("test")
    supervisor.install_signal_handlers()
    try:
        with caplog.at_level(logging.INFO, logger="conveyor.runtime"):
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(supervisor.wait(), timeout=5)
            os.kill(os.getpid(), signal.SIGINT)  # a second signal while draining is harmless
            await asyncio.sleep(0.05)
    finally:
        supervisor.remove_signal_handlers()
    assert supervisor.stopping
    assert supervisor.failure is None
    assert any(r.getMessage() == "process.stopping" for r in caplog.records)


async def test_a_loop_that_raises_stops_the_process() -> None:
    supervisor = Supervisor("test")

    async def broken() -> None:
        await asyncio.sleep(0.01)
        raise RuntimeError("boom")

    supervisor.spawn("broken", broken())
    await asyncio.wait_for(supervisor.wait(), timeout=5)
    assert isinstance(supervisor.failure, RuntimeError)
    await supervisor.cancel_all()


async def test_a_loop_that_returns_stops_the_process() -> None:
    supervisor = Supervisor("test")

    async def quits() -> None:
        return None

    supervisor.spawn("quits", quits())
    await asyncio.wait_for(supervisor.wait(), timeout=5)
    assert isinstance(supervisor.failure, LoopDied)


async def test_loops_ending_during_shutdown_are_not_failures() -> None:
    supervisor = Supervisor("test")

    async def forever() -> None:
        await asyncio.Event().wait()

    supervisor.spawn("forever", forever())
    supervisor.stop()
    await supervisor.cancel_all(grace_s=1)
    assert supervisor.failure is None


async def test_cancel_tasks_is_bounded() -> None:
    release = asyncio.Event()

    async def stubborn() -> None:
        while not release.is_set():
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                continue

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await cancel_tasks([task], grace_s=0.2)
    assert loop.time() - started < 1.0
    assert not task.done()
    release.set()
    task.cancel()
    await asyncio.wait_for(task, timeout=2)


async def test_bounded_does_not_wait_for_a_stuck_clean_up(caplog: pytest.LogCaptureFixture) -> None:
    """A shutdown step whose cancellation hangs (a driver's clean-up) cannot hold the process."""
    release = asyncio.Event()

    async def stuck() -> int:
        try:
            await asyncio.sleep(60)
        finally:
            await release.wait()  # the clean-up blocks, like a rollback behind a busy connection
        return 1

    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="conveyor.runtime"):
        assert await bounded("stuck step", stuck(), 0.2) is None
    assert time.monotonic() - started < 1.0
    assert any(r.getMessage() == "process.step_timed_out" for r in caplog.records)
    release.set()
    await asyncio.sleep(0)

    async def fails() -> int:
        raise OSError("gone")

    assert await bounded("failing step", fails(), 1.0) is None
    assert await bounded("quick step", asyncio.sleep(0, result=7), 1.0) == 7


async def test_finish_lets_loops_end_between_transactions() -> None:
    """``finish`` waits for loops that watch the stop event; ``pause`` wakes on stop."""
    supervisor = Supervisor("test")
    ended_cleanly: list[str] = []

    async def loop() -> None:
        while not supervisor.stopping:
            await supervisor.pause(30)
        ended_cleanly.append("loop")

    supervisor.spawn("loop", loop())
    await asyncio.sleep(0.05)
    supervisor.stop()
    started = time.monotonic()
    await supervisor.finish(["loop"], 5.0)
    assert ended_cleanly == ["loop"]
    assert time.monotonic() - started < 1.0
    await supervisor.cancel_all(1.0)


def test_the_startup_heap_is_frozen_and_the_young_generation_collected_less_often() -> None:
    import gc

    from conveyor.runtime.process import GC_YOUNG_THRESHOLD, freeze_startup_heap

    before = gc.get_threshold()
    try:
        # CPython's default: a test run before this one in the same process may have started
        # a Conveyor process's entry point, which set the threshold already.
        gc.set_threshold(700, before[1], before[2])
        freeze_startup_heap()
        assert gc.get_freeze_count() > 0, "start-up objects out of the collector's reach"
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, before[1], before[2])
        assert GC_YOUNG_THRESHOLD > 700
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
