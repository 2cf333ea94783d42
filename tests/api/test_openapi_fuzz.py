"""Property test over ``/openapi.json`` (schemathesis): generated requests to every operation
of a real ``conveyor api`` process never get a 500, and every response matches the documented
status codes, content types and schemas. Bounded: a few examples per operation."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.configuration import set_hypothesis_home_dir
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Err
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.api.conftest import ADMIN, ADMIN_TOKEN, NOOP_WORKFLOW
from tests.conftest import REDIS_HOST, REDIS_PORT
from tests.helpers import env_for, free_port, wait_for

pytestmark = pytest.mark.slow

# Hypothesis caches (unicode tables, constants) go to a temp dir, not ./.hypothesis in the repo.
set_hypothesis_home_dir(str(Path(tempfile.gettempdir()) / "conveyor-hypothesis"))

EXAMPLES_PER_OPERATION = 10


@dataclass
class LiveApi:
    url: str
    tenant_headers: dict[str, str]


@pytest.fixture(scope="module")
def live_api(migrated_pg: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveApi]:
    prefix = f"cvt{uuid.uuid4().hex[:10]}"
    port = free_port()
    env = env_for(QUEUE_REDIS_HOST=REDIS_HOST, QUEUE_REDIS_PORT=str(REDIS_PORT),
                  QUEUE_PREFIX=prefix, DATABASE_URL=migrated_pg, ADMIN_TOKEN=ADMIN_TOKEN,
                  API_PORT=str(port), LOG_LEVEL="ERROR", API_MAX_BODY_BYTES="65536",
                  SECRETS_KEY=base64.b64encode(os.urandom(32)).decode())  # fmt: skip
    log = tmp_path_factory.mktemp("fuzz") / "api.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "conveyor.cli", "api"], env=env,
                                stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _ready(url, proc, log), timeout=40, interval=0.2)
        with httpx.Client(base_url=url, timeout=10) as client:
            tenant = client.post("/api/admin/tenants", json={"name": "fuzz"}, headers=ADMIN)
            key = client.post(f"/api/admin/tenants/{tenant.json()['data']['id']}/api-keys",
                              headers=ADMIN).json()["data"]["key"]  # fmt: skip
            auth = {"Authorization": f"Bearer {key}"}
            assert client.post("/api/workflows", json=NOOP_WORKFLOW, headers=auth).is_success
        yield LiveApi(url, auth)
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        _delete_prefix(prefix)
        asyncio.run(_delete_secrets(migrated_pg))
    out_text = Path(log).read_text()
    assert "Traceback" not in out_text, out_text[-3000:]


def _ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> bool:
    assert proc.poll() is None, log.read_text()[-3000:]
    try:
        return httpx.get(f"{url}/api/health/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


async def _delete_secrets(url: str) -> None:
    """The secrets the fuzzing stored, encrypted with this API's key: left in the shared
    database, they would stop later APIs and workers (started without that key)."""
    import asyncpg  # type: ignore[import-untyped]

    from conveyor.store import asyncpg_dsn

    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await conn.execute("DELETE FROM secrets")
    finally:
        await conn.close()


def _delete_prefix(prefix: str) -> None:
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
    finally:
        client.close()


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


def _exercise(operation: Any, mode: GenerationMode, live: LiveApi) -> None:
    headers = ADMIN if operation.path.startswith("/api/admin") else live.tenant_headers

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        derandomize=True,
        database=None,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    def check(case: Any) -> None:
        case.call_and_validate(base_url=live.url, headers=headers, checks=CHECKS)

    check()


def test_no_500s_and_responses_match_the_schema(live_api: LiveApi) -> None:
    schema = schemathesis.openapi.from_url(f"{live_api.url}/openapi.json")
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            failures.append(f"invalid operation in the schema: {result.err()}")
            continue
        operation = result.ok()
        operations += 1
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            try:
                _exercise(operation, mode, live_api)
            except (KeyboardInterrupt, SystemExit):
                raise
            except Unsatisfiable:
                continue  # nothing to negate (no parameters, no body)
            except BaseException as exc:  # collect every operation's failure; report together
                failures.append(f"{operation.label} [{mode.value}]: {exc}"[:2000])
    assert operations >= 20
    assert not failures, "\n\n".join(failures)
