"""Dockerfile.api / Dockerfile.worker: hadolint clean, and the properties the images promise."""

from __future__ import annotations

import http.server
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy._files import (
    ROOT,
    WORKER_ENTRYPOINT,
    Instruction,
    arg_defaults,
    env_values,
    parse_dockerfile,
    stages,
    tool,
)
from tests.helpers import env_for, free_port

DOCKERFILES = ("Dockerfile.api", "Dockerfile.worker")
BULLBOARD_DOCKERFILE = "deploy/bullboard/Dockerfile"
PINNED_PYTHON = re.compile(r"^python:3\.11\.\d+-slim(-bookworm|-trixie)?$")


def _instructions(name: str) -> list[Instruction]:
    return parse_dockerfile(ROOT / name)


def _one(stage: list[Instruction], keyword: str) -> Instruction:
    found = [ins for ins in stage if ins.keyword == keyword]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def test_hadolint_passes_on_every_dockerfile() -> None:
    config = ROOT / ".hadolint.yaml"
    result = subprocess.run(
        [
            tool("hadolint"),
            "--no-color",
            "--config",
            str(config),
            *DOCKERFILES,
            BULLBOARD_DOCKERFILE,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"hadolint findings:\n{result.stdout}{result.stderr}"


def test_hadolint_config_ignores_nothing_silently() -> None:
    # Any ignored rule must be listed with a comment saying why (see .hadolint.yaml).
    text = (ROOT / ".hadolint.yaml").read_text(encoding="utf-8")
    assert "failure-threshold: style" in text
    for line in text.splitlines():
        if re.match(r"^\s*-\s*DL\d+", line):
            assert "#" in line, f"hadolint rule ignored without a reason: {line.strip()}"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_multi_stage_pinned_slim_base_and_venv_copy(name: str) -> None:
    instructions = _instructions(name)
    parts = stages(instructions)
    assert len(parts) >= 2, "builder + runtime stages expected"
    base = arg_defaults(instructions).get("PYTHON_IMAGE", "")
    assert PINNED_PYTHON.match(base), f"base image must be a pinned python:3.11.x slim: {base!r}"
    for stage in parts:
        assert stage[0].value.split()[0] in {"${PYTHON_IMAGE}", base}
    runtime = parts[-1]
    copies = [ins.value for ins in runtime if ins.keyword == "COPY"]
    assert any(v.startswith("--from=builder /opt/venv") for v in copies)
    installs = [
        ins.value for ins in instructions if ins.keyword == "RUN" and "pip install" in ins.value
    ]
    assert installs and all("--no-cache-dir" in v for v in installs)
    assert not any(ins.keyword == "RUN" and "pip install" in ins.value for ins in runtime)


@pytest.mark.parametrize("name", DOCKERFILES)
def test_runtime_runs_as_non_root_numeric_user(name: str) -> None:
    runtime = stages(_instructions(name))[-1]
    user = _one(runtime, "USER").value
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER must be a numeric non-root uid: {user}"
    # The Kubernetes pods declare the same uid (runAsNonRoot needs it numeric).
    assert uid == "10001"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_exec_form_entrypoint_and_unbuffered_python(name: str) -> None:
    runtime = stages(_instructions(name))[-1]
    entry = _one(runtime, "ENTRYPOINT").exec_form()
    assert entry, "ENTRYPOINT must be exec form (JSON) so SIGTERM reaches the process"
    for ins in runtime:
        if ins.keyword == "CMD":
            assert ins.exec_form() is not None, "CMD must be exec form"
    env = env_values(runtime)
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert env.get("PIP_NO_CACHE_DIR") == "1"
    assert "/opt/venv/bin" in env.get("PATH", "")
    assert _one(runtime, "HEALTHCHECK").exec_form(), "HEALTHCHECK CMD must be exec form"


def test_api_image_listens_on_all_interfaces_and_runs_the_cli() -> None:
    runtime = stages(_instructions("Dockerfile.api"))[-1]
    env = env_values(runtime)
    assert env["API_HOST"] == "0.0.0.0"
    assert env["API_PORT"] == "8000"
    assert _one(runtime, "EXPOSE").value == "8000"
    assert _one(runtime, "ENTRYPOINT").exec_form() == ["conveyor"]
    assert _one(runtime, "CMD").exec_form() == ["api"]


def test_worker_image_takes_worker_script_as_arg_and_env() -> None:
    runtime = stages(_instructions("Dockerfile.worker"))[-1]
    assert arg_defaults(runtime).get("WORKER_SCRIPT") == "worker"
    assert env_values(runtime).get("WORKER_SCRIPT") == "${WORKER_SCRIPT}"
    entry = _one(runtime, "ENTRYPOINT").exec_form()
    assert entry == ["/usr/local/bin/conveyor-worker-entrypoint"]
    copy = next(ins.value for ins in runtime if entry[0] in ins.value and ins.keyword == "COPY")
    assert "--chmod=0755" in copy
    assert (ROOT / copy.split()[-2]).resolve() == WORKER_ENTRYPOINT
    # No CMD: ENTRYPOINT clears the base image's `python3` CMD, nothing is appended.
    assert not [ins for ins in runtime if ins.keyword == "CMD"]
    assert not [ins for ins in runtime if ins.keyword == "EXPOSE"]
    check = _one(runtime, "HEALTHCHECK").exec_form()
    assert check is not None and "conveyor check" in " ".join(check)
    assert "exit 1" in " ".join(check), "HEALTHCHECK exit 2 is reserved; map failures to 1"


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copied_sources_exist_and_are_not_dockerignored(name: str) -> None:
    ignored = _dockerignore()
    for ins in _instructions(name):
        if ins.keyword != "COPY" or "--from=" in ins.value:
            continue
        sources = [s for s in ins.value.split()[:-1] if not s.startswith("--")]
        for source in sources:
            assert (ROOT / source).exists(), f"{name}: COPY source {source} missing"
            top = Path(source).parts[0]
            assert top not in ignored and source not in ignored, f".dockerignore drops {source}"


def _dockerignore() -> set[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return {ln.strip() for ln in lines if ln.strip() and not ln.startswith("#")}


def test_dockerignore_keeps_local_state_out_of_the_context() -> None:
    ignored = _dockerignore()
    required = {
        ".git",
        ".venv",
        ".conveyor",
        "node_modules",
        "**/node_modules",
        "**/__pycache__",
        ".pytest_cache",
        ".mypy_cache",
        ".ruff_cache",
        ".env",
    }
    assert required <= ignored, f"missing from .dockerignore: {sorted(required - ignored)}"


# --- the API HEALTHCHECK command really works (no curl in slim: python + urllib) ----------


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        code = self.status if self.path == "/api/health" else 404
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[int, type[_Health]]]:
    handler = type("Handler", (_Health,), {"status": 200})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _api_healthcheck(port: int) -> int:
    runtime = stages(_instructions("Dockerfile.api"))[-1]
    command = _one(runtime, "HEALTHCHECK").exec_form()
    assert command is not None and command[0] == "python"
    result = subprocess.run(
        [sys.executable, *command[1:]],
        env=env_for(API_PORT=str(port)),
        capture_output=True,
        timeout=30,
    )
    return result.returncode


def test_api_healthcheck_command_hits_api_health(
    health_server: tuple[int, type[_Health]],
) -> None:
    port, handler = health_server
    assert _api_healthcheck(port) == 0
    handler.status = 500
    assert _api_healthcheck(port) == 1
    assert _api_healthcheck(free_port()) == 1  # nothing listening
