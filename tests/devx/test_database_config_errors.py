"""A process pointed at a database that does not exist, or as a role that does not exist, stops
with exit code 1 and one line naming the problem and the setting — never a traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import PG_ADMIN_DSN, REDIS_HOST, REDIS_PORT
from tests.helpers import env_for, free_port

pytestmark = pytest.mark.slow

BASE = PG_ADMIN_DSN.rsplit("/", 1)[0]  # postgresql://postgres@host:port
HOST = BASE.split("@", 1)[1]
URLS = {
    "no such database": (f"{BASE}/conveyor_no_such_db", 'database "conveyor_no_such_db"'),
    "no such role": (
        f"postgresql://conveyor_no_such_role@{HOST}/test",
        'role "conveyor_no_such_role"',
    ),
}


@pytest.mark.parametrize("command", ["api", "worker", "scheduler", "timers"])
@pytest.mark.parametrize("problem", sorted(URLS))
def test_one_line_and_exit_1(command: str, problem: str, redis_prefix: str) -> None:
    url, named = URLS[problem]
    env = env_for(
        DATABASE_URL=url, QUEUE_REDIS_HOST=REDIS_HOST, QUEUE_REDIS_PORT=str(REDIS_PORT),
        QUEUE_PREFIX=redis_prefix, API_PORT=str(free_port()), LOG_FORMAT="text",
    )  # fmt: skip
    done = subprocess.run(
        [sys.executable, "-m", "conveyor.cli", command],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    output = (done.stdout + done.stderr).strip()
    assert done.returncode == 1, output
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert named in lines[0] and "does not exist" in lines[0], lines[0]
    assert "DATABASE_URL" in lines[0], lines[0]
