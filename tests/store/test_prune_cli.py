"""``conveyor prune [--dry-run]`` through the CLI, on SQLite and PostgreSQL: the dry run prints
per tenant what would go and deletes nothing; the real run deletes it and prints the same counts;
a malformed EXECUTION_RETENTION exits 2 naming the setting."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import pytest

from conveyor.settings import load_settings
from conveyor.store import Store, migrate, utcnow
from tests.helpers import env_for
from tests.store import _retention_seed as seed


async def _seed(url: str) -> tuple[str, str, set[str]]:
    """Tenant ``old-co`` with 3 finished executions 20 days old (2 step runs each) and a running
    one; tenant ``new-co`` with one finished today. Returns both ids and every execution id."""
    settings = load_settings({}, database_url=url)
    await migrate(settings)
    now = utcnow()
    async with Store(settings, pool_size=2) as store:
        old = await seed.tenant(store, "old-co", now - timedelta(days=60))
        new = await seed.tenant(store, "new-co", now - timedelta(days=60))
        at = now - timedelta(days=20)
        for _ in range(3):
            await seed.execution(store, old, "succeeded", created=at, finished=at, timer=True)
        await seed.execution(store, old, "running", created=at)
        await seed.execution(store, new, "failed", created=now, finished=now)
        return old.id, new.id, await seed.ids(store)


async def _ids(url: str) -> set[str]:
    async with Store(load_settings({}, database_url=url), pool_size=1) as store:
        return await seed.ids(store)


def _prune(url: str, prefix: str, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "conveyor.cli", "prune", *args],
        env=env_for(DATABASE_URL=url, QUEUE_PREFIX=prefix, **env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _row(stdout: str, tenant_id: str) -> list[str]:
    return next(line.split() for line in stdout.splitlines() if line.startswith(tenant_id))


@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_prune_dry_run_then_prune(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest, redis_prefix: str
) -> None:
    url = f"sqlite:///{tmp_path}/c.db" if backend == "sqlite" else request.getfixturevalue(
        "fresh_pg_url")  # fmt: skip
    old, new, before = asyncio.run(_seed(url))

    dry = _prune(url, redis_prefix, "--dry-run")
    assert dry.returncode == 0, dry.stderr
    # TENANT NAME RETENTION MAX EXECUTIONS STEP-RUNS TIMERS TICKS
    assert _row(dry.stdout, old) == [old, "old-co", "14d", "-", "3", "6", "3", "0"], dry.stdout
    assert new not in dry.stdout  # nothing of it would go
    assert "dry run: nothing was deleted" in dry.stdout
    assert asyncio.run(_ids(url)) == before

    done = _prune(url, redis_prefix)
    assert done.returncode == 0, done.stderr
    assert _row(done.stdout, old)[4:] == ["3", "6", "3", "0"], done.stdout
    after = asyncio.run(_ids(url))
    assert len(after) == 2 and after < before  # the running one and new-co's

    again = _prune(url, redis_prefix, "--dry-run")
    assert _row(again.stdout, "total")[4:] == ["0", "0", "0", "0"], again.stdout


def test_prune_refuses_a_bad_retention(tmp_path: Path, redis_prefix: str) -> None:
    bad = _prune(f"sqlite:///{tmp_path}/c.db", redis_prefix, EXECUTION_RETENTION="two weeks")
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "conveyor prune: invalid setting EXECUTION_RETENTION=two weeks: 'two weeks' is not a "
        "duration: write a number of seconds or <n>s, <n>m, <n>h, <n>d, <n>w (e.g. 14d, 36h)"
    ]


def test_prune_on_an_unmigrated_database_exits_1(tmp_path: Path, redis_prefix: str) -> None:
    result = _prune(f"sqlite:///{tmp_path}/empty.db", redis_prefix)
    assert result.returncode == 1 and "conveyor migrate" in result.stderr
    assert "Traceback" not in result.stderr
