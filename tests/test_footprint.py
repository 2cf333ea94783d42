"""What a worker process loads: nothing it never uses (each costs every process memory; the
peak RSS target is in ``docs/benchmarks.md``)."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import env_for

NEVER_IN_A_WORKER = (
    "alembic",  # only `conveyor migrate` runs migrations
    "mako",
    "rich",  # httpx's CLI
    "click",
    "pygments",
    "fastapi",
    "uvicorn",
    "jinja2",
    "prometheus_client",  # only the API renders /metrics
    "cryptography.hazmat.bindings._rust",  # only with SECRETS_KEY set
)


def test_execution_worker_imports_nothing_it_never_uses() -> None:
    code = (
        "import json, sys\n"
        "import conveyor.workers.execution\n"
        f"print(json.dumps(sorted(set(sys.modules) & {set(NEVER_IN_A_WORKER)!r})))\n"
        "import httpx\n"
        "print(json.dumps([httpx.AsyncClient.__name__, callable(httpx.main)]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=env_for(),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    loaded, httpx_ok = (json.loads(line) for line in done.stdout.splitlines())
    assert loaded == []
    assert httpx_ok == ["AsyncClient", True]  # httpx itself is whole (its CLI is a stub)
