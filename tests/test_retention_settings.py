"""The data-lifecycle settings: durations, COUNT,AGE keeps, the events cap, and their errors."""

from __future__ import annotations

import pytest

from conveyor.errors import ConfigError
from conveyor.settings import KeepPolicy, format_duration, load_settings, parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("14d", 14 * 86400), ("36h", 129600), ("90m", 5400), ("45s", 45), ("3600", 3600),
     (" 2W ", 14 * 86400), ("1D", 86400)],
)  # fmt: skip
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "d", "14x", "1.5h", "-1d", "14 days", "1h30m"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration(text)


def test_format_duration() -> None:
    assert [format_duration(s) for s in (1209600, 129600, 5400, 45, 90061)] == [
        "14d", "36h", "90m", "45s", "90061s",
    ]  # fmt: skip


def test_defaults() -> None:
    s = load_settings({})
    assert s.execution_retention == 14 * 86400
    assert s.execution_retention_max_per_tenant is None
    assert (s.retention_interval_ms, s.retention_batch_size, s.retention_pause_ms) == (
        60000, 1000, 100,
    )  # fmt: skip
    assert s.queue_keep_completed == KeepPolicy(1000, 86400)
    assert s.queue_keep_failed == KeepPolicy(10000, 7 * 86400)
    assert s.queue_events_max_len == 10000


def test_values_are_parsed() -> None:
    s = load_settings({"EXECUTION_RETENTION": "36h", "EXECUTION_RETENTION_MAX_PER_TENANT": "500",
                       "QUEUE_KEEP_COMPLETED": "50,1h", "QUEUE_KEEP_FAILED": "0,30m",
                       "QUEUE_EVENTS_MAX_LEN": "2000"})  # fmt: skip
    assert s.execution_retention == 129600 and s.execution_retention_max_per_tenant == 500
    assert s.queue_keep_completed.job_option() == {"age": 3600, "count": 50}
    assert s.queue_keep_failed.job_option() == {"age": 1800, "count": 0}
    assert str(s.queue_keep_completed) == "50,1h" and s.queue_events_max_len == 2000
    assert (
        load_settings({"EXECUTION_RETENTION_MAX_PER_TENANT": ""}).execution_retention_max_per_tenant
        is None
    )


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("EXECUTION_RETENTION", "14x", "is not a duration"),
        ("EXECUTION_RETENTION", "30s", "greater than or equal to 60"),
        ("EXECUTION_RETENTION_MAX_PER_TENANT", "0", "greater than or equal to 1"),
        ("EXECUTION_RETENTION_MAX_PER_TENANT", "lots", "valid integer"),
        ("RETENTION_BATCH_SIZE", "100000", "less than or equal to 5000"),
        ("RETENTION_INTERVAL_MS", "10", "greater than or equal to 1000"),
        ("QUEUE_KEEP_COMPLETED", "1000", "write COUNT,AGE"),
        ("QUEUE_KEEP_COMPLETED", "x,24h", "write COUNT,AGE"),
        ("QUEUE_KEEP_FAILED", "10,forever", "is not a duration"),
        ("QUEUE_KEEP_FAILED", "10,0", "at least 1s"),
        ("QUEUE_EVENTS_MAX_LEN", "10", "greater than or equal to 100"),
    ],
)
def test_bad_values_name_the_setting(name: str, value: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({name: value})
    message = str(info.value)
    assert message.startswith(f"invalid setting {name}={value}: ") and reason in message
    assert "\n" not in message
