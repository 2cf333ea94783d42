"""Paths and small parsers shared by the deployment-file tests."""

from __future__ import annotations

import json
import re
import shutil
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from conveyor.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = ROOT / "deploy" / "kubernetes"
COMPOSE_FILE = ROOT / "docker-compose.yml"
WORKER_ENTRYPOINT = ROOT / "docker" / "entrypoint-worker.sh"

WORKER_ROLES = ("worker", "scheduler", "timers")
# Variables a Conveyor container may be given besides the Settings fields.
EXTRA_ENV = {"WORKER_SCRIPT", "OTEL_EXPORTER_OTLP_ENDPOINT"}
"""Besides WORKER_SCRIPT, the OpenTelemetry variables read by ``conveyor.tracing``."""


def settings_env_names() -> set[str]:
    """Every environment variable Conveyor reads (Settings field names, upper-cased)."""
    return {name.upper() for name in Settings.model_fields} | EXTRA_ENV


def tool(name: str) -> str:
    """Path of a console tool installed by a dev dependency (the venv's scripts first).

    Fails (never skips) when it is missing: these checks are part of the suite.
    """
    candidate = Path(sysconfig.get_path("scripts")) / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise AssertionError(
            f"`{name}` is not installed; install the dev dependencies (pip install -e '.[dev]')"
        )
    return found


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return [doc for doc in yaml.safe_load_all(fh) if doc is not None]


def grace_seconds(value: str | int) -> float:
    """Compose durations such as ``45s``, ``1m30s``, ``500ms`` -> seconds."""
    if isinstance(value, int):
        return float(value)
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", value)
    if not parts or "".join(n + u for n, u in parts) != value:
        raise ValueError(f"not a duration: {value!r}")
    return sum(float(n) * units[u] for n, u in parts)


@dataclass(frozen=True)
class Instruction:
    keyword: str
    value: str
    line: int

    def exec_form(self) -> list[str] | None:
        """The JSON array of an exec-form CMD/ENTRYPOINT/HEALTHCHECK CMD, else None."""
        text = self.value
        if self.keyword == "HEALTHCHECK":
            match = re.search(r"\bCMD\s+(.*)$", text)
            if match is None:
                return None
            text = match.group(1)
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            return None
        return [str(item) for item in parsed] if isinstance(parsed, list) else None


def parse_dockerfile(path: Path) -> list[Instruction]:
    """Instructions of a Dockerfile, continuation lines joined, comments dropped."""
    instructions: list[Instruction] = []
    pending = ""
    start = 0
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        full = (pending + line).strip()
        pending = ""
        keyword, _, value = full.partition(" ")
        instructions.append(Instruction(keyword.upper(), value.strip(), start))
    return instructions


def stages(instructions: list[Instruction]) -> list[list[Instruction]]:
    """Split into build stages (each starts with its FROM)."""
    result: list[list[Instruction]] = []
    for ins in instructions:
        if ins.keyword == "FROM":
            result.append([])
        if result:
            result[-1].append(ins)
    return result


def arg_defaults(instructions: list[Instruction]) -> dict[str, str]:
    defaults: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "ARG" and "=" in ins.value:
            name, _, default = ins.value.partition("=")
            defaults[name.strip()] = default.strip()
    return defaults


def env_values(stage: list[Instruction]) -> dict[str, str]:
    """ENV key=value pairs of one stage (values unquoted, no interpolation)."""
    env: dict[str, str] = {}
    for ins in stage:
        if ins.keyword == "ENV":
            for key, value in re.findall(r'(\w+)=("[^"]*"|\S+)', ins.value):
                env[key] = value.strip('"')
    return env
