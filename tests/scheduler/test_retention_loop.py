"""The leading scheduler runs retention passes on their own loop (SQLite + Redis lock, and
PostgreSQL + advisory lock: there a due day's partitions go whole); a standby that does not
lead prunes nothing."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import pytest

from conveyor.queue import QueueFactory
from conveyor.runtime import Supervisor
from conveyor.store import Store, utcnow
from conveyor.store.partitions import partition_name
from conveyor.workers.retention import Retention
from conveyor.workers.scheduler import Scheduler
from tests.scheduler._support import async_wait_until, base_env, migrate, settings_for
from tests.store import _retention_seed as seed

pytestmark = pytest.mark.slow


@pytest.fixture(params=["sqlite", "postgres"])
def env(
    request: pytest.FixtureRequest, settings_env: dict[str, str], tmp_path: Path
) -> dict[str, str]:
    url = (
        f"sqlite:///{tmp_path / 'c.db'}"
        if request.param == "sqlite"
        else request.getfixturevalue("fresh_pg_url")
    )
    environment = base_env(settings_env, url, RETENTION_INTERVAL_MS="1000")
    asyncio.run(migrate(environment))
    return environment


async def test_the_leading_scheduler_prunes(env: dict[str, str]) -> None:
    settings = settings_for(env)
    now = utcnow()
    async with Store(settings, pool_size=4) as store, QueueFactory(settings) as queues:
        owner = await seed.tenant(store, "t", now - timedelta(days=60))
        old = now - timedelta(days=20)
        await store.partitions.ensure(old, 1)  # PostgreSQL: the days of these two
        gone = await seed.execution(store, owner, "succeeded", created=old, finished=old,
                                    id_at=old)  # fmt: skip
        kept = await seed.execution(store, owner, "waiting", created=old, timer=True,
                                    id_at=old + timedelta(days=1))  # fmt: skip

        supervisor = Supervisor("scheduler")
        scheduler = Scheduler(settings, store, queues, supervisor)
        serving = asyncio.create_task(scheduler.serve())
        try:
            await async_wait_until(lambda: _gone(store, gone), 15)
            assert await seed.ids(store) == {kept}
            if store.is_postgres:  # its day went whole; the waiting one's day stays
                names = {p.name for p in await store.partitions.list()}
                assert partition_name("executions", old.date()) not in names
                assert partition_name("executions", (old + timedelta(days=1)).date()) in names
            late = now - timedelta(days=15)  # finished while the scheduler runs: next pass
            later = await seed.execution(store, owner, "failed", created=late, finished=late)
            await async_wait_until(lambda: _gone(store, later), 15)
        finally:
            supervisor.stop("test")
            assert await asyncio.wait_for(serving, 30) == 0
        assert await seed.ids(store) == {kept}


async def _gone(store: Store, execution_id: str) -> bool:
    return execution_id not in await seed.ids(store)


class _Standby:
    is_leader = False

    async def wait_change(self, seconds: float) -> None:
        await asyncio.sleep(min(seconds, 0.05))


async def test_a_standby_prunes_nothing(env: dict[str, str]) -> None:
    settings = settings_for(env)
    now = utcnow()
    async with Store(settings, pool_size=2) as store:
        owner = await seed.tenant(store, "t", now - timedelta(days=60))
        old = now - timedelta(days=20)
        eid = await seed.execution(store, owner, "succeeded", created=old, finished=old)
        stop = asyncio.Event()
        retention = Retention(store, settings)
        loop = asyncio.create_task(retention.loop(_Standby(), stop))  # type: ignore[arg-type]
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.wait_for(loop, 5)  # the loop ends when told
        assert retention.last is None and await seed.ids(store) == {eid}
