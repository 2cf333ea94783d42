"""The process runtime: signals set the stop event, a dying loop stops the process loudly."""

from __future__ import annotations

import asyncio
import logging
import os
import signal

import pytest

from conveyor.runtime import LoopDied, Supervisor, cancel_tasks


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
