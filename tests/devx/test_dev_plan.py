"""Unit tests: how ``conveyor dev`` resolves its children's environment, its data-dir lock."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from conveyor.cli.dev import session as dev
from conveyor.cli.dev.embedded_redis import redis_server_argv, redis_server_binary
from conveyor.errors import ConfigError
from conveyor.settings import client_url, load_settings


def _args(tmp_path: Path, *argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    dev.add_arguments(parser)
    return parser.parse_args(["--data-dir", str(tmp_path / "data"), *argv])


def test_no_configuration_means_embedded_redis_sqlite_and_a_generated_token(tmp_path: Path) -> None:
    environ = {"PATH": "/bin", "QUEUE_REDIS_PASSWORD": "leaked"}
    plan = dev.plan_dev(_args(tmp_path, "--redis-port", "6500"), load_settings(environ), environ)
    assert plan.redis_port == 6500
    assert plan.env["QUEUE_REDIS_HOST"] == "127.0.0.1" and plan.env["QUEUE_REDIS_PORT"] == "6500"
    assert plan.env["QUEUE_REDIS_PASSWORD"] == ""  # the embedded server has none
    assert plan.database_url == f"sqlite:///{tmp_path / 'data' / 'conveyor.db'}"
    assert plan.env["DATABASE_URL"] == plan.database_url
    assert plan.token_generated and len(plan.admin_token) >= 24
    assert plan.env["ADMIN_TOKEN"] == plan.admin_token
    assert plan.env["PATH"] == "/bin"
    assert plan.api_url == "http://127.0.0.1:8000" and plan.env["API_PORT"] == "8000"
    # Children read the same settings back without error.
    children = load_settings(plan.env)
    assert children.queue_redis_password is None and children.queue_redis_port == 6500
    # the embedded database's secrets get a key kept next to it (0600), the same every time
    key_file = tmp_path / "data" / "secrets.key"
    assert len(children.secrets_keys) == 1 and key_file.stat().st_mode & 0o777 == 0o600
    again = dev.plan_dev(_args(tmp_path), load_settings(environ), environ)
    assert again.env["SECRETS_KEY"] == plan.env["SECRETS_KEY"] == key_file.read_text().strip()


def test_configured_services_are_used_as_given(tmp_path: Path) -> None:
    environ = {"QUEUE_REDIS_HOST": "redis.internal", "DATABASE_URL": "postgresql://db/conveyor",
               "ADMIN_TOKEN": "mine", "API_HOST": "0.0.0.0", "API_PORT": "0"}  # fmt: skip
    plan = dev.plan_dev(_args(tmp_path), load_settings(environ), environ)
    assert plan.redis_port is None and "redis.internal:6379" in plan.redis_desc
    assert plan.env["QUEUE_REDIS_HOST"] == "redis.internal"
    assert plan.database_url == plan.env["DATABASE_URL"] == "postgresql://db/conveyor"
    assert not plan.token_generated and plan.admin_token == "mine"
    assert "SECRETS_KEY" not in plan.env  # a configured database: the operator's key, or none
    assert plan.api_port > 0 and plan.env["API_PORT"] == str(plan.api_port)  # 0: a free port
    assert plan.api_url == f"http://127.0.0.1:{plan.api_port}"  # a wildcard bind is reached locally

    port_only = {"QUEUE_REDIS_PORT": "6390"}
    assert dev.plan_dev(_args(tmp_path), load_settings(port_only), port_only).redis_port is None


def test_inmemory_driver_is_refused(tmp_path: Path) -> None:
    environ = {"QUEUE_DRIVER": "inmemory"}
    with pytest.raises(ConfigError, match="unset QUEUE_DRIVER"):
        dev.plan_dev(_args(tmp_path), load_settings(environ), environ)


def test_client_url() -> None:
    assert client_url("::", 80) == "http://127.0.0.1:80"
    assert client_url("::1", 80) == "http://[::1]:80"
    assert client_url("api.local", 8000) == "http://api.local:8000"


def test_one_dev_per_data_directory(tmp_path: Path) -> None:
    with dev.data_dir_lock(tmp_path / "d"):
        assert (tmp_path / "d" / "redis").is_dir()
        with (
            pytest.raises(dev.DevFailed, match="already using"),
            dev.data_dir_lock(tmp_path / "d"),
        ):
            pass
    with dev.data_dir_lock(tmp_path / "d"):  # released on exit
        pass


def test_embedded_redis_settings(tmp_path: Path) -> None:
    binary = redis_server_binary()
    assert binary.name == "redis-server" and binary.is_file()
    argv = redis_server_argv(binary, 6501, tmp_path)
    flags = dict(zip(argv[1::2], argv[2::2], strict=True))
    assert flags["--appendonly"] == "yes" and flags["--appendfsync"] == "everysec"
    assert flags["--maxmemory-policy"] == "noeviction" and flags["--bind"] == "127.0.0.1"
    assert flags["--dir"] == str(tmp_path) and flags["--port"] == "6501"


def test_cluster_nodes_are_ignored(tmp_path: Path) -> None:
    environ = {"QUEUE_REDIS_CLUSTER_NODES": "10.0.0.1:7000,10.0.0.2:7000"}
    plan = dev.plan_dev(_args(tmp_path), load_settings(environ), environ)
    assert plan.redis_port is not None and "QUEUE_REDIS_CLUSTER_NODES ignored" in plan.redis_desc
    children = load_settings(plan.env)
    assert not children.uses_cluster and children.queue_redis_port == plan.redis_port


def test_sentinels_are_ignored(tmp_path: Path) -> None:
    environ = {"QUEUE_REDIS_SENTINELS": "10.0.0.1:26379", "QUEUE_REDIS_SENTINEL_MASTER": "main"}
    plan = dev.plan_dev(_args(tmp_path), load_settings(environ), environ)
    assert plan.redis_port is not None and "QUEUE_REDIS_SENTINELS ignored" in plan.redis_desc
    children = load_settings(plan.env)
    assert not children.uses_sentinel and children.queue_redis_port == plan.redis_port
    configured = {**environ, "QUEUE_REDIS_HOST": "redis.internal"}
    plan = dev.plan_dev(_args(tmp_path), load_settings(configured), configured)
    assert plan.redis_port is None and not load_settings(plan.env).uses_sentinel
