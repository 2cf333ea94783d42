"""Settings: every SPEC §2 variable, defaults, and one-line errors naming the variable."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conveyor.errors import ConfigError
from conveyor.settings import load_settings
from tests.helpers import env_for


def test_defaults_follow_the_seed() -> None:
    s = load_settings({})
    assert (s.queue_redis_host, s.queue_redis_port, s.queue_redis_db) == ("127.0.0.1", 6379, 0)
    assert s.queue_redis_username is None and s.queue_redis_password is None
    assert s.queue_redis_tls is False
    assert s.queue_metrics_interval_ms == 60000
    assert s.driver == "bullmq"
    assert s.execution_worker_concurrency == 2
    assert s.execution_tenant_concurrency == 2
    assert s.database_url == "sqlite:///./.conveyor/conveyor.db"
    assert s.admin_token is None
    assert (s.api_host, s.api_port) == ("127.0.0.1", 8000)
    assert s.execution_regions == ("us",) and s.default_region == "us"
    assert s.shutdown_grace_ms == 30000
    assert (s.log_format, s.log_level) == ("text", "INFO")


def test_tenant_concurrency_defaults_to_worker_concurrency() -> None:
    s = load_settings({"EXECUTION_WORKER_CONCURRENCY": "7"})
    assert s.execution_tenant_concurrency == 7
    s = load_settings({"EXECUTION_WORKER_CONCURRENCY": "7", "EXECUTION_TENANT_CONCURRENCY": "3"})
    assert s.tenant_concurrency == 3
    assert s.tenant_concurrency_per_process == 7  # no per-process cap unless set
    # cluster-wide: may exceed one process's concurrency
    s = load_settings({"EXECUTION_WORKER_CONCURRENCY": "2", "EXECUTION_TENANT_CONCURRENCY": "6"})
    assert s.tenant_concurrency == 6


def test_tenant_limits_settings() -> None:
    s = load_settings({})
    assert s.execution_tenant_concurrency_per_process is None
    assert s.execution_tenant_start_rate is None and s.execution_tenant_start_burst is None
    s = load_settings(
        {
            "EXECUTION_WORKER_CONCURRENCY": "4",
            "EXECUTION_TENANT_CONCURRENCY_PER_PROCESS": "9",
            "EXECUTION_TENANT_START_RATE": "2.5",
            "EXECUTION_TENANT_START_BURST": "",
        }
    )
    assert s.tenant_concurrency_per_process == 4  # never above the worker's concurrency
    assert s.execution_tenant_start_rate == 2.5 and s.execution_tenant_start_burst is None


def test_values_are_parsed() -> None:
    s = load_settings(
        {
            "QUEUE_REDIS_TLS": "true",
            "QUEUE_DRIVER": "inmemory",
            "EXECUTION_REGIONS": "us, eu ,us",
            "LOG_FORMAT": "JSON",
            "ADMIN_TOKEN": "",
            "HTTP_ALLOWLIST": "127.0.0.1/32,internal.example",
        }
    )
    assert s.queue_redis_tls is True
    assert s.driver == "inmemory"
    assert s.execution_regions == ("us", "eu")
    assert s.log_format == "json"
    assert s.admin_token is None
    assert s.http_allowlist == ("127.0.0.1/32", "internal.example")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("QUEUE_REDIS_PORT", "abc"),
        ("QUEUE_REDIS_PORT", "70000"),
        ("QUEUE_REDIS_TLS", "maybe"),
        ("QUEUE_REDIS_DB", "-1"),
        ("QUEUE_METRICS_INTERVAL_MS", "0"),
        ("QUEUE_DRIVER", "kafka"),
        ("EXECUTION_WORKER_CONCURRENCY", "-1"),
        ("EXECUTION_TENANT_CONCURRENCY", "zero"),
        ("EXECUTION_TENANT_CONCURRENCY_PER_PROCESS", "0"),
        ("EXECUTION_TENANT_START_RATE", "0"),
        ("EXECUTION_TENANT_START_BURST", "-1"),
        ("EXECUTION_REGIONS", "US"),
        ("DATABASE_URL", "mysql://localhost/x"),
        ("SHUTDOWN_GRACE_MS", "soon"),
        ("LOG_FORMAT", "xml"),
        ("API_PORT", "-5"),
        ("HTTP_ALLOWLIST", "10.0.0.0/99"),
        ("SCHEDULER_LOOKAHEAD_MAX_MS", "50"),
        ("WORKFLOW_MAX_FANOUT", "0"),
        ("WORKFLOW_MAX_FANOUT", "1000001"),
        ("WORKFLOW_CACHE_SIZE", "0"),
        ("WORKFLOW_CACHE_SIZE", "lots"),
    ],
)
def test_malformed_value_names_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({name: value})
    message = str(info.value)
    assert f"{name}={value}" in message
    assert "\n" not in message


def test_secrets_are_not_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(
            {"ADMIN_TOKEN": "s3cret", "QUEUE_REDIS_PASSWORD": "hunter2", "QUEUE_REDIS_DB": "x"}
        )
    assert "hunter2" not in str(info.value) and "s3cret" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("QUEUE_REDIS_PORT", "abc"),
        ("QUEUE_REDIS_TLS", "maybe"),
        ("EXECUTION_WORKER_CONCURRENCY", "-1"),
        ("WORKFLOW_CACHE_SIZE", "0"),
    ],
)
def test_cli_exits_2_with_one_line(name: str, value: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "conveyor.cli", "check"],
        env=env_for(**{name: value}),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"{name}={value}" in lines[0]


def test_every_setting_is_documented_in_the_readme() -> None:
    import re
    from pathlib import Path

    from conveyor.settings import Settings

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", readme))
    missing = [name.upper() for name in Settings.model_fields if name.upper() not in documented]
    assert missing == [], f"README configuration table lacks {missing}"


def test_allowlist_entries_may_name_a_port() -> None:
    s = load_settings(
        {"HTTP_ALLOWLIST": "127.0.0.1:45663, [::1]:8080,10.0.0.0/8:5432,*.Internal:443"}
    )
    assert s.http_allowlist == (
        "127.0.0.1:45663",
        "[::1]:8080",
        "10.0.0.0/8:5432",
        "*.internal:443",
    )


@pytest.mark.parametrize(
    ("value", "entry"),
    [
        ("localhost,127.0.0.1:99999", "127.0.0.1:99999"),
        ("127.0.0.1:redis", "127.0.0.1:redis"),
        ("[::1", "[::1"),
        ("::1,127.1", "127.1"),
        ("http://hooks.internal/", "http://hooks.internal/"),
    ],
)
def test_malformed_allowlist_entry_is_named(value: str, entry: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"HTTP_ALLOWLIST": value})
    message = str(info.value)
    assert message.startswith(f"invalid setting HTTP_ALLOWLIST={value}: entry {entry!r}: ")
    assert "\n" not in message


def test_cli_exits_2_on_a_malformed_allowlist_entry() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "conveyor.cli", "check"],
        env=env_for(HTTP_ALLOWLIST="localhost,127.0.0.1:99999"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "HTTP_ALLOWLIST=" in lines[0] and "entry '127.0.0.1:99999'" in lines[0]


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"SCHEDULER_LOOKAHEAD_MS": "400", "SCHEDULER_POLL_INTERVAL_MS": "500"},
         "SCHEDULER_LOOKAHEAD_MS must be at least SCHEDULER_POLL_INTERVAL_MS"),
        ({"SCHEDULER_LOOKAHEAD_MS": "20000", "SCHEDULER_LOOKAHEAD_MAX_MS": "15000"},
         "SCHEDULER_LOOKAHEAD_MAX_MS must be at least SCHEDULER_LOOKAHEAD_MS"),
    ],
)  # fmt: skip
def test_scheduler_windows_must_nest(values: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(values)
    assert named in str(info.value)
    assert "\n" not in str(info.value)


def test_sentinel_settings_are_parsed() -> None:
    s = load_settings(
        {
            "QUEUE_REDIS_SENTINELS": " 10.0.0.1:26379, sentinel-b.internal:26380,[::1]:26381 ",
            "QUEUE_REDIS_SENTINEL_MASTER": " conveyor ",
            "QUEUE_REDIS_SENTINEL_USERNAME": "watcher",
            "QUEUE_REDIS_SENTINEL_PASSWORD": "pw",
            "QUEUE_REDIS_SENTINEL_TLS": "true",
        }
    )
    assert s.queue_redis_sentinels == (
        ("10.0.0.1", 26379),
        ("sentinel-b.internal", 26380),
        ("::1", 26381),
    )
    assert s.queue_redis_sentinel_master == "conveyor" and s.uses_sentinel
    assert s.queue_redis_sentinel_username == "watcher"
    assert s.queue_redis_sentinel_password is not None
    assert s.queue_redis_sentinel_password.get_secret_value() == "pw"
    assert s.queue_redis_sentinel_tls is True
    plain = load_settings({"QUEUE_REDIS_SENTINELS": "", "QUEUE_REDIS_SENTINEL_MASTER": ""})
    assert plain.queue_redis_sentinels == () and not plain.uses_sentinel
    assert plain.queue_redis_sentinel_master is None


@pytest.mark.parametrize(
    ("env", "name", "reason"),
    [
        ({"QUEUE_REDIS_SENTINELS": "10.0.0.1"}, "QUEUE_REDIS_SENTINELS", "write host:port"),
        ({"QUEUE_REDIS_SENTINELS": "a:1,b:x"}, "QUEUE_REDIS_SENTINELS", "port 'x'"),
        ({"QUEUE_REDIS_SENTINELS": "a:0"}, "QUEUE_REDIS_SENTINELS", "port '0'"),
        ({"QUEUE_REDIS_SENTINELS": "::1:26379"}, "QUEUE_REDIS_SENTINELS", "[address]:port"),
        ({"QUEUE_REDIS_SENTINELS": "redis://a:1"}, "QUEUE_REDIS_SENTINELS", "write host:port"),
        ({"QUEUE_REDIS_SENTINELS": "a:1"}, "QUEUE_REDIS_SENTINEL_MASTER", "must name the master"),
        ({"QUEUE_REDIS_SENTINEL_MASTER": "m"}, "QUEUE_REDIS_SENTINEL_MASTER", "is empty"),
        ({"QUEUE_REDIS_SENTINELS": "a:1", "QUEUE_REDIS_SENTINEL_MASTER": "my master"},
         "QUEUE_REDIS_SENTINEL_MASTER", "without spaces"),
    ],
)  # fmt: skip
def test_malformed_sentinel_settings_are_named(env: dict[str, str], name: str, reason: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    message = str(info.value)
    assert message.startswith(f"invalid setting {name}=") and reason in message, message
    assert "\n" not in message


def test_sentinel_password_is_not_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({"QUEUE_REDIS_SENTINEL_PASSWORD": "hunter2", "QUEUE_REDIS_SENTINELS": "x"})
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("env", "name"),
    [
        ({"QUEUE_REDIS_SENTINELS": "10.0.0.1:26379,10.0.0.2"}, "QUEUE_REDIS_SENTINELS"),
        ({"QUEUE_REDIS_SENTINELS": "10.0.0.1:26379"}, "QUEUE_REDIS_SENTINEL_MASTER"),
    ],
)
def test_cli_exits_2_on_malformed_sentinel_settings(env: dict[str, str], name: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "conveyor.cli", "check"],
        env=env_for(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{name}=" in lines[0], proc.stderr
