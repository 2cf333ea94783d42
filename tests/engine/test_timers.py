"""Timer rows created by delay steps, claimed and fired as the timer dispatcher does."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any

from conveyor.engine import Engine, OutcomeKind
from conveyor.settings import Settings
from conveyor.store import Store
from tests.engine._support import start

DELAYED: list[dict[str, Any]] = [
    {"id": "wait", "type": "delay", "seconds": 60},
    {"id": "b", "type": "noop"},
]


async def _parked(store: Store, settings: Settings, count: int) -> list[str]:
    engine = Engine(store, settings)
    tenant = (await store.tenants.create("acme")).id
    ids = []
    for _ in range(count):
        _, execution_id = await start(store, DELAYED, tenant_id=tenant)
        assert (await engine.run(execution_id)).kind is OutcomeKind.WAITING
        ids.append(execution_id)
    return ids


async def test_claim_fire_release(store: Store, settings: Settings) -> None:
    await _parked(store, settings, 3)
    due_at = await store.timers.next_due_at()
    assert due_at is not None
    now = due_at - timedelta(seconds=5)
    assert await store.timers.backlog(now) == 0
    assert await store.timers.claim(now, owner="a") == []  # not due yet
    ahead = await store.timers.claim(now, owner="a", horizon_s=120, claim_ttl_s=30)
    assert len(ahead) == 3 and all(t.claimed_by == "a" for t in ahead)
    assert [t.due_at for t in ahead] == sorted(t.due_at for t in ahead)
    assert await store.timers.claim(now, owner="b", horizon_s=120) == []  # held by a

    payload = ahead[0].job_payload()
    assert payload["executionId"] == ahead[0].execution_id and payload["reason"] == "timer"

    assert await store.timers.mark_fired([ahead[0].id], owner="b", at=now) == 0  # not b's
    assert await store.timers.mark_fired([ahead[0].id], owner="a", at=now) == 1
    assert await store.timers.release([ahead[1].id], owner="a") == 1
    retaken = await store.timers.claim(now, owner="b", horizon_s=120, claim_ttl_s=300)
    assert [t.id for t in retaken] == [ahead[1].id]

    # a's claim on the third expires; b takes it over.
    expired = now + timedelta(seconds=31)
    taken = await store.timers.claim(expired, owner="b", horizon_s=120)
    assert [t.id for t in taken] == [ahead[2].id]
    assert await store.timers.backlog(due_at + timedelta(seconds=1)) == 2


async def test_concurrent_claims_are_disjoint(store: Store, settings: Settings) -> None:
    await _parked(store, settings, 12)
    due_at = await store.timers.next_due_at()
    assert due_at is not None
    later = due_at + timedelta(seconds=120)
    batches = await asyncio.gather(
        *(store.timers.claim(later, owner=f"d{i}", limit=5) for i in range(4))
    )
    claimed = [t.id for batch in batches for t in batch]
    assert len(claimed) == 12 and len(set(claimed)) == 12
