"""Telemetry: the five events reach their handlers, metrics arrive at the interval, detach stops both."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from conveyor.errors import PayloadInvalid
from conveyor.queue import (
    TELEMETRY_EVENTS,
    EventHandler,
    JobContext,
    QueueEvent,
    QueueFactory,
    register_queue_telemetry,
)
from tests.helpers import env_for, redis_server
from tests.queue.conftest import TEST_QUEUE, eventually, make_settings, running
from tests.queue.payload import Probe

ROOT = Path(__file__).resolve().parents[2]


def _collector(got: dict[str, list[QueueEvent]], name: str) -> EventHandler:
    return got[name].append


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["global", "worker"])
async def test_five_events_reach_their_handlers(redis_prefix: str, mode: str) -> None:
    """waiting/completed/failed from normal work, stalled from a worker killed with SIGKILL,
    error when Redis goes away. ``global``: from the queue's event stream; ``worker``: from
    the worker and the queue handle of this process."""
    with redis_server() as server:
        env = {"QUEUE_REDIS_PORT": str(server.port), "QUEUE_METRICS_INTERVAL_MS": "200"}
        settings = make_settings(redis_prefix, **env)
        got: dict[str, list[QueueEvent]] = defaultdict(list)
        handlers = {name: _collector(got, name) for name in TELEMETRY_EVENTS}
        metrics: list[dict[str, int]] = []

        async def process(payload: Probe, ctx: JobContext) -> None:
            if payload.n == 2:
                raise PayloadInvalid("n=2 is refused")

        async with QueueFactory(settings) as qf:
            queue = qf.create_queue(TEST_QUEUE)
            worker = qf.create_worker(TEST_QUEUE, process, stalled_interval_ms=300)
            detach = qf.register_queue_telemetry(
                queue,
                qf.create_queue_events(TEST_QUEUE),
                handlers=handlers,
                on_metrics=metrics.append,
                worker=worker if mode == "worker" else None,
            )
            await queue.add(Probe(n=99), job_id="stall-me")
            stall = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.queue.stall_worker",
                env=env_for(QUEUE_PREFIX=redis_prefix, **env),
                cwd=ROOT,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL,
            )
            try:
                assert stall.stdout is not None
                line = await asyncio.wait_for(stall.stdout.readline(), 20)
                assert line == b"active stall-me\n"
                os.kill(stall.pid, signal.SIGKILL)
            finally:
                if stall.returncode is None:
                    stall.kill()
                await asyncio.wait_for(stall.wait(), 10)

            async with running(worker):
                await eventually(
                    lambda: [e.job_id for e in got["stalled"]] == ["stall-me"], within=10
                )
                await queue.add(Probe(n=1), job_id="good")
                await queue.add(Probe(n=2), job_id="bad")
                await eventually(
                    lambda: {e.job_id for e in got["completed"]} == {"stall-me", "good"}
                )
                await eventually(lambda: [e.job_id for e in got["failed"]] == ["bad"])
            assert got["failed"][0].data["failedReason"] == "n=2 is refused"
            assert {"stall-me", "good", "bad"} <= {e.job_id for e in got["waiting"]}
            await eventually(lambda: any(m["completed"] == 2 for m in metrics), within=3)
            assert got["error"] == []

            server.stop()
            await eventually(lambda: len(got["error"]) >= 1, within=5)
            assert all(e.error is not None for e in got["error"])
            detach()
            seen = {name: len(events) for name, events in got.items()}, len(metrics)
            await asyncio.sleep(0.6)
            assert ({name: len(events) for name, events in got.items()}, len(metrics)) == seen


async def test_metrics_interval_detach_and_failing_handlers(
    qf: QueueFactory, caplog: pytest.LogCaptureFixture
) -> None:
    queue = qf.create_queue(TEST_QUEUE)
    events = qf.create_queue_events(TEST_QUEUE)
    calls: list[dict[str, int]] = []
    completed: list[str | None] = []

    def on_metrics(counts: dict[str, int]) -> None:
        calls.append(counts)
        if len(calls) == 1:
            raise RuntimeError("metrics backend down")

    async def on_completed(event: QueueEvent) -> None:  # async handlers are supported
        completed.append(event.job_id)
        raise RuntimeError("handler bug")

    detach = register_queue_telemetry(
        queue, events, handlers={"completed": on_completed}, on_metrics=on_metrics, interval_ms=100
    )

    async def process(payload: Probe, ctx: JobContext) -> None:
        return None

    with caplog.at_level(logging.INFO, logger="conveyor.queue"):
        async with running(qf.create_worker(TEST_QUEUE, process)):
            await queue.add(Probe(n=1), job_id="one")
            await eventually(lambda: completed == ["one"])
            await queue.add(Probe(n=2), job_id="two")
            await eventually(lambda: completed == ["one", "two"])
            await eventually(lambda: len(calls) >= 4, within=3)
    assert calls[-1]["completed"] == 2
    messages = [r.getMessage() for r in caplog.records]
    assert "queue.metrics" in messages
    assert messages.count("queue.handler_failed") == 2
    assert "queue.metrics_handler_failed" in messages
    detach()
    detach()  # idempotent
    assert events._emitter.count() == 0  # type: ignore[attr-defined]
    n_calls = len(calls)
    await queue.add(Probe(n=3), job_id="three")
    await asyncio.sleep(0.35)
    assert len(calls) == n_calls and completed == ["one", "two"]


@pytest.mark.parametrize("mode", ["global", "worker"])
async def test_default_logging_of_events(
    qf: QueueFactory, mode: str, caplog: pytest.LogCaptureFixture
) -> None:
    queue = qf.create_queue(TEST_QUEUE)

    async def process(payload: Probe, ctx: JobContext) -> None:
        if payload.n == 2:
            raise PayloadInvalid("nope")

    worker = qf.create_worker(TEST_QUEUE, process)
    events = qf.create_queue_events(TEST_QUEUE) if mode == "global" else None
    qf.register_queue_telemetry(queue, events, worker=worker if mode == "worker" else None)
    with caplog.at_level(logging.DEBUG, logger="conveyor.queue.telemetry"):
        async with running(worker):
            await queue.add(Probe(n=1), job_id="ok")
            await queue.add(Probe(n=2), job_id="ko")
            await eventually(
                lambda: (
                    {"queue.job_completed", "queue.job_failed"}
                    <= {r.getMessage() for r in caplog.records}
                )
            )
    failed = [r for r in caplog.records if r.getMessage() == "queue.job_failed"]
    assert len(failed) == 1 and failed[0].levelno == logging.WARNING
    assert failed[0].reason == "nope" and failed[0].jobId == "ko"  # type: ignore[attr-defined]
    waiting = {r.jobId for r in caplog.records if r.getMessage() == "queue.job_waiting"}  # type: ignore[attr-defined]
    assert waiting == {"ok", "ko"}
