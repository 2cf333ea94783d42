"""A Conveyor worker process that takes one job and hangs (the test kills it with SIGKILL).

Run as ``python -m tests.queue.stall_worker`` with the QUEUE_* settings in the environment.
"""

from __future__ import annotations

import asyncio

from conveyor.queue import JobContext, QueueFactory
from conveyor.settings import load_settings
from tests.queue.payload import TEST_QUEUE, Probe


async def main() -> None:
    async with QueueFactory(load_settings()) as qf:

        async def hang(payload: Probe, ctx: JobContext) -> None:
            print(f"active {ctx.id}", flush=True)
            await asyncio.sleep(3600)

        worker = qf.create_worker(TEST_QUEUE, hang, lock_duration_ms=1000, stalled_interval_ms=500)
        await worker.run()


if __name__ == "__main__":
    asyncio.run(main())
