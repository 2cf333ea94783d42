"""Tenants and API keys (both backends)."""

from __future__ import annotations

import pytest

from conveyor.errors import NotFound
from conveyor.store import Store


async def test_create_and_get_tenant(store: Store) -> None:
    tenant = await store.tenants.create("acme")
    got = await store.tenants.get(tenant.id)
    assert got == tenant
    assert got.created_at.tzinfo is not None
    with pytest.raises(NotFound):
        await store.tenants.get("nope")


async def test_tenant_list_pages(store: Store) -> None:
    made = [await store.tenants.create(f"t{i}") for i in range(5)]
    first = await store.tenants.list(limit=3)
    assert first.next_cursor is not None
    second = await store.tenants.list(limit=3, cursor=first.next_cursor)
    assert second.next_cursor is None
    seen = [t.id for t in first.items + second.items]
    assert seen == [t.id for t in reversed(made)]


async def test_api_key_issue_verify_revoke(store: Store) -> None:
    tenant = await store.tenants.create("acme")
    issued = await store.api_keys.issue(tenant.id, name="ci")
    assert issued.token.startswith("cvk_")
    key = await store.api_keys.verify(issued.token)
    assert key is not None and key.tenant_id == tenant.id and key.id == issued.key.id

    # Only a hash is stored.
    async with store.engine.connect() as conn:
        from sqlalchemy import select

        from conveyor.store.schema import api_keys

        row = (await conn.execute(select(api_keys).where(api_keys.c.id == key.id))).one()
    assert issued.token not in (row.key_hash, row.prefix)
    assert len(row.key_hash) == 64

    for bad in (
        "",
        "cvk_",
        issued.token + "x",
        issued.token[:-1] + ("B" if issued.token.endswith("A") else "A"),
        "cvk_000000000000_" + "a" * 43,
        "Bearer " + issued.token,
    ):
        assert await store.api_keys.verify(bad) is None

    revoked = await store.api_keys.revoke(tenant.id, key.id)
    assert revoked.revoked_at is not None and not revoked.active
    assert await store.api_keys.verify(issued.token) is None
    again = await store.api_keys.revoke(tenant.id, key.id)  # idempotent
    assert again.revoked_at == revoked.revoked_at


async def test_api_keys_are_tenant_scoped(store: Store) -> None:
    a = await store.tenants.create("a")
    b = await store.tenants.create("b")
    key_a = await store.api_keys.issue(a.id)
    await store.api_keys.issue(b.id)
    with pytest.raises(NotFound):
        await store.api_keys.revoke(b.id, key_a.key.id)
    assert [k.id for k in await store.api_keys.list(a.id)] == [key_a.key.id]
    assert await store.api_keys.verify(key_a.token) is not None
    with pytest.raises(NotFound):
        await store.api_keys.issue("no-such-tenant")
