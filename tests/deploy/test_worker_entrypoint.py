"""The worker image's launcher maps WORKER_SCRIPT to `conveyor <role>` and `exec`s it.

Run for real with a fake `conveyor` first on PATH that prints its pid and arguments.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.deploy._files import WORKER_ENTRYPOINT
from tests.helpers import env_for

FAKE_CONVEYOR = """#!/bin/sh
echo "pid=$$"
echo "args=$*"
"""

MAPPING = {
    "worker": "worker",
    "scheduler": "scheduler",
    "timers": "timers",
    "start:worker": "worker",
    "start:scheduler": "scheduler",
    "start:timers": "timers",
}


@pytest.fixture
def fake_bin(tmp_path: Path) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake = bin_dir / "conveyor"
    fake.write_text(FAKE_CONVEYOR, encoding="utf-8")
    fake.chmod(0o755)
    return bin_dir


def _launch(fake_bin: Path, *args: str, worker_script: str | None) -> tuple[int, int, str, str]:
    env = env_for(PATH=f"{fake_bin}{os.pathsep}{os.environ.get('PATH', '')}")
    env.pop("WORKER_SCRIPT", None)
    if worker_script is not None:
        env["WORKER_SCRIPT"] = worker_script
    proc = subprocess.Popen(
        [str(WORKER_ENTRYPOINT), *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
    return proc.returncode, proc.pid, out, err


def test_launcher_is_executable_posix_sh() -> None:
    assert os.access(WORKER_ENTRYPOINT, os.X_OK), "docker/entrypoint-worker.sh must be +x"
    assert WORKER_ENTRYPOINT.read_text(encoding="utf-8").startswith("#!/bin/sh\n")
    subprocess.run(["sh", "-n", str(WORKER_ENTRYPOINT)], check=True, timeout=10)


@pytest.mark.parametrize(("worker_script", "role"), sorted(MAPPING.items()))
def test_each_worker_script_execs_its_conveyor_command(
    fake_bin: Path, worker_script: str, role: str
) -> None:
    code, pid, out, err = _launch(fake_bin, worker_script=worker_script)
    assert code == 0, err
    assert f"args={role}\n" in out
    # `exec`: the fake conveyor runs in the launcher's own process (PID 1 in a container),
    # so SIGTERM from docker/Kubernetes reaches Python and not a shell.
    assert f"pid={pid}\n" in out


def test_unset_worker_script_runs_the_execution_worker(fake_bin: Path) -> None:
    code, _, out, err = _launch(fake_bin, worker_script=None)
    assert code == 0, err
    assert "args=worker\n" in out


def test_extra_arguments_are_passed_through(fake_bin: Path) -> None:
    code, _, out, err = _launch(fake_bin, "--flag", "two words", worker_script="start:timers")
    assert code == 0, err
    assert "args=timers --flag two words\n" in out


@pytest.mark.parametrize(
    "worker_script", ["", "api", "start:api", "migrate", "WORKER", " worker", "worker;id"]
)
def test_unknown_worker_script_exits_2_with_a_clear_message(
    fake_bin: Path, worker_script: str
) -> None:
    code, _, out, err = _launch(fake_bin, worker_script=worker_script)
    assert code == 2
    assert out == "", "conveyor must not be started"
    assert f"WORKER_SCRIPT='{worker_script}'" in err
    assert "worker, scheduler, timers" in err
    assert len(err.strip().splitlines()) == 1
