"""Cron arithmetic: next fire times in a time zone, DST-correct and exact to the second.

Expressions are written as the BullMQ ecosystem writes them (cron-parser, Quartz, Spring): 5
fields (``min hour dom mon dow``) or 6 with **seconds first** (``sec min hour dom mon dow``), or
an alias (``@hourly``, ``@daily``, ...); field syntax is croniter's, which does the arithmetic
(it reads seconds last, so :func:`parse_cron` moves the seconds field for it). A six-field
expression that is only valid with seconds last is refused with the reordered expression as a
hint, and one that matches no date (``0 0 30 2 *``) is refused as never firing. Fields are
matched against the wall clock of the schedule's IANA time zone (``zoneinfo``); fire times are
returned as aware UTC datetimes.

Daylight-saving rules (those of Vixie cron):

* A wall time that does not exist (spring forward, e.g. 02:30 on the day clocks jump from
  02:00 to 03:00) fires at the transition instant (03:00 local); several such times collapse
  into that one firing.
* A wall time that happens twice (fall back) fires once, at its first occurrence, unless the
  hour field is a wildcard (``*``, ``*/n``): interval-like schedules keep firing on the real
  clock through the repeated hour.

Misfires (:func:`plan_ticks`): ticks at most ``grace`` late (a failover) are all fired; when
the oldest pending tick is older than that (no scheduler ran), policy ``fire_once`` fires only
the latest missed tick and ``skip`` fires none; either way the schedule then continues on time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterBadDateError, croniter

from conveyor.errors import CronInvalid

MisfirePolicy = Literal["fire_once", "skip"]
MISFIRE_POLICIES: tuple[MisfirePolicy, ...] = ("fire_once", "skip")

_ALIASES = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}
_SECOND = timedelta(seconds=1)
_PROBE = datetime(2001, 1, 1)  # naive wall time: where parse_cron looks for a first match
_DAY = timedelta(days=1)
_MAX_STEPS = 100_000
_LOOKBACK = (
    timedelta(seconds=2),
    timedelta(minutes=2),
    timedelta(hours=2),
    timedelta(days=2),
    timedelta(days=40),
    timedelta(days=400),
    timedelta(days=3000),
)


@dataclass(frozen=True)
class CronSpec:
    """A parsed schedule: the expression and its time zone."""

    expression: str
    """As written (whitespace normalised, alias expanded): six fields are seconds first."""
    timezone: str
    tz: ZoneInfo = field(repr=False, compare=False)
    hour_wildcard: bool
    seconds: bool
    croniter_expression: str = field(repr=False, compare=False)
    """The same expression in croniter's order (six fields: seconds last)."""


def _seconds_last(fields: Sequence[str]) -> list[str]:
    """Six fields written seconds first, in croniter's order (seconds last)."""
    return [*fields[1:], fields[0]]


def _seconds_first(fields: Sequence[str]) -> list[str]:
    """Six fields written seconds last (croniter), in Conveyor's order (seconds first)."""
    return [fields[-1], *fields[:-1]]


def _croniter_valid(expression: str) -> bool:
    try:
        return bool(croniter.is_valid(expression))
    except Exception:  # croniter raises assorted errors on odd input
        return False


def _invalid(expression: str, fields: list[str]) -> CronInvalid:
    """The error for an expression croniter refuses; names the seconds-first order when the
    expression is valid with seconds last (as croniter, and Conveyor before, read it)."""
    if len(fields) == 6 and _croniter_valid(" ".join(fields)):
        hint = " ".join(_seconds_first(fields))
        return CronInvalid(
            f"cron expression {expression!r} is invalid: six fields are read seconds first "
            f"(sec min hour day month weekday); did you mean {hint!r}?"
        )
    return CronInvalid(f"cron expression {expression!r} is invalid")


def parse_cron(expression: str, timezone: str = "UTC") -> CronSpec:
    """Validate ``expression`` in ``timezone``; raises :class:`CronInvalid` when it is malformed,
    the time zone is unknown, or it never fires (no date matches it, e.g. ``0 0 30 2 *``)."""
    expr = " ".join(expression.split())
    expr = _ALIASES.get(expr.lower(), expr)
    fields = expr.split(" ")
    if len(fields) not in (5, 6):
        raise CronInvalid(f"cron expression {expression!r} must have 5 or 6 fields")
    seconds = len(fields) == 6
    native = " ".join(_seconds_last(fields)) if seconds else expr
    if not _croniter_valid(native):
        raise _invalid(expression, fields)
    try:
        tz = ZoneInfo(timezone or "UTC")
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise CronInvalid(f"unknown time zone {timezone!r}") from exc
    spec = CronSpec(
        expression=expr,
        timezone=timezone or "UTC",
        tz=tz,
        hour_wildcard=fields[2 if seconds else 1].startswith("*"),
        seconds=seconds,
        croniter_expression=native,
    )
    # Whether a day matches does not depend on the zone, and every expression that matches
    # some day matches one within croniter's search window (50 years; the calendar repeats
    # after 28, Feb 29 returns within 8): so one probe tells "never fires".
    _cron_after(spec, _PROBE)
    return spec


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def _floor(value: datetime) -> datetime:
    return value.replace(microsecond=0)


