"""The bullmq worker wrapper: loud loop death, lock loss, Redis restarts, client configuration."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest

from conveyor.errors import QueueError, QueueUnavailable
from conveyor.queue import JobContext, QueueFactory
from conveyor.queue.bullmq import compat
from conveyor.queue.connection import BLOCKING_MAX_S, make_client
from tests.conftest import REDIS_HOST, REDIS_PORT
from tests.helpers import free_port, redis_server
from tests.queue.conftest import TEST_QUEUE, eventually, make_settings, running
from tests.queue.payload import Probe


@pytest.mark.parametrize(
    ("target", "message"),
    [("extract_result", "crashed: RuntimeError"), ("run", "stopped on its own")],
)
async def test_run_raises_when_bullmqs_loop_dies(
    bull_qf: QueueFactory, monkeypatch: pytest.MonkeyPatch, target: str, message: str
) -> None:
    """The consuming loop raising, or returning without being asked to, ends ``run()`` with
    an error (bullmq's own loop printed a traceback and returned quietly)."""
    queue = bull_qf.create_queue(TEST_QUEUE)
    await queue.add(Probe(n=1))

    def broken(*args: Any) -> Any:
        raise RuntimeError("boom inside the loop")

    async def returns(self: Any) -> None:
        return None

    if target == "run":
        monkeypatch.setattr(compat.FetchingWorker, "run", returns)
    else:
        monkeypatch.setattr(compat, target, broken)

    async def process(payload: Probe, ctx: JobContext) -> None:
        return None

    worker = bull_qf.create_worker(TEST_QUEUE, process)
    with pytest.raises(QueueError, match=message):
        await asyncio.wait_for(worker.run(), 5)
    await worker.close(timeout_s=1)


async def test_run_raises_when_redis_is_unreachable(redis_prefix: str) -> None:
    settings = make_settings(redis_prefix, QUEUE_REDIS_PORT=str(free_port()))
    async with QueueFactory(settings) as qf:

        async def process(payload: Probe, ctx: JobContext) -> None:
            return None

        with pytest.raises(QueueUnavailable, match="unreachable"):
            await asyncio.wait_for(qf.create_worker(TEST_QUEUE, process).run(), 5)


async def test_lock_lost_is_signalled(bull_qf: QueueFactory, redis_client: Any) -> None:
    contexts: list[JobContext] = []
    outcome: list[bool] = []

    async def process(payload: Probe, ctx: JobContext) -> None:
        contexts.append(ctx)
        try:
            await asyncio.wait_for(ctx.lock_lost.wait(), 5)
            outcome.append(True)
        except TimeoutError:
            outcome.append(False)

    queue = bull_qf.create_queue(TEST_QUEUE)
    await queue.add(Probe(n=1), job_id="locked")
    async with running(bull_qf.create_worker(TEST_QUEUE, process, lock_duration_ms=800)):
        await eventually(lambda: contexts)
        lock_key = f"{bull_qf.settings.queue_prefix}:{TEST_QUEUE}:locked:lock"
        assert await redis_client.exists(lock_key) == 1
        await redis_client.delete(lock_key)  # as if it had expired and another worker took it
        await eventually(lambda: outcome, within=6)
    assert outcome == [True]


@pytest.mark.slow
async def test_consumption_resumes_quickly_after_a_redis_restart(redis_prefix: str) -> None:
    with redis_server() as server:
        settings = make_settings(redis_prefix, QUEUE_REDIS_PORT=str(server.port))
        async with QueueFactory(settings) as qf:
            seen: list[int] = []

            async def process(payload: Probe, ctx: JobContext) -> None:
                seen.append(payload.n)

            queue = qf.create_queue(TEST_QUEUE)
            async with running(qf.create_worker(TEST_QUEUE, process)) as task:
                await queue.add(Probe(n=1))
                await eventually(lambda: seen == [1])
                server.stop()
                await asyncio.sleep(1.5)
                server.start()
                await queue.add(Probe(n=2))
                begin = time.monotonic()
                await eventually(lambda: seen == [1, 2], within=8)
                assert time.monotonic() - begin < 4  # runRetryDelay is 1 s, not bullmq's 15 s
                assert not task.done()


async def test_worker_gets_a_dedicated_blocking_client(bull_qf: QueueFactory) -> None:
    async def process(payload: Probe, ctx: JobContext) -> None:
        return None

    worker = bull_qf.create_worker(TEST_QUEUE, process)
    bull = worker.bullmq_worker  # type: ignore[attr-defined]
    main, blocking = bull.backend.connection.conn, bull.backend.blocking_connection.conn
    assert main is not blocking and bull.bclient is blocking
    assert bull.opts["runRetryDelay"] == 1000 and bull.opts["autorun"] is False
    main_kwargs = main.connection_pool.connection_kwargs
    blocking_kwargs = blocking.connection_pool.connection_kwargs
    assert main_kwargs["socket_timeout"] == 2.0
    assert blocking_kwargs["socket_timeout"] > BLOCKING_MAX_S
    await worker.close(timeout_s=1)


def test_client_configuration() -> None:
    settings = make_settings(
        "cfg",
        QUEUE_REDIS_USERNAME="u",
        QUEUE_REDIS_PASSWORD="p",
        QUEUE_REDIS_DB="3",
    )
    client = make_client(settings, "command")
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == (REDIS_HOST, REDIS_PORT, 3)
    assert (kwargs["username"], kwargs["password"]) == ("u", "p")
    assert kwargs["socket_connect_timeout"] == 1.0 and kwargs["socket_timeout"] == 2.0
    assert kwargs["socket_keepalive"] is True and kwargs["decode_responses"] is True
    assert kwargs["health_check_interval"] > 0
    if hasattr(socket, "TCP_KEEPIDLE"):
        assert kwargs["socket_keepalive_options"][socket.TCP_KEEPIDLE] <= 10
    assert kwargs["retry"].get_retries() == 2
    assert (
        make_client(settings, "probe").connection_pool.connection_kwargs["retry"].get_retries() == 0
    )
