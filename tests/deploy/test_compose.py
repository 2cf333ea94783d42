"""docker-compose.yml: compose-spec valid, the seed's Redis verbatim, and the start-up graph.

No Docker engine here: the file is validated against the compose-spec JSON schema shipped by
check-jsonschema, then its invariants are checked on the parsed YAML. Variable interpolation
is emulated (``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?message}``) so the
resolved environment of every Conveyor service can be fed to the real settings loader.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Mapping
from typing import Any

import pytest
import yaml

from conveyor.settings import load_settings
from tests.deploy._files import (
    COMPOSE_FILE,
    ROOT,
    WORKER_ROLES,
    grace_seconds,
    settings_env_names,
    tool,
)

# The seed's "Local development with Docker Compose" service, verbatim.
SEED_REDIS: dict[str, Any] = {
    "image": "redis:7-alpine",
    "ports": ["6379:6379"],
    "command": [
        "redis-server",
        "--save",
        "60",
        "1",
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
    ],
    "healthcheck": {
        "test": ["CMD", "redis-cli", "ping"],
        "interval": "5s",
        "timeout": "3s",
        "retries": 10,
    },
}
SEED_DOC = ROOT.parent / "shared" / "seed" / "queue-and-workers.md"
CONVEYOR_SERVICES = ("migrate", "api", *WORKER_ROLES)
LONG_RUNNING = ("api", *WORKER_ROLES)


class InterpolationError(Exception):
    pass


_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose-style interpolation of every string in ``value``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, op, arg = match.group(1), match.group(2), match.group(3)
        current = env.get(name)
        missing = current is None or (current == "" and op is not None and op.startswith(":"))
        if op in (":-", "-"):
            return arg if missing else str(current)
        if op in (":?", "?"):
            if missing:
                raise InterpolationError(f"{name}: {arg}")
            return str(current)
        return current or ""

    return _VAR.sub(replace, value)


@pytest.fixture(scope="module")
def raw() -> dict[str, Any]:
    with COMPOSE_FILE.open(encoding="utf-8") as fh:
        data: dict[str, Any] = yaml.safe_load(fh)
    return data


@pytest.fixture(scope="module")
def services(raw: dict[str, Any]) -> dict[str, Any]:
    resolved = interpolate(raw, {"ADMIN_TOKEN": "t" * 32})
    result: dict[str, Any] = resolved["services"]
    return result


def test_compose_file_matches_the_compose_spec_schema() -> None:
    result = subprocess.run(
        [tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE_FILE)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_redis_is_exactly_the_seeds(raw: dict[str, Any]) -> None:
    assert raw["services"]["redis"] == SEED_REDIS


def test_seed_document_still_gives_this_redis() -> None:
    # The literal above is the seed's block; if the seed document is at hand (it is in the
    # workspace and in CI, beside the repository), make sure they have not drifted apart.
    if not SEED_DOC.exists():
        pytest.skip(f"seed document not found at {SEED_DOC}")
    text = SEED_DOC.read_text(encoding="utf-8")
    block = re.search(r"```yaml\n(services:\n.*?)```", text, re.DOTALL)
    assert block is not None
    assert yaml.safe_load(block.group(1))["services"]["redis"] == SEED_REDIS


def test_admin_token_is_required(raw: dict[str, Any]) -> None:
    token = raw["services"]["api"]["environment"]["ADMIN_TOKEN"]
    assert token.startswith("${ADMIN_TOKEN:?"), "ADMIN_TOKEN must be a required variable"
    with pytest.raises(InterpolationError, match="ADMIN_TOKEN"):
        interpolate(raw, {})
    with pytest.raises(InterpolationError, match="ADMIN_TOKEN"):
        interpolate(raw, {"ADMIN_TOKEN": ""})


def test_postgres_has_a_healthcheck_and_a_volume(
    raw: dict[str, Any], services: dict[str, Any]
) -> None:
    pg = services["postgres"]
    assert pg["image"] == "postgres:16-alpine"
    assert pg["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    volume = pg["volumes"][0].split(":")
    assert volume[1] == "/var/lib/postgresql/data"
    assert volume[0] in raw["volumes"]


def _condition(service: dict[str, Any], dependency: str) -> str:
    value: str = service["depends_on"][dependency]["condition"]
    return value


def test_migrate_is_a_one_shot_that_waits_for_postgres(services: dict[str, Any]) -> None:
    migrate = services["migrate"]
    assert migrate["command"] == ["migrate"]
    assert migrate.get("restart", "no") == "no"
    assert _condition(migrate, "postgres") == "service_healthy"
    assert migrate["image"] == services["api"]["image"], "the API image runs the CLI"


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_processes_start_after_healthy_services_and_migration(
    services: dict[str, Any], name: str
) -> None:
    service = services[name]
    assert _condition(service, "redis") == "service_healthy"
    assert _condition(service, "postgres") == "service_healthy"
    assert _condition(service, "migrate") == "service_completed_successfully"
    assert service["restart"] in {"unless-stopped", "always", "on-failure"}


@pytest.mark.parametrize("name", LONG_RUNNING)
def test_stop_grace_period_exceeds_shutdown_grace(services: dict[str, Any], name: str) -> None:
    service = services[name]
    grace_ms = int(service["environment"]["SHUTDOWN_GRACE_MS"])
    assert grace_seconds(service["stop_grace_period"]) > grace_ms / 1000


def test_one_worker_image_for_the_three_worker_processes(services: dict[str, Any]) -> None:
    workers = [services[role] for role in WORKER_ROLES]
    assert len({w["image"] for w in workers}) == 1
    # Identical build sections under one image name: Compose builds the image once.
    assert all(w["build"] == workers[0]["build"] for w in workers)
    assert workers[0]["build"]["dockerfile"] == "Dockerfile.worker"
    for role, service in zip(WORKER_ROLES, workers, strict=True):
        assert service["environment"]["WORKER_SCRIPT"] == role
        assert "command" not in service and "entrypoint" not in service
        assert "ports" not in service


def test_api_listens_on_all_interfaces_and_has_a_healthcheck(services: dict[str, Any]) -> None:
    api = services["api"]
    assert api["build"]["dockerfile"] == "Dockerfile.api"
    assert api["environment"]["API_HOST"] == "0.0.0.0"
    port = api["environment"]["API_PORT"]
    assert f"{port}:{port}" in api["ports"]
    check = " ".join(api["healthcheck"]["test"])
    assert f"127.0.0.1:{port}/api/health'" in check


def test_builds_point_at_existing_dockerfiles(services: dict[str, Any]) -> None:
    for name, service in services.items():
        if "build" in service:
            build = service["build"]
            assert (ROOT / build["context"] / build["dockerfile"]).is_file(), name


@pytest.mark.parametrize("name", CONVEYOR_SERVICES)
def test_environment_is_valid_for_the_settings_loader(services: dict[str, Any], name: str) -> None:
    env = {k: str(v) for k, v in services[name]["environment"].items()}
    unknown = set(env) - settings_env_names()
    assert not unknown, f"{name}: variables Conveyor does not read: {sorted(unknown)}"
    settings = load_settings(env)
    assert settings.queue_redis_host == "redis"
    assert settings.is_postgres and "@postgres:5432/" in settings.database_url
    assert settings.driver == "bullmq"


def test_bull_board_profile_shows_conveyors_queues(
    raw: dict[str, Any], services: dict[str, Any]
) -> None:
    """``docker compose --profile bullboard up`` adds Bull Board on the same Redis, prefix and
    regions as the Conveyor processes, published on the host's loopback only (no sign-in)."""
    board = services["bullboard"]
    assert board["profiles"] == ["bullboard"], "only with --profile bullboard"
    conveyor = services["worker"]["environment"]
    env = board["environment"]
    for name in ("QUEUE_REDIS_HOST", "QUEUE_REDIS_PORT", "QUEUE_REDIS_DB", "QUEUE_PREFIX",
                 "EXECUTION_REGIONS"):  # fmt: skip
        assert env[name] == conveyor[name], name
    assert raw["services"]["bullboard"]["environment"]["QUEUE_PREFIX"] == "${QUEUE_PREFIX:-bull}"
    assert board["ports"] == [f"127.0.0.1:{env['BULLBOARD_PORT']}:{env['BULLBOARD_PORT']}"]
    assert board["depends_on"]["redis"]["condition"] == "service_healthy"
    context = ROOT / board["build"]["context"]
    assert (context / "server.mjs").is_file() and (context / "package-lock.json").is_file()
    for service, spec in services.items():
        if service != "bullboard" and service not in OBSERVABILITY:
            assert "profiles" not in spec, f"{service} must run without a profile"


