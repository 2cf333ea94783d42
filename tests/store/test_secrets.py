"""Secrets at rest: AES-GCM round trip, tenant scoping, key rotation, ``reencrypt``, and the
start-up key check (``SecretService.check_keys``)."""

from __future__ import annotations

import base64
import os

import pytest
from sqlalchemy import select

from conveyor.errors import (
    ConfigError,
    Conflict,
    InvalidValue,
    NotFound,
    SecretsUnavailable,
)
from conveyor.store import Store
from conveyor.store.schema import secrets
from conveyor.store.secrets import key_id
from tests.store._fixtures import settings_for

VALUE = 's3cr3t-value-\u00e9-"quoted"'


def new_key() -> str:
    return base64.b64encode(os.urandom(32)).decode()


async def _tenant(store: Store, name: str = "acme") -> str:
    return (await store.tenants.create(name)).id


async def _rows(store: Store) -> list[tuple[str, str, str]]:
    async with store.engine.connect() as conn:
        rows = (
            await conn.execute(
                select(secrets.c.name, secrets.c.ciphertext, secrets.c.key_id).order_by(
                    secrets.c.name
                )
            )
        ).all()
    return [(r.name, r.ciphertext, r.key_id) for r in rows]


async def test_round_trip_is_encrypted_and_tenant_scoped(db_url: str) -> None:
    key = new_key()
    async with Store(settings_for(db_url, secrets_key=key), pool_size=2) as store:
        a, b = await _tenant(store, "a"), await _tenant(store, "b")
        created = await store.secrets.create(a, "API_TOKEN", VALUE)
        assert created.name == "API_TOKEN" and created.created_at == created.updated_at
        await store.secrets.create(b, "API_TOKEN", "tenant-b-value")
        assert await store.secrets.resolve(a, ["API_TOKEN"]) == {"API_TOKEN": VALUE}
        assert await store.secrets.resolve(b, ["API_TOKEN"]) == {"API_TOKEN": "tenant-b-value"}
        # at rest: neither the value nor its base64 is in the row
        for name, ciphertext, kid in await _rows(store):
            assert name == "API_TOKEN" and kid == key_id(base64.b64decode(key))
            assert "s3cr3t" not in ciphertext
            assert b"s3cr3t" not in base64.b64decode(ciphertext)
        with pytest.raises(Conflict):
            await store.secrets.create(a, "API_TOKEN", "other-value")
        with pytest.raises(NotFound, match="'MISSING'"):
            await store.secrets.resolve(a, ["API_TOKEN", "MISSING"])
        assert [s.name for s in await store.secrets.list(a)] == ["API_TOKEN"]
        rotated = await store.secrets.rotate(a, "API_TOKEN", "new-value")
        assert rotated.updated_at >= rotated.created_at
        assert await store.secrets.resolve(a, ["API_TOKEN"]) == {"API_TOKEN": "new-value"}
        assert await store.secrets.resolve(b, ["API_TOKEN"]) == {"API_TOKEN": "tenant-b-value"}
        await store.secrets.delete(a, "API_TOKEN")
        with pytest.raises(NotFound):
            await store.secrets.delete(a, "API_TOKEN")
        with pytest.raises(NotFound):
            await store.secrets.rotate(a, "API_TOKEN", "value")
        assert await store.secrets.list(a) == []
        assert [s.name for s in await store.secrets.list(b)] == ["API_TOKEN"]


async def test_a_ciphertext_moved_to_another_row_does_not_decrypt(db_url: str) -> None:
    async with Store(settings_for(db_url, secrets_key=new_key()), pool_size=2) as store:
        a, b = await _tenant(store, "a"), await _tenant(store, "b")
        await store.secrets.create(a, "TOKEN", VALUE)
        await store.secrets.create(b, "TOKEN", "tenant-b-value")
        async with store.engine.begin() as conn:
            query = select(secrets.c.ciphertext).where(secrets.c.tenant_id == a)
            stolen = (await conn.execute(query)).scalar_one()
            await conn.execute(
                secrets.update().where(secrets.c.tenant_id == b).values(ciphertext=stolen)
            )
        rows = await _rows(store)
        assert rows[0][1] == rows[1][1]  # both rows now hold tenant a's ciphertext
        with pytest.raises(SecretsUnavailable):  # associated data: tenant id and name
            await store.secrets.resolve(b, ["TOKEN"])


async def test_validation(db_url: str) -> None:
    async with Store(settings_for(db_url, secrets_key=new_key()), pool_size=2) as store:
        a = await _tenant(store)
        for bad_name in ("", "1ABC", "has-dash", "a.b", "x" * 65, "sp ace"):
            with pytest.raises(InvalidValue, match="name"):
                await store.secrets.create(a, bad_name, VALUE)
        for bad_value in ("", "abc", "x" * (16 * 1024 + 1)):
            with pytest.raises(InvalidValue, match="value"):
                await store.secrets.create(a, "OK", bad_value)
        await store.secrets.create(a, "OK", "x" * 16 * 1024)


async def test_without_a_key_nothing_is_stored(db_url: str) -> None:
    async with Store(settings_for(db_url), pool_size=2) as store:
        a = await _tenant(store)
        with pytest.raises(SecretsUnavailable, match="SECRETS_KEY"):
            await store.secrets.create(a, "TOKEN", VALUE)
        await store.secrets.check_keys()  # nothing stored: no key needed
        assert await store.secrets.count() == 0


async def test_rotation_reencrypt_and_start_up_check(db_url: str) -> None:
    old, new = new_key(), new_key()
    async with Store(settings_for(db_url, secrets_key=old), pool_size=2) as store:
        a = await _tenant(store)
        for i in range(3):
            await store.secrets.create(a, f"S{i}", f"{VALUE}{i}")
        await store.secrets.check_keys()
    # the new key first, the old one still listed: old rows decrypt, new ones use the new key
    async with Store(settings_for(db_url, secrets_key=f"{new},{old}"), pool_size=2) as store:
        await store.secrets.check_keys()
        assert (await store.secrets.resolve(a, ["S0"]))["S0"] == f"{VALUE}0"
        await store.secrets.rotate(a, "S1", "rotated-value")
        ids = {kid for _, _, kid in await _rows(store)}
        assert ids == {key_id(base64.b64decode(old)), key_id(base64.b64decode(new))}
        assert await store.secrets.reencrypt() == 2  # S1 is already under the new key
        assert await store.secrets.reencrypt() == 0
        assert {kid for _, _, kid in await _rows(store)} == {key_id(base64.b64decode(new))}
    # the old key can go now
    async with Store(settings_for(db_url, secrets_key=new), pool_size=2) as store:
        await store.secrets.check_keys()
        values = await store.secrets.resolve(a, ["S0", "S1", "S2"])
        assert values == {"S0": f"{VALUE}0", "S1": "rotated-value", "S2": f"{VALUE}2"}
    # a key that never encrypted them, or none at all: refused at start-up, naming SECRETS_KEY
    async with Store(settings_for(db_url, secrets_key=old), pool_size=2) as store:
        with pytest.raises(ConfigError, match=r"SECRETS_KEY lacks the key .* 3 secret"):
            await store.secrets.check_keys()
        with pytest.raises(SecretsUnavailable, match="SECRETS_KEY lacks"):
            await store.secrets.resolve(a, ["S0"])
        with pytest.raises(SecretsUnavailable):
            await store.secrets.reencrypt()
    async with Store(settings_for(db_url), pool_size=2) as store:
        with pytest.raises(ConfigError, match=r"SECRETS_KEY is not set .* 3 secret"):
            await store.secrets.check_keys()
