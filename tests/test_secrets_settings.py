"""``SECRETS_KEY``: validated at start-up (exit 2, one line naming it, the key never shown);
``conveyor api``/``conveyor worker`` refuse to start when stored secrets cannot be decrypted;
``conveyor secrets reencrypt`` moves every secret to the first key."""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conveyor.errors import ConfigError
from conveyor.settings import load_settings
from conveyor.store import Store, migrate
from conveyor.store.secrets import key_id
from tests.helpers import env_for

KEY_A = base64.b64encode(os.urandom(32)).decode()
KEY_B = base64.urlsafe_b64encode(os.urandom(32)).decode()
PROCESSES = [["-m", "conveyor.api"], ["-m", "conveyor.workers.execution"]]


def _run(argv: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *argv],
        env=env_for(LOG_FORMAT="text", **env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "bad",
    [
        "not base64!",
        base64.b64encode(os.urandom(16)).decode(),  # 16 bytes: too short
        base64.b64encode(os.urandom(33)).decode(),
        f"{KEY_A},",  # an empty second key
        f"{KEY_A},{KEY_A[:-4]}",
    ],
    ids=["not-base64", "16-bytes", "33-bytes", "empty-second-key", "short-second-key"],
)
def test_a_malformed_key_is_refused_naming_secrets_key(bad: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"SECRETS_KEY": bad})
    message = str(caught.value)
    assert message.startswith("invalid setting SECRETS_KEY=***: ")
    assert KEY_A not in message and bad not in message


def test_keys_are_decoded_in_order() -> None:
    settings = load_settings({"SECRETS_KEY": f" {KEY_A} , {KEY_B} "})
    raw_b = base64.urlsafe_b64decode(KEY_B)
    assert settings.secrets_keys == (base64.b64decode(KEY_A), raw_b)
    assert KEY_A not in repr(settings) and KEY_A not in str(settings)
    assert load_settings({"SECRETS_KEY": ""}).secrets_keys == ()


@pytest.mark.parametrize("argv", [*PROCESSES, ["-m", "conveyor.cli", "check"]])
def test_processes_exit_2_on_a_malformed_key(argv: list[str]) -> None:
    done = _run(argv, SECRETS_KEY="short", DATABASE_URL="sqlite:///:memory:")
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "SECRETS_KEY=***" in lines[0], done.stderr


async def _seed(url: str, key: str, count: int = 2) -> str:
    await migrate(load_settings({}, database_url=url))
    async with Store(load_settings({}, database_url=url, secrets_key=key), pool_size=1) as store:
        tenant = (await store.tenants.create("acme")).id
        for i in range(count):
            await store.secrets.create(tenant, f"S{i}", f"value-number-{i}")
    return tenant


@pytest.mark.parametrize("argv", PROCESSES)
def test_stored_secrets_without_their_key_stop_api_and_worker(
    argv: list[str], tmp_path: Path, settings_env: dict[str, str]
) -> None:
    url = f"sqlite:///{tmp_path}/conveyor.db"
    asyncio.run(_seed(url, KEY_A))
    env = {k: v for k, v in settings_env.items() if k.startswith("QUEUE_")}
    unset = _run(argv, DATABASE_URL=url, **env)
    assert unset.returncode == 2, unset.stderr
    assert "SECRETS_KEY is not set but the database holds 2 secret(s)" in unset.stderr
    wrong = _run(argv, DATABASE_URL=url, SECRETS_KEY=KEY_B, **env)
    assert wrong.returncode == 2, wrong.stderr
    assert "SECRETS_KEY lacks the key that encrypted 2 secret(s)" in wrong.stderr
    for done in (unset, wrong):
        lines = [line for line in done.stderr.splitlines() if "SECRETS_KEY" in line]
        assert len(lines) == 1, done.stderr


def test_reencrypt_command(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/conveyor.db"
    tenant = asyncio.run(_seed(url, KEY_A, count=3))
    cli = ["-m", "conveyor.cli", "secrets", "reencrypt"]
    missing = _run(cli, DATABASE_URL=url)
    assert missing.returncode == 2 and "SECRETS_KEY" in missing.stderr
    lacking = _run(cli, DATABASE_URL=url, SECRETS_KEY=KEY_B)  # cannot decrypt the rows
    assert lacking.returncode == 2 and "SECRETS_KEY lacks" in lacking.stderr, lacking.stderr
    done = _run(cli, DATABASE_URL=url, SECRETS_KEY=f"{KEY_B},{KEY_A}")
    assert done.returncode == 0, done.stderr
    new_id = key_id(base64.urlsafe_b64decode(KEY_B))
    assert done.stdout.strip() == f"re-encrypted 3 secret(s) with key {new_id}; all 3 now use it"
    again = _run(cli, DATABASE_URL=url, SECRETS_KEY=f"{KEY_B},{KEY_A}")
    assert again.stdout.startswith("re-encrypted 0 secret(s)"), again.stderr
    asyncio.run(_check_new_key_alone(url, tenant))


async def _check_new_key_alone(url: str, tenant: str) -> None:
    settings = load_settings({}, database_url=url, secrets_key=KEY_B)
    async with Store(settings, pool_size=1) as store:
        await store.secrets.check_keys()  # the old key can go
        values = await store.secrets.resolve(tenant, ["S0", "S1", "S2"])
    assert values == {f"S{i}": f"value-number-{i}" for i in range(3)}