OBSERVABILITY = ("prometheus", "grafana", "otel-collector")
OBS_DIR = ROOT / "deploy" / "observability"


def _mounts(service: dict[str, Any]) -> dict[str, str]:
    """Bind mounts of a service: container path -> host path (relative to the compose file)."""
    out: dict[str, str] = {}
    for volume in service.get("volumes", []):
        host, container, *_ = volume.split(":")
        if host.startswith("./"):
            out[container] = host
    return out


@pytest.mark.parametrize("name", OBSERVABILITY)
def test_observability_services_are_optional_and_on_loopback(
    services: dict[str, Any], name: str
) -> None:
    """``--profile observability`` only; every published port on 127.0.0.1; every mounted file
    exists in the repository."""
    service = services[name]
    assert service["profiles"] == ["observability"]
    assert service["ports"], name
    for port in service["ports"]:
        assert str(port).startswith("127.0.0.1:"), f"{name}: {port} must bind to loopback"
    for container, host in _mounts(service).items():
        assert (ROOT / host).exists(), f"{name}: {host} (mounted at {container}) is missing"


def test_prometheus_scrapes_the_api_with_the_alert_rules(services: dict[str, Any]) -> None:
    prom = services["prometheus"]
    mounts = _mounts(prom)
    config_path = mounts["/etc/prometheus/prometheus.yml"]
    assert mounts["/etc/prometheus/alerts.yml"] == "./deploy/observability/prometheus/alerts.yml"
    config = yaml.safe_load((ROOT / config_path).read_text(encoding="utf-8"))
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    [job] = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    port = services["api"]["environment"]["API_PORT"]
    assert job["static_configs"][0]["targets"] == [f"api:{port}"]


