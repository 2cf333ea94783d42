"""Workflows and immutable versions (both backends)."""

from __future__ import annotations

from typing import Any

import pytest

from conveyor.errors import NotFound, WorkflowInvalid
from conveyor.store import Store


def definition(name: str = "wf", *steps: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"name": name, "steps": list(steps) or [{"id": "a", "type": "noop"}], **extra}


async def test_create_get_update_versions(store: Store) -> None:
    tenant = await store.tenants.create("acme")
    created = await store.workflows.create(tenant.id, definition("one", region="eu"))
    assert created.current_version == 1 and created.region == "eu" and created.enabled
    assert created.webhook_secret and created.has_webhook_secret

    got = await store.workflows.get(tenant.id, created.id)
    assert got.definition == {"name": "one", "region": "eu", "steps": [{"id": "a", "type": "noop"}]}
    assert got.webhook_secret is None  # shown once

    updated = await store.workflows.update(
        tenant.id, created.id, definition("two", {"id": "b", "type": "noop"})
    )
    assert updated.current_version == 2 and updated.name == "two" and updated.region == "us"
    v1 = await store.workflows.get_version(tenant.id, created.id, 1)
    v2 = await store.workflows.get_version(tenant.id, created.id, 2)
    assert v1.definition["name"] == "one" and v2.definition["steps"][0]["id"] == "b"
    assert (await store.workflows.get(tenant.id, created.id)).current_version == 2
    parsed = await store.workflows.get_definition(tenant.id, created.id, 1)
    assert parsed.name == "one"


async def test_invalid_definition_points_at_step_and_field(store: Store) -> None:
    tenant = await store.tenants.create("acme")
    bad = definition("x", {"id": "a", "type": "noop"}, {"id": "b", "type": "delay"})
    with pytest.raises(WorkflowInvalid) as caught:
        await store.workflows.create(tenant.id, bad)
    problems: Any = caught.value.details
    assert problems[0]["step"] == "b"
    listed = await store.workflows.list(tenant.id)
    assert listed.items == []


async def test_list_disable_delete(store: Store) -> None:
    tenant = await store.tenants.create("acme")
    made = [await store.workflows.create(tenant.id, definition(f"w{i}")) for i in range(4)]
    page = await store.workflows.list(tenant.id, limit=3)
    assert [w.id for w in page.items] == [w.id for w in reversed(made)][:3]
    rest = await store.workflows.list(tenant.id, limit=3, cursor=page.next_cursor)
    assert [w.id for w in rest.items] == [made[0].id] and rest.next_cursor is None

    disabled = await store.workflows.set_enabled(tenant.id, made[1].id, False)
    assert not disabled.enabled
    assert [w.id for w in (await store.workflows.list(tenant.id, enabled=False)).items] == [
        made[1].id
    ]

    await store.workflows.delete(tenant.id, made[2].id)
    with pytest.raises(NotFound):
        await store.workflows.get(tenant.id, made[2].id)
    with pytest.raises(NotFound):
        await store.workflows.delete(tenant.id, made[2].id)
    assert made[2].id not in [w.id for w in (await store.workflows.list(tenant.id)).items]


async def test_webhook_secret(store: Store) -> None:
    tenant = await store.tenants.create("acme")
    wf = await store.workflows.create(tenant.id, definition())
    assert wf.webhook_secret is not None
    found = await store.workflows.verify_webhook(wf.id, wf.webhook_secret)
    assert found is not None and found.tenant_id == tenant.id
    assert await store.workflows.verify_webhook(wf.id, "whs_wrong") is None
    assert await store.workflows.verify_webhook("nope", wf.webhook_secret) is None

    rotated = await store.workflows.rotate_webhook_secret(tenant.id, wf.id)
    assert await store.workflows.verify_webhook(wf.id, wf.webhook_secret) is None
    assert await store.workflows.verify_webhook(wf.id, rotated) is not None
    await store.workflows.delete(tenant.id, wf.id)
    assert await store.workflows.verify_webhook(wf.id, rotated) is None


async def test_tenant_b_cannot_touch_tenant_a_workflow(store: Store) -> None:
    a = await store.tenants.create("a")
    b = await store.tenants.create("b")
    wf = await store.workflows.create(a.id, definition())
    for call in (
        store.workflows.get(b.id, wf.id),
        store.workflows.get_version(b.id, wf.id, 1),
        store.workflows.update(b.id, wf.id, definition()),
        store.workflows.set_enabled(b.id, wf.id, False),
        store.workflows.delete(b.id, wf.id),
        store.workflows.rotate_webhook_secret(b.id, wf.id),
        store.workflows.get_definition(b.id, wf.id, 1),
    ):
        with pytest.raises(NotFound):
            await call
    assert (await store.workflows.list(b.id)).items == []
    still = await store.workflows.get(a.id, wf.id)
    assert still.enabled and still.current_version == 1
