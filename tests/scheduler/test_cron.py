"""Cron arithmetic: seconds (first of six fields), time zones, DST gaps and folds, misfire
policy, expressions that never fire."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta

import pytest

from conveyor.cron import (
    fire_times,
    latest_fire,
    next_fire,
    parse_cron,
    plan_ticks,
)
from conveyor.errors import CronInvalid

NY = "America/New_York"


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)  # type: ignore[misc,arg-type]


def take(expr: str, tz: str, after: datetime, n: int) -> list[datetime]:
    spec, out, at = parse_cron(expr, tz), [], after
    for _ in range(n):
        at = next_fire(spec, at)
        out.append(at)
    return out


def test_seconds_field_first_and_exact_to_the_second() -> None:
    got = take("*/15 * * * * *", "UTC", datetime(2025, 1, 1, 0, 0, 7, 500000, tzinfo=UTC), 3)
    assert got == [utc(2025, 1, 1, 0, 0, 15), utc(2025, 1, 1, 0, 0, 30), utc(2025, 1, 1, 0, 0, 45)]
    assert take("@hourly", "UTC", utc(2025, 1, 1, 0, 0, 0), 1) == [utc(2025, 1, 1, 1)]


def test_time_zone_is_applied() -> None:
    assert take("0 9 * * *", "Asia/Kolkata", utc(2025, 1, 1), 1) == [utc(2025, 1, 1, 3, 30)]


def test_spring_forward_missing_wall_time_fires_at_the_transition() -> None:
    # 2024-03-10 02:00 EST -> 03:00 EDT (07:00Z): 02:30 does not exist that day
    assert take("30 2 * * *", NY, utc(2024, 3, 9, 12), 2) == [
        utc(2024, 3, 10, 7),
        utc(2024, 3, 11, 6, 30),
    ]
    # several missing times collapse into one firing at the transition
    got = take("0,30 2,3 * * *", NY, utc(2024, 3, 10, 5), 3)
    assert got == [utc(2024, 3, 10, 7), utc(2024, 3, 10, 7, 30), utc(2024, 3, 11, 6)]


def test_fall_back_fixed_hour_fires_once_interval_fires_by_real_clock() -> None:
    # 2024-11-03 02:00 EDT -> 01:00 EST (06:00Z): 01:30 happens twice
    assert take("30 1 * * *", NY, utc(2024, 11, 2, 12), 2) == [
        utc(2024, 11, 3, 5, 30),
        utc(2024, 11, 4, 6, 30),
    ]
    got = take("*/30 * * * *", NY, utc(2024, 11, 3, 4, 50), 5)
    assert got == [utc(2024, 11, 3, 5), utc(2024, 11, 3, 5, 30), utc(2024, 11, 3, 6),
                   utc(2024, 11, 3, 6, 30), utc(2024, 11, 3, 7)]  # fmt: skip
    # starting inside the second pass: the repeated 01:xx times do not fire again
    assert take("*/30 1 * * *", NY, utc(2024, 11, 3, 6, 10), 1) == [utc(2024, 11, 4, 6)]


def test_intervals_follow_the_real_clock_daily_follows_the_wall_clock() -> None:
    spec = parse_cron("0 */20 * * * *", "Europe/Berlin")
    times = list(fire_times(spec, utc(2024, 3, 30), utc(2024, 4, 1)))
    # a wildcard hour keeps the real-clock interval through the skipped hour
    assert {b - a for a, b in itertools.pairwise(times)} == {timedelta(minutes=20)}
    assert len(times) == 3 * 48
    daily = parse_cron("0 0 9 * * *", "Europe/Berlin")
    assert [t.hour for t in fire_times(daily, utc(2024, 3, 30), utc(2024, 4, 1))] == [8, 7]


def test_latest_fire_is_cheap_after_a_long_outage() -> None:
    spec = parse_cron("* * * * * *")
    assert latest_fire(spec, utc(2024, 1, 1), utc(2025, 1, 1, 0, 0, 0)) == utc(2025, 1, 1)
    yearly = parse_cron("0 0 1 1 *")
    assert latest_fire(yearly, utc(2015, 1, 1), utc(2025, 6, 1)) == utc(2025, 1, 1)
    assert latest_fire(yearly, utc(2025, 1, 1), utc(2025, 6, 1)) is None


def test_plan_catches_up_within_grace_one_by_one() -> None:
    spec = parse_cron("* * * * * *")
    plan = plan_ticks(spec, utc(2025, 1, 1), utc(2025, 1, 1, 0, 0, 3), policy="fire_once",
                      grace=timedelta(seconds=15))  # fmt: skip
    assert plan.fire == [utc(2025, 1, 1, 0, 0, s) for s in (1, 2, 3)]
    assert not plan.misfired and plan.next_at == utc(2025, 1, 1, 0, 0, 4)


@pytest.mark.parametrize(("policy", "fired"), [("fire_once", 1), ("skip", 0)])
def test_plan_misfire_fires_once_or_skips_never_a_burst(policy: str, fired: int) -> None:
    spec = parse_cron("*/5 * * * *")
    now = utc(2025, 1, 1, 3, 2, 10)
    plan = plan_ticks(spec, utc(2025, 1, 1), now, policy=policy, grace=timedelta(seconds=15))  # type: ignore[arg-type]
    assert plan.misfired
    assert plan.fire == [utc(2025, 1, 1, 3, 0)][:fired]
    assert plan.cursor == utc(2025, 1, 1, 3, 0) and plan.next_at == utc(2025, 1, 1, 3, 5)


def test_plan_nothing_due() -> None:
    spec = parse_cron("0 * * * *")
    plan = plan_ticks(spec, utc(2025, 1, 1), utc(2025, 1, 1, 0, 30), policy="fire_once",
                      grace=timedelta(0))  # fmt: skip
    assert plan.fire == [] and plan.next_at == utc(2025, 1, 1, 1)


@pytest.mark.parametrize("expr", ["* * *", "61 * * * *", "nonsense", "* * * * * * * *"])
def test_invalid_expressions(expr: str) -> None:
    with pytest.raises(CronInvalid):
        parse_cron(expr)


def test_invalid_time_zone() -> None:
    with pytest.raises(CronInvalid):
        parse_cron("* * * * *", "Mars/Olympus_Mons")


def test_six_fields_read_seconds_first_as_bullmq_writes_them() -> None:
    # cron-parser / Quartz / Spring: sec min hour day month weekday
    assert take("30 */5 * * * *", "UTC", utc(2025, 1, 1), 3) == [
        utc(2025, 1, 1, 0, 0, 30), utc(2025, 1, 1, 0, 5, 30), utc(2025, 1, 1, 0, 10, 30)]  # fmt: skip
    assert take("0 0 9 * * 1-5", "UTC", utc(2025, 1, 3, 10), 1) == [utc(2025, 1, 6, 9)]
    assert parse_cron("  30  */5 * * * * ").expression == "30 */5 * * * *"


def test_six_field_dst_rules_read_the_hour_in_the_third_field() -> None:
    # 2024-11-03 02:00 EDT -> 01:00 EST (06:00Z): 01:xx happens twice.
    # A fixed hour (third field) fires once, in the first pass ...
    assert take("0 */30 1 * * *", NY, utc(2024, 11, 3, 4, 50), 3) == [
        utc(2024, 11, 3, 5), utc(2024, 11, 3, 5, 30), utc(2024, 11, 4, 6)]  # fmt: skip
    # ... a wildcard hour follows the real clock through both passes.
    assert take("0 0 * * * *", NY, utc(2024, 11, 3, 4, 50), 3) == [
        utc(2024, 11, 3, 5), utc(2024, 11, 3, 6), utc(2024, 11, 3, 7)]  # fmt: skip
    # Spring forward (2024-03-10 02:00 EST -> 03:00 EDT, 07:00Z): 02:30:15 fires at 03:00.
    assert take("15 30 2 * * *", NY, utc(2024, 3, 9, 12), 2) == [
        utc(2024, 3, 10, 7), utc(2024, 3, 11, 6, 30, 15)]  # fmt: skip


def test_seconds_last_expression_is_refused_with_the_reordered_expression() -> None:
    with pytest.raises(CronInvalid) as caught:
        parse_cron("*/5 * * * * 30")  # every 5 minutes at second 30, croniter's old order
    assert str(caught.value) == (
        "cron expression '*/5 * * * * 30' is invalid: six fields are read seconds first "
        "(sec min hour day month weekday); did you mean '30 */5 * * * *'?"
    )
    assert parse_cron("30 */5 * * * *").seconds
    with pytest.raises(CronInvalid) as neither:  # invalid in either order: no suggestion
        parse_cron("61 * * * * 99")
    assert "did you mean" not in str(neither.value)


@pytest.mark.parametrize("expr", ["0 0 30 2 *", "0 0 0 31 4 *", "0 0 31 2,4,6,9,11 *"])
def test_an_expression_that_never_fires_is_invalid(expr: str) -> None:
    with pytest.raises(CronInvalid, match="never fires"):
        parse_cron(expr, NY)


def test_rare_dates_are_valid() -> None:
    assert take("0 0 29 2 *", "UTC", utc(2025, 1, 1), 2) == [utc(2028, 2, 29), utc(2032, 2, 29)]
