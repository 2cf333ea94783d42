"""The Redis master is SIGKILLed under load with real Conveyor processes (API, two workers,
scheduler, timers) that know only the sentinels, its last half second of writes never
replicated: consumption resumes within 10 s, nothing accepted is lost, no completed step runs
again. See :mod:`tests.redis_ha._failover`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from conveyor.settings import load_settings
from conveyor.store import migrate
from tests.redis_ha import _failover

pytestmark = pytest.mark.slow


@pytest.mark.timeout(240)
def test_master_killed_under_load(fresh_pg_url: str, redis_prefix: str, tmp_path: Path) -> None:
    asyncio.run(migrate(load_settings({"DATABASE_URL": fresh_pg_url})))
    figures = _failover.run(fresh_pg_url, redis_prefix, logdir=tmp_path)
    report = json.dumps(figures.as_dict())
    assert figures.accepted > 100 and figures.accepted_after_kill > 50, report
    # The replica was frozen before the kill: these triggers' jobs existed only on the master.
    assert figures.accepted_unreplicated > 0 and figures.reconciled > 0, report
    assert figures.refused == 0, report
    assert figures.failover_s is not None, report
    assert figures.resume_s is not None and figures.resume_s < 10.0, report
    assert figures.drained_s is not None, report
    assert figures.lost == 0, report
    assert figures.duplicated_steps == 0, report
    assert figures.cron_ticks > 10, report
