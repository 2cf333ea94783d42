"""The parsed-version cache (``WORKFLOW_CACHE_SIZE``) and its batched fetch: misses of
concurrent callers share one statement (both backends)."""

from __future__ import annotations

import asyncio

import pytest

from conveyor.errors import NotFound
from conveyor.settings import Settings
from conveyor.store import Store


async def _workflows(store: Store, tenant_id: str, n: int) -> list[str]:
    return [
        (await store.workflows.create(tenant_id, {"name": f"wf{i}", "steps": [
            {"id": f"s{i}", "type": "noop"}]})).id
        for i in range(n)
    ]  # fmt: skip


async def test_the_cache_holds_the_setting_s_number_of_versions_least_recently_used_out(
    settings: Settings,
) -> None:
    async with Store(settings.model_copy(update={"workflow_cache_size": 2}), pool_size=2) as store:
        assert store.definitions.maxsize == 2
        tenant = (await store.tenants.create("acme")).id
        first, second, third = await _workflows(store, tenant, 3)  # each create caches its v1
        assert len(store.definitions) == 2 and (tenant, first, 1) not in store.definitions
        fetches, hits, misses = (
            store.workflows.fetches.batches,
            store.definitions.hits,
            store.definitions.misses,
        )

        assert (await store.workflows.get_definition(tenant, third, 1)).name == "wf2"
        assert store.definitions.hits == hits + 1
        assert store.workflows.fetches.batches == fetches, "a hit reads nothing"

        assert (await store.workflows.get_definition(tenant, first, 1)).name == "wf0"
        assert store.definitions.misses == misses + 1
        assert store.workflows.fetches.batches == fetches + 1
        # the evicted one is back; the least recently used (second) went
        assert (tenant, first, 1) in store.definitions
        assert (tenant, second, 1) not in store.definitions
        assert len(store.definitions) == 2


async def test_misses_made_together_cost_one_fetch_and_each_gets_its_own_answer(
    settings: Settings,
) -> None:
    async with Store(settings, pool_size=2) as seeding:
        tenant = (await seeding.tenants.create("acme")).id
        ids = await _workflows(seeding, tenant, 12)
    async with Store(settings.model_copy(update={"workflow_cache_size": 4}), pool_size=2) as store:
        batches, items = store.workflows.fetches.batches, store.workflows.fetches.items
        keys = [(tenant, w, 1) for w in ids] + [(tenant, ids[0], 1), (tenant, ids[1], 7)]
        answers = await asyncio.gather(
            *(store.workflows.get_definition(*k) for k in keys), return_exceptions=True
        )
        assert store.workflows.fetches.batches == batches + 1, "14 misses in one turn: one fetch"
        assert store.workflows.fetches.items == items + len(keys)
        names = [a.name for a in answers[:13] if not isinstance(a, BaseException)]
        assert names == [f"wf{i}" for i in range(12)] + ["wf0"]
        assert isinstance(answers[13], NotFound), "only the unknown version fails"
        # a batch larger than the cache: every caller answered, the cache stays bounded
        assert len(store.definitions) == 4
        with pytest.raises(NotFound):
            await store.workflows.get_definition(tenant, ids[1], 7)
