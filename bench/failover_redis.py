"""Redis failover under load: time for consumption to resume after the master is SIGKILLed, and
whether anything accepted was lost or any completed step ran twice.

A throwaway Sentinel group (one master, one replica, three sentinels — ``redis-server
--sentinel`` from generated config files, on free ports — ``down-after-milliseconds`` 1000,
``failover-timeout`` 3000) and Conveyor's real processes configured only with
``QUEUE_REDIS_SENTINELS``: ``conveyor api``, two ``conveyor worker``, ``conveyor scheduler``,
``conveyor timers``. A workflow ``http`` (local counting server) → ``delay`` 0.5 s (a durable
timer) → ``transform`` is triggered over HTTP at ``--rate`` per second, a per-second cron
schedule runs alongside; after ``--warmup`` seconds the replica is frozen (SIGSTOP) for
``--frozen`` seconds and the master SIGKILLed, so the master's last writes are lost with it; the
load goes on for ``--after`` seconds, then every accepted execution must end. The scenario is
``tests/redis_ha/_failover.py`` (the test asserts on the same figures). Creates and drops its
own Postgres database; every process it starts is stopped by PID.

    .venv/bin/python bench/failover_redis.py [--rounds 1] [--rate 20]

``resume_s``: kill → first ``http`` step of an execution triggered after the kill.
``failover_s``: kill → a majority of sentinels names the new master. ``lost``: accepted
executions (and cron ticks due before the load stopped) not ``succeeded`` at the end.
``duplicated_steps``: ``http`` steps that hit their target twice, plus step records run more
than once. Last line: JSON with ``resume_s`` (worst round), ``lost``, ``duplicated_steps``
(sums), and the other figures of the worst round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import uuid
from pathlib import Path
from typing import Any

import asyncpg

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.redis_ha import _failover  # noqa: E402

from conveyor.settings import load_settings  # noqa: E402
from conveyor.store import migrate  # noqa: E402

ADMIN_DSN = os.environ.get("TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def one_round(rate: float, warmup_s: float, after_s: float, frozen_s: float) -> dict[str, Any]:
    name = f"conveyor_bench_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    url = f"{ADMIN_DSN.rsplit('/', 1)[0]}/{name}"
    try:
        asyncio.run(migrate(load_settings({"DATABASE_URL": url})))
        figures = _failover.run(
            url, f"bench{uuid.uuid4().hex[:8]}", rate=rate, warmup_s=warmup_s,
            after_kill_s=after_s, replica_frozen_s=frozen_s,
        )  # fmt: skip
    finally:
        asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    return figures.as_dict()


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--rate", type=float, default=20.0, help="triggers per second")
    parser.add_argument("--warmup", type=float, default=4.0, help="seconds of load before the kill")
    parser.add_argument("--after", type=float, default=12.0, help="seconds of load after the kill")
    parser.add_argument(
        "--frozen", type=float, default=0.5, help="seconds the replica misses before the kill"
    )
    args = parser.parse_args()
    rounds = []
    for i in range(args.rounds):
        figures = one_round(args.rate, args.warmup, args.after, args.frozen)
        rounds.append(figures)
        print(
            f"round {i + 1}: resume {figures['resume_s']} s (sentinels switched after "
            f"{figures['failover_s']} s), accepted {figures['accepted']} "
            f"({figures['accepted_after_kill']} after the kill, {figures['refused']} refused, "
            f"{figures['accepted_unreplicated']} never replicated), "
            f"cron ticks {figures['cron_ticks']}, re-enqueued by the reconciler "
            f"{figures['reconciled']}, all ended {figures['drained_s']} s after the kill; "
            f"lost {figures['lost']}, duplicated steps {figures['duplicated_steps']}"
        )
    worst = max(rounds, key=lambda r: float("inf") if r["resume_s"] is None else r["resume_s"])
    print(
        json.dumps(
            {
                **worst,
                "lost": sum(r["lost"] for r in rounds),
                "duplicated_steps": sum(r["duplicated_steps"] for r in rounds),
                "rounds": len(rounds),
            }
        )
    )


if __name__ == "__main__":
    main()