def test_grafana_gets_the_dashboard_and_the_datasource(services: dict[str, Any]) -> None:
    mounts = _mounts(services["grafana"])
    assert mounts["/etc/grafana/provisioning"] == "./deploy/observability/grafana/provisioning"
    dashboards_dir = "/var/lib/grafana/dashboards"
    assert mounts[f"{dashboards_dir}/conveyor.json"] == (
        "./deploy/observability/grafana/conveyor.json"
    )
    provisioning = OBS_DIR / "grafana" / "provisioning"
    providers = yaml.safe_load((provisioning / "dashboards" / "conveyor.yml").read_text("utf-8"))
    assert providers["providers"][0]["options"]["path"] == dashboards_dir
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text("utf-8"))
    [source] = sources["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    assert "prometheus" in services


def test_otel_collector_receives_otlp_on_4318_and_logs_spans(services: dict[str, Any]) -> None:
    collector = services["otel-collector"]
    assert collector["image"].startswith("otel/opentelemetry-collector:")
    assert "127.0.0.1:4318:4318" in collector["ports"]
    config_path = _mounts(collector)["/etc/otelcol/config.yaml"]
    config = yaml.safe_load((ROOT / config_path).read_text(encoding="utf-8"))
    assert config["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    traces = config["service"]["pipelines"]["traces"]
    assert traces["receivers"] == ["otlp"]
    assert traces["exporters"] == ["debug"]


def test_traces_reach_the_bundled_collector_when_asked(raw: dict[str, Any]) -> None:
    """Conveyor's services pass OTEL_EXPORTER_OTLP_ENDPOINT through (empty: traces off), and the
    observability profile's collector listens where the compose file says to point it."""
    env = raw["x-conveyor-env"]
    assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "${OTEL_EXPORTER_OTLP_ENDPOINT:-}"
    assert "otel-collector" in raw["services"]
    assert "http://otel-collector:4318" in COMPOSE_FILE.read_text(encoding="utf-8")