def _offset(spec: CronSpec, at: datetime) -> timedelta:
    off = at.astimezone(spec.tz).utcoffset()
    return off if off is not None else timedelta(0)


def _naive(at: datetime, off: timedelta) -> datetime:
    return (at + off).replace(tzinfo=None)


def _transition(spec: CronSpec, start: datetime, end: datetime) -> datetime | None:
    """The first instant in ``(start, end]`` whose UTC offset differs from ``start``'s."""
    base = _offset(spec, start)
    lo = start
    while lo < end:
        hi = min(lo + _DAY, end)
        if _offset(spec, hi) != base:
            # binary search to the second: offset(lo) == base, offset(hi) != base
            while hi - lo > _SECOND:
                mid = _floor(lo + (hi - lo) / 2)
                if mid <= lo:
                    mid = lo + _SECOND
                if _offset(spec, mid) == base:
                    lo = mid
                else:
                    hi = mid
            return hi
        lo = hi
    return None


def _repeat_end(spec: CronSpec, at: datetime) -> datetime | None:
    """If ``at`` is in the second pass of a repeated wall hour, the naive wall end of it."""
    if at.astimezone(spec.tz).fold != 1:
        return None
    tr = _transition(spec, at - _DAY, at)
    if tr is None:
        return None
    return _naive(tr, _offset(spec, tr - _SECOND))


def _cron_after(spec: CronSpec, wall: datetime) -> datetime:
    """The first wall time matching ``spec`` after the naive wall time ``wall``."""
    try:
        value: datetime = croniter(spec.croniter_expression, wall, ret_type=datetime).get_next(
            datetime
        )
    except CroniterBadDateError:
        raise CronInvalid(
            f"cron expression {spec.expression!r} never fires: no date matches its day, "
            "month and weekday fields"
        ) from None
    return value


def next_fire(spec: CronSpec, after: datetime) -> datetime:
    """The first fire time strictly after ``after`` (aware UTC, whole seconds)."""
    seg = _floor(_utc(after))
    off = _offset(spec, seg)
    wall = _naive(seg, off)
    repeat_until = None if spec.hour_wildcard else _repeat_end(spec, seg)
    for _ in range(_MAX_STEPS):
        cand = _cron_after(spec, wall)
        fire = (cand - off).replace(tzinfo=UTC)
        tr = _transition(spec, seg, fire)
        if tr is None:
            if repeat_until is not None and cand < repeat_until:
                wall = cand  # second pass of a repeated wall time: it already fired
                continue
            return fire
        new_off = _offset(spec, tr)
        if new_off > off and cand < _naive(tr, new_off):
            return tr  # the wall time does not exist: fire at the transition
        repeat_until = None
        if new_off < off and not spec.hour_wildcard:
            repeat_until = _naive(tr, off)
        seg, off = tr, new_off
        wall = _naive(tr, new_off) - _SECOND
    raise CronInvalid(f"cron expression {spec.expression!r} never fires")


def fire_times(spec: CronSpec, after: datetime, until: datetime) -> Iterator[datetime]:
    """Every fire time in ``(after, until]``, in order."""
    at = after
    while True:
        at = next_fire(spec, at)
        if at > until:
            return
        yield at


def latest_fire(spec: CronSpec, after: datetime, until: datetime) -> datetime | None:
    """The last fire time in ``(after, until]``, or None; cheap even after long outages."""
    after, until = _utc(after), _utc(until)
    for window in _LOOKBACK:
        start = max(after, until - window)
        found: datetime | None = None
        for at in fire_times(spec, start, until):
            found = at
        if found is not None or start == after:
            return found
    found = None
    for at in fire_times(spec, after, until):
        found = at
    return found


@dataclass(frozen=True)
class TickPlan:
    """What to fire now for one schedule."""

    fire: list[datetime]
    """Tick instants to fire, oldest first (empty when nothing is due or skipped)."""
    cursor: datetime
    """The instant after which the next tick is searched (the last tick fired or skipped)."""
    next_at: datetime
    """The next tick after ``cursor``."""
    misfired: bool = False
    """True when ticks older than the grace were collapsed (``fire_once``) or skipped."""


def plan_ticks(
    spec: CronSpec,
    cursor: datetime,
    now: datetime,
    *,
    policy: MisfirePolicy,
    grace: timedelta,
    max_catch_up: int = 1000,
) -> TickPlan:
    """Which ticks in ``(cursor, now]`` fire now, under the misfire ``policy``."""
    cursor, now = _utc(cursor), _utc(now)
    first = next_fire(spec, cursor)
    if first > now:
        return TickPlan(fire=[], cursor=cursor, next_at=first)
    if now - first <= grace:
        due = [first]
        for at in fire_times(spec, first, now):
            if len(due) >= max_catch_up:
                break
            due.append(at)
        return TickPlan(fire=due, cursor=due[-1], next_at=next_fire(spec, due[-1]))
    latest = latest_fire(spec, cursor, now) or first
    fire = [latest] if policy == "fire_once" else []
    return TickPlan(fire=fire, cursor=latest, next_at=next_fire(spec, latest), misfired=True)
