"""The known-version trigger (one statement on Postgres, one transaction on SQLite): a stale
version hint never lets an execution through that the general path would refuse. A second ``Store`` plays another API process changing the
workflow behind this one's back (its hint and definition cache go stale)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from conveyor.errors import Conflict, InputInvalid, NotFound, StoreError
from conveyor.settings import Settings
from conveyor.store import Store
from conveyor.store.pg import PgStatements
from conveyor.store.sql import SqlStatements
from tests.store._fixtures import row_trigger

NOOP = {"name": "wf", "steps": [{"id": "a", "type": "noop"}]}
NEEDS_ORDER = {**NOOP, "input_schema": {"type": "object", "required": ["orderId"]}}


@pytest.fixture
def statements(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many known-version triggers ran (either driver; alone or in a group commit)."""
    calls: list[int] = []
    for driver in (PgStatements, SqlStatements):
        original = driver.trigger
        original_many = driver.trigger_many

        async def counted(self: Any, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
            calls.append(1)
            return await _original(self, *args, **kwargs)

        async def counted_many(self: Any, requests: Any, _original: Any = original_many) -> Any:
            calls.extend(1 for _ in requests)
            return await _original(self, requests)

        monkeypatch.setattr(driver, "trigger", counted)
        monkeypatch.setattr(driver, "trigger_many", counted_many)
    return calls


async def test_repeat_triggers_and_idempotency(store: Store, statements: list[int]) -> None:
    tenant = (await store.tenants.create("acme")).id
    wf = (await store.workflows.create(tenant, NOOP)).id
    first, created = await store.executions.create(tenant, wf, {"n": 1})
    second, created_again = await store.executions.create(tenant, wf, None)
    assert created and created_again and first.id != second.id
    got = await store.executions.get(tenant, second.id)
    assert got.input is None and got.workflow_version == 1 and got.region == "us"
    assert got.created_at == second.created_at and got.status == "queued"

    keyed, made = await store.executions.create(tenant, wf, {"n": 2}, idempotency_key="k")
    replay, made_again = await store.executions.create(tenant, wf, {"n": 3}, idempotency_key="k")
    assert made and not made_again and replay.id == keyed.id and replay.input == {"n": 2}
    racing = await asyncio.gather(
        *(store.executions.create(tenant, wf, idempotency_key="race") for _ in range(6))
    )
    assert len({e.id for e, _ in racing}) == 1 and sum(c for _, c in racing) == 1

    other = (await store.workflows.create(tenant, NOOP)).id
    await store.executions.create(tenant, other)
    with pytest.raises(Conflict):
        await store.executions.create(tenant, other, idempotency_key="k")
    assert len(statements) >= 8


async def test_other_tenant_gets_not_found(store: Store) -> None:
    a = (await store.tenants.create("a")).id
    b = (await store.tenants.create("b")).id
    wf = (await store.workflows.create(a, NOOP)).id
    await store.executions.create(a, wf)
    await store.executions.create(a, wf)
    with pytest.raises(NotFound):
        await store.executions.create(b, wf)


async def test_changes_made_elsewhere_are_honoured(
    store: Store, settings: Settings, statements: list[int]
) -> None:
    tenant = (await store.tenants.create("acme")).id
    wf = (await store.workflows.create(tenant, NOOP)).id
    await store.executions.create(tenant, wf, {"x": 1})  # this process now knows version 1
    async with Store(settings, pool_size=2) as elsewhere:
        await elsewhere.workflows.update(tenant, wf, NEEDS_ORDER)
        with pytest.raises(InputInvalid):
            await store.executions.create(tenant, wf, {"x": 2})
        ok, _ = await store.executions.create(tenant, wf, {"orderId": 1})
        assert ok.workflow_version == 2
        again, _ = await store.executions.create(tenant, wf, {"orderId": 2})
        assert again.workflow_version == 2
        with pytest.raises(InputInvalid):  # the hint is now version 2: still validated
            await store.executions.create(tenant, wf, {"x": 3})

        await elsewhere.workflows.set_enabled(tenant, wf, False)
        with pytest.raises(Conflict):
            await store.executions.create(tenant, wf, {"orderId": 3})
        await elsewhere.workflows.set_enabled(tenant, wf, True)
        await store.executions.create(tenant, wf, {"orderId": 4})
        await elsewhere.workflows.delete(tenant, wf)
        with pytest.raises(NotFound):
            await store.executions.create(tenant, wf, {"orderId": 5})
    assert len(statements) >= 6
    listed = await store.executions.list(tenant, workflow_id=wf)
    assert [e.input for e in listed.items] == [{"orderId": 4}, {"orderId": 2}, {"orderId": 1},
                                               {"x": 1}]  # fmt: skip


async def test_unstorable_input_is_refused_after_the_hint(store: Store) -> None:
    tenant = (await store.tenants.create("acme")).id
    wf = (await store.workflows.create(tenant, NOOP)).id
    await store.executions.create(tenant, wf)
    with pytest.raises(InputInvalid):
        await store.executions.create(tenant, wf, {"s": "a\u0000b"})
    with pytest.raises(InputInvalid):
        await store.executions.create(tenant, wf, {"f": float("nan")})
    with pytest.raises(InputInvalid, match="unpaired surrogate"):
        await store.executions.create(tenant, wf, {"s": "a\ud800b"})


async def test_a_replay_answers_after_the_workflow_was_disabled_or_changed(
    store: Store, settings: Settings
) -> None:
    """A request retried with its idempotency key gets the execution the first one made, even
    if the workflow was disabled or given a stricter input schema since (known-version path
    and general path alike); a new key then gets the workflow's answer."""
    tenant = (await store.tenants.create("acme")).id
    wf = (await store.workflows.create(tenant, NOOP)).id
    await store.executions.create(tenant, wf)  # this process knows version 1
    first, made = await store.executions.create(tenant, wf, {"x": 1}, idempotency_key="k1")
    second, made2 = await store.executions.create(tenant, wf, {"x": 2}, idempotency_key="k2")
    assert made and made2
    async with Store(settings, pool_size=2) as elsewhere:
        await elsewhere.workflows.set_enabled(tenant, wf, False)
        replay, again = await store.executions.create(tenant, wf, {"x": 1}, idempotency_key="k1")
        assert (replay.id, again) == (first.id, False)
        with pytest.raises(Conflict, match="disabled"):
            await store.executions.create(tenant, wf, {"x": 1}, idempotency_key="new")
        await elsewhere.workflows.set_enabled(tenant, wf, True)
        await elsewhere.workflows.update(tenant, wf, NEEDS_ORDER)
        replay, again = await store.executions.create(tenant, wf, {"x": 2}, idempotency_key="k2")
        assert (replay.id, again) == (second.id, False)
        with pytest.raises(InputInvalid):
            await store.executions.create(tenant, wf, {"x": 2}, idempotency_key="new")


@pytest.mark.parametrize("db_url", ["postgres"], indirect=True)
async def test_a_trigger_the_database_refuses_fails_alone_and_shows_no_other_input(
    store: Store,
) -> None:
    """Concurrent triggers share one statement; the database refuses one of them (a check of
    its own on the input — here a trigger's ``RAISE``): that request alone gets the error, the
    others (another tenant's among them) are stored, and no error message quotes another
    request's input."""
    a = (await store.tenants.create("a")).id
    b = (await store.tenants.create("b")).id
    wf_a = (await store.workflows.create(a, NOOP)).id
    wf_b = (await store.workflows.create(b, NOOP)).id
    await store.executions.create(a, wf_a)  # both versions known: one statement for all
    await store.executions.create(b, wf_b)
    refuse = "IF NEW.input ? 'boom' THEN RAISE EXCEPTION 'input refused'; END IF;"
    async with row_trigger(store, "refuse_boom", "BEFORE INSERT ON executions", refuse):
        batches = store.executions.group_commit.batches
        calls = [store.executions.create(a, wf_a, {"card": f"4111-{i}"}) for i in range(5)]
        calls.insert(2, store.executions.create(b, wf_b, {"boom": 1}))
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert store.executions.group_commit.batches <= batches + 2, "they shared statements"
        refused = results.pop(2)
        assert isinstance(refused, StoreError) and "input refused" in refused.message
        assert "4111" not in str(refused) and "4111" not in str(refused.details)
        assert all(not isinstance(r, BaseException) and r[1] for r in results), results
