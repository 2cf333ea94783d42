"""Executions: create, idempotency, input validation, pagination, cancel, retry, scoping."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest

from conveyor.errors import Conflict, CursorInvalid, InputInvalid, InvalidValue, NotFound
from conveyor.store import Store, utcnow

NOOP = {"name": "wf", "steps": [{"id": "a", "type": "noop"}]}


async def _setup(store: Store) -> tuple[str, str]:
    tenant = await store.tenants.create("acme")
    wf = await store.workflows.create(tenant.id, NOOP)
    return tenant.id, wf.id


async def test_create_and_get(store: Store) -> None:
    tenant, wf = await _setup(store)
    execution, created = await store.executions.create(tenant, wf, {"x": [1, "é"]})
    assert created and execution.status == "queued" and execution.workflow_version == 1
    got = await store.executions.get(tenant, execution.id, with_steps=True)
    assert got.input == {"x": [1, "é"]} and got.steps == ()
    assert got.created_at == execution.created_at  # aware datetimes round-trip exactly
    assert got.created_at.utcoffset() == timedelta(0)
    assert got.region == "us" and got.triggered_by == "api" and got.attempts == 0
    payload = got.job_payload(reason="api")
    assert payload["executionId"] == got.id and payload["tenantId"] == tenant


async def test_idempotency_key_returns_the_same_execution(store: Store) -> None:
    tenant, wf = await _setup(store)
    first, created = await store.executions.create(tenant, wf, {"n": 1}, idempotency_key="k-1")
    again, created_again = await store.executions.create(
        tenant, wf, {"n": 2}, idempotency_key="k-1"
    )
    assert created and not created_again and again.id == first.id and again.input == {"n": 1}
    other, created_other = await store.executions.create(tenant, wf, idempotency_key="k-2")
    assert created_other and other.id != first.id

    # Same key, concurrently: still one execution.
    results = await asyncio.gather(
        *(store.executions.create(tenant, wf, idempotency_key="race") for _ in range(8))
    )
    assert len({e.id for e, _ in results}) == 1
    assert sum(1 for _, c in results if c) == 1

    # The key is per tenant.
    tenant_b, wf_b = await _setup(store)
    theirs, created_b = await store.executions.create(tenant_b, wf_b, idempotency_key="k-1")
    assert created_b and theirs.id != first.id

    # Reusing a key for another workflow is a conflict.
    wf2 = await store.workflows.create(tenant, NOOP)
    with pytest.raises(Conflict):
        await store.executions.create(tenant, wf2.id, idempotency_key="k-1")


async def test_create_checks_workflow_and_input(store: Store) -> None:
    tenant, wf = await _setup(store)
    with pytest.raises(NotFound):
        await store.executions.create(tenant, "missing")
    schema_wf = await store.workflows.create(
        tenant, {**NOOP, "input_schema": {"type": "object", "required": ["orderId"]}}
    )
    with pytest.raises(InputInvalid):
        await store.executions.create(tenant, schema_wf.id, {"nope": 1})
    ok, _ = await store.executions.create(tenant, schema_wf.id, {"orderId": 7})
    assert ok.status == "queued"
    await store.workflows.set_enabled(tenant, wf, False)
    with pytest.raises(Conflict):
        await store.executions.create(tenant, wf)
    await store.workflows.set_enabled(tenant, wf, True)
    await store.workflows.delete(tenant, wf)
    with pytest.raises(NotFound):
        await store.executions.create(tenant, wf)


async def test_list_filters_and_stable_cursor(store: Store) -> None:
    tenant, wf = await _setup(store)
    other_wf = (await store.workflows.create(tenant, NOOP)).id
    made = [(await store.executions.create(tenant, wf if i % 2 else other_wf))[0] for i in range(7)]
    newest_first = [e.id for e in reversed(made)]

    seen: list[str] = []
    cursor = None
    for _ in range(5):
        page = await store.executions.list(tenant, limit=3, cursor=cursor)
        seen += [e.id for e in page.items]
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
        # A new execution arriving mid-pagination neither shifts nor repeats the pages.
        await store.executions.create(tenant, wf)
    assert seen == newest_first

    by_wf = await store.executions.list(tenant, workflow_id=wf, limit=50)
    assert all(e.workflow_id == wf for e in by_wf.items)
    await store.executions.cancel(tenant, made[0].id)
    cancelled = await store.executions.list(tenant, status="cancelled")
    assert [e.id for e in cancelled.items] == [made[0].id]
    both = await store.executions.list(tenant, status=["cancelled", "queued"], limit=200)
    assert len(both.items) == 7 + 2
    with pytest.raises(CursorInvalid):
        await store.executions.list(tenant, cursor="not-a-cursor")


async def test_cancel_and_retry(store: Store) -> None:
    tenant, wf = await _setup(store)
    execution, _ = await store.executions.create(tenant, wf, {"a": 1})
    with pytest.raises(Conflict):
        await store.executions.retry(tenant, execution.id)  # queued: nothing to retry
    cancelled = await store.executions.cancel(tenant, execution.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert (await store.executions.cancel(tenant, execution.id)).status == "cancelled"
    retried = await store.executions.retry(tenant, execution.id)
    assert retried.id != execution.id and retried.retry_of == execution.id
    assert retried.status == "queued" and retried.input == {"a": 1}
    assert retried.triggered_by == "retry"


async def test_tenant_b_cannot_touch_tenant_a_execution(store: Store) -> None:
    tenant_a, wf = await _setup(store)
    tenant_b, _ = await _setup(store)
    execution, _ = await store.executions.create(tenant_a, wf)
    for call in (
        store.executions.get(tenant_b, execution.id),
        store.executions.cancel(tenant_b, execution.id),
        store.executions.retry(tenant_b, execution.id),
        store.executions.create(tenant_b, wf),
    ):
        with pytest.raises(NotFound):
            await call
    assert (await store.executions.list(tenant_b)).items == []
    assert await store.executions.step_runs(tenant_b, execution.id) == []
    assert (await store.executions.get(tenant_a, execution.id)).status == "queued"


async def test_stranded_and_mark_enqueued(store: Store) -> None:
    tenant, wf = await _setup(store)
    execution, _ = await store.executions.create(tenant, wf)
    now = utcnow()
    assert await store.executions.stranded(now, min_age_s=60) == []
    later = now + timedelta(seconds=61)
    assert [e.id for e in await store.executions.stranded(later, min_age_s=60)] == [execution.id]
    assert await store.executions.mark_enqueued([execution.id], later) == 1
    assert await store.executions.stranded(later, min_age_s=60) == []
    much_later = later + timedelta(seconds=61)
    assert len(await store.executions.stranded(much_later, min_age_s=60)) == 1
    assert await store.executions.status_of([execution.id, "x"]) == {execution.id: "queued"}


async def test_unstorable_values_are_refused_not_crashed(store: Store) -> None:
    tenant, wf = await _setup(store)
    for bad in ({"s": "a\x00b"}, {"n": float("nan")}):
        with pytest.raises(InputInvalid):
            await store.executions.create(tenant, wf, bad)
    ok, _ = await store.executions.create(tenant, wf, {"s": "a\\u0000b"})  # escaped: fine
    assert (await store.executions.get(tenant, ok.id)).input == {"s": "a\\u0000b"}
    if store.is_postgres:  # SQLite stores any text; Postgres refuses NUL and overlong values
        with pytest.raises(InvalidValue):
            await store.tenants.create("x" * 300)
