"""``conveyor prune [--dry-run]``: one retention pass now, as the leading scheduler runs them.

Deletes every finished execution past its tenant's retention (``EXECUTION_RETENTION``,
``EXECUTION_RETENTION_MAX_PER_TENANT`` or the tenant's overrides) with its step runs, timers and
schedule tick, in batches of ``RETENTION_BATCH_SIZE`` with ``RETENTION_PAUSE_MS`` between them
(:mod:`conveyor.workers.retention`), then prints per tenant what went. Safe next to a running
scheduler (batches skip rows another pass holds). ``--dry-run`` deletes nothing and prints per
tenant what would go. Exit 0; 1 when the database is unreachable or its schema out of date.
Rows deleted are also counted in ``/metrics`` when Redis answers (best effort).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import TextIO

from conveyor.cli.tables import table
from conveyor.errors import ConveyorError, StoreError
from conveyor.queue import QueueFactory
from conveyor.queue.connection import QUEUE_ERRORS
from conveyor.runtime import MetricsPublisher, run_loop
from conveyor.settings import Settings, format_duration
from conveyor.store import Pruned, RetentionPolicy, Store
from conveyor.workers.retention import Retention

log = logging.getLogger(__name__)

HEADERS = ["TENANT", "NAME", "RETENTION", "MAX", "EXECUTIONS", "STEP RUNS", "TIMERS", "TICKS"]
_METRICS_FLUSH_S = 3.0
_FLUSH_ERRORS: tuple[type[BaseException], ...] = (*QUEUE_ERRORS, ConveyorError)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dry-run", action="store_true", help="delete nothing; print per tenant what would go"
    )


def run(args: argparse.Namespace, settings: Settings, *, out: TextIO | None = None) -> int:
    return run_loop(_run(bool(args.dry_run), settings, out or sys.stdout))


def _row(policy: RetentionPolicy, pruned: Pruned) -> list[object]:
    mark = " *" if policy.overridden else ""
    return [
        policy.tenant_id,
        policy.tenant_name,
        format_duration(policy.retention_s) + mark,
        policy.max_executions,
        pruned.executions,
        pruned.step_runs,
        pruned.timers,
        pruned.schedule_ticks,
    ]


def render(rows: list[list[object]], total: Pruned, *, dry_run: bool) -> str:
    footer = ["total", "", "", "", total.executions, total.step_runs, total.timers,
              total.schedule_ticks]  # fmt: skip
    lines = table(HEADERS, [*rows, footer], right=range(4, 8))
    if any(str(r[2]).endswith("*") for r in rows):
        lines.append("* the tenant overrides the settings")
    lines.append(
        "dry run: nothing was deleted" if dry_run else "deleted (schedule ticks include idle ones)"
    )
    return "\n".join(lines) + "\n"


async def _run(dry_run: bool, settings: Settings, out: TextIO) -> int:
    try:
        async with Store(settings, pool_size=2, fast_path=False) as store:
            await store.check_schema()
            if dry_run:
                retention = Retention(store, settings)
                plans = await retention.plan()
                rows = [_row(p.policy, p.pruned) for p in plans if p.pruned.total]
                total = Pruned()
                for p in plans:
                    total.add(p.pruned)
                out.write(render(rows, total, dry_run=True))
                days = await retention.plan_days()
                if days:  # PostgreSQL: these days would go whole
                    listed = ", ".join(d.isoformat() for d in days)
                    out.write(f"partitions that would be dropped (days): {listed}\n")
                return 0
            async with QueueFactory(settings) as queues:
                metrics = MetricsPublisher(queues)
                retention = Retention(store, settings, metrics=metrics)
                report = await retention.run_pass()
                await _flush(metrics)
            policies = {p.tenant_id: p for p in await retention.policies()}
    except (StoreError, ConveyorError) as exc:
        print(f"conveyor prune: {exc.message}", file=sys.stderr)
        return 1
    rows = [_row(policies[t], pruned) for t, pruned in report.tenants.items() if t in policies]
    out.write(render(rows, report.pruned, dry_run=False))
    if report.partitions_dropped:  # PostgreSQL: whole days went at once
        dropped = ", ".join(d.isoformat() for d in report.partitions_dropped)
        out.write(f"partitions dropped (days): {dropped}\n")
    return 0


async def _flush(metrics: MetricsPublisher) -> None:
    """Count the rows in ``/metrics`` if Redis answers soon; pruning never waits on it."""
    try:
        async with asyncio.timeout(_METRICS_FLUSH_S):
            await metrics.flush()
    except _FLUSH_ERRORS as exc:
        log.warning("prune.metrics_not_published", extra={"error": repr(exc)})
