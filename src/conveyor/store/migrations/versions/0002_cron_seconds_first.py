"""Six-field cron expressions are read seconds first; executions record the tick they fire for.

* ``schedules.cron``: every six-field expression is rewritten from croniter's order (seconds
  last, ``min hour dom mon dow sec``) to the order of BullMQ's cron-parser, Quartz and Spring
  (seconds first, ``sec min hour dom mon dow``), so each schedule keeps firing at the same
  instants (``next_fire_at`` is unchanged). Five-field expressions and aliases are left alone.
  The downgrade moves the seconds field back to the end.
* ``executions.scheduled_for`` (nullable): the tick instant of an execution created by a
  schedule; existing executions keep NULL.

Not expand-only: a process of the previous release reads a rewritten expression in the old
order, so stop the previous release's API and scheduler processes before migrating.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import sqlalchemy as sa
from alembic import op

from conveyor.store._types import UTCDateTime

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_schedules = sa.table("schedules", sa.column("id", sa.String(32)), sa.column("cron", sa.String))


def _seconds_first(fields: list[str]) -> list[str]:
    return [fields[5], *fields[:5]]


def _seconds_last(fields: list[str]) -> list[str]:
    return [*fields[1:], fields[0]]


def _reorder(move: Callable[[list[str]], list[str]]) -> None:
    """Rewrite every six-field ``schedules.cron`` with ``move`` (fields joined by one space)."""
    bind = op.get_bind()
    rows = bind.execute(sa.select(_schedules.c.id, _schedules.c.cron)).all()
    changes = [
        {"sid": row.id, "expr": " ".join(move(fields))}
        for row in rows
        if len(fields := row.cron.split()) == 6
    ]
    if changes:
        bind.execute(
            _schedules.update()
            .where(_schedules.c.id == sa.bindparam("sid"))
            .values(cron=sa.bindparam("expr")),
            changes,
        )


def upgrade() -> None:
    op.add_column("executions", sa.Column("scheduled_for", UTCDateTime(), nullable=True))
    _reorder(_seconds_first)


def downgrade() -> None:
    _reorder(_seconds_last)
    # A plain ALTER TABLE ... DROP COLUMN (SQLite >= 3.35), never a batch copy: with SQLite's
    # foreign keys on, dropping the copied executions table would cascade to its step runs.
    op.drop_column("executions", "scheduled_for")
