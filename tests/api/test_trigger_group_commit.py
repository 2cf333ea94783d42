"""Group commit of triggers through the API (#16), on PostgreSQL and SQLite: a burst of
concurrent triggers shares statements and commits, yet every idempotency key (per tenant) makes
exactly one execution and every request for it answers that execution; a batch the database
fails answers 503 to all its requests and stores none of them; a lone trigger never waits for a
batch."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
import pytest

from conveyor.store import migrate
from conveyor.store._types import new_id, utcnow
from conveyor.store.statements import TriggerRequest
from tests.api.conftest import NOOP_WORKFLOW, Api, make_settings, running_api


@pytest.fixture(params=["postgres", "sqlite"])
async def backend_api(
    request: pytest.FixtureRequest, api_env: dict[str, str], tmp_path: Path
) -> AsyncIterator[Api]:
    env = dict(api_env)
    if request.param == "sqlite":
        env["DATABASE_URL"] = f"sqlite:///{tmp_path}/conveyor.db"
    settings = make_settings(**env)
    if request.param == "sqlite":
        await migrate(settings)
    async with running_api(settings) as api:
        yield api


async def _until(predicate: Callable[[], Awaitable[bool]]) -> None:
    """Poll ``predicate`` (at most 10 s)."""
    async with asyncio.timeout(10):
        for _ in range(100_000):
            if await predicate():
                return
            await asyncio.sleep(0.01)
    raise AssertionError("condition never met")


async def test_a_burst_keeps_every_idempotency_key(backend_api: Api) -> None:
    api = backend_api
    tenants = [await api.tenant("acme"), await api.tenant("globex")]
    workflows = [await api.workflow(auth) for auth in tenants]
    for auth, wf in zip(tenants, workflows, strict=True):  # this process learns the versions
        r = await api.client.post(f"/api/workflows/{wf}/executions", headers=auth)
        assert r.status_code == 202, r.text
    group = api.ctx.store.executions.group_commit
    batches_before = group.batches
    replays = api.ctx.store.executions.replays
    replays_before = replays.batches
    # 2 tenants x 25 keys x 4 repeats = 200 requests; both tenants use the same key names.
    requests = [(t, f"key-{k}") for _ in range(4) for k in range(25) for t in range(2)]
    answers = await asyncio.gather(
        *(
            api.client.post(
                f"/api/workflows/{workflows[t]}/executions",
                json={"input": {"n": n}},
                headers={**tenants[t], "Idempotency-Key": key},
            )
            for n, (t, key) in enumerate(requests)
        )
    )
    by_key: dict[tuple[int, str], list[tuple[int, str]]] = defaultdict(list)
    for (t, key), r in zip(requests, answers, strict=True):
        assert r.status_code in (200, 202), r.text
        by_key[(t, key)].append((r.status_code, r.json()["data"]["id"]))
    assert len(by_key) == 50
    for seen in by_key.values():
        assert len({execution_id for _, execution_id in seen}) == 1, seen
        assert Counter(status for status, _ in seen) == {202: 1, 200: 3}, seen
    ids = {seen[0][1] for seen in by_key.values()}
    assert len(ids) == 50, "the two tenants' keys are apart"
    assert group.batches - batches_before < 200, "concurrent triggers shared statements"
    assert replays.batches - replays_before < 150, "the 150 replays shared their reads"
    for t, auth in enumerate(tenants):
        r = await api.client.get(
            "/api/executions", params={"workflowId": workflows[t], "limit": 100}, headers=auth
        )
        assert r.status_code == 200, r.text
        assert len(r.json()["data"]["items"]) == 26  # the warm-up + one per key
    queue = api.ctx.execution_queue("us")
    for execution_id in ids:
        assert await queue.get_job_state(execution_id) in ("waiting", "prioritized")


async def test_a_lone_trigger_does_not_wait_for_a_batch(backend_api: Api) -> None:
    """One trigger at a time (as at one per second): each goes alone, at once; the group
    commit costs no more than an event-loop turn over the statement called directly."""
    api = backend_api
    store = api.ctx.store
    tid = (await store.tenants.create("acme")).id
    wf = (await store.workflows.create(tid, NOOP_WORKFLOW)).id
    await store.executions.create(tid, wf)  # this process learns the version
    group = store.executions.group_commit
    before = group.batches
    for _ in range(5):
        _, created = await store.executions.create(tid, wf, {"n": 1})
        assert created
    assert group.batches - before == 5, "every lone trigger was a batch of its own"
    statements = store.statements

    def request() -> TriggerRequest:
        return TriggerRequest(
            execution_id=new_id(),
            tenant_id=tid,
            workflow_id=wf,
            version=1,
            triggered_by="api",
            input=None,
            input_json=None,
            idempotency_key=None,
            now=utcnow(),
        )

    direct: list[float] = []
    grouped: list[float] = []
    for _ in range(30):  # interleaved, so load on the machine hits both alike
        r1 = request()
        start = time.perf_counter()
        await statements.trigger(
            r1.execution_id, r1.tenant_id, r1.workflow_id, r1.version,
            triggered_by="api", input=None, input_json=None, idempotency_key=None, now=r1.now,
        )  # fmt: skip
        direct.append(time.perf_counter() - start)
        start = time.perf_counter()
        row = await group.submit(request())
        grouped.append(time.perf_counter() - start)
        assert row is not None and not isinstance(row, Exception) and row["inserted"]
    added = statistics.median(grouped) - statistics.median(direct)
    assert added < 0.002, f"a lone trigger waited {added * 1000:.2f} ms more than a direct one"


async def test_a_failed_batch_answers_503_to_all_and_stores_none(
    api_env: dict[str, str], fresh_pg_url: str
) -> None:
    """The database refuses one row of a batch (a trigger raising "cannot connect now", as a
    database going down does): the whole batch fails — every request of it answers 503 and
    none of its rows is stored — while the batch before it and the trigger after it succeed."""
    settings = make_settings(**{**api_env, "DATABASE_URL": fresh_pg_url})
    await migrate(settings)
    dsn = fresh_pg_url.replace("postgresql+asyncpg://", "postgresql://")
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(
            """
            CREATE FUNCTION refuse_boom() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
              IF NEW.input ? 'boom' THEN
                RAISE EXCEPTION 'refused' USING ERRCODE = '57P03';
              END IF;
              RETURN NEW;
            END $$;
            CREATE TRIGGER refuse_boom BEFORE INSERT ON executions
              FOR EACH ROW EXECUTE FUNCTION refuse_boom();
            """
        )
        async with running_api(settings) as api:
            auth = await api.tenant()
            wf = await api.workflow(auth)
            url = f"/api/workflows/{wf}/executions"
            assert (await api.client.post(url, headers=auth)).status_code == 202
            group = api.ctx.store.executions.group_commit
            # Hold the group commit's batch in flight: a row with key "hold" is inserted by
            # another transaction that is not committed yet, so the trigger with that key
            # waits on the unique index.
            holder = await asyncpg.connect(dsn)
            tx = holder.transaction()
            await tx.start()
            tenant_id = await holder.fetchval("SELECT tenant_id FROM workflows WHERE id = $1", wf)
            await holder.execute(
                "INSERT INTO executions (id, tenant_id, workflow_id, workflow_version, status,"
                " region, triggered_by, idempotency_key, created_at, queued_at, updated_at)"
                " VALUES ($1, $2, $3, 1, 'queued', 'us', 'api', 'hold', now(), now(), now())",
                new_id(), tenant_id, wf,
            )  # fmt: skip
            held = asyncio.create_task(
                api.client.post(url, headers={**auth, "Idempotency-Key": "hold"})
            )

            async def blocked() -> bool:
                waiting = await admin.fetchval(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND wait_event_type = 'Lock'"
                )
                return bool(waiting)

            await _until(blocked)
            burst = [
                asyncio.create_task(
                    api.client.post(
                        url, json={"input": {"boom": 1} if n == 7 else {"n": n}}, headers=auth
                    )
                )
                for n in range(20)
            ]

            async def gathered() -> bool:
                return group.waiting == 20

            await _until(gathered)
            await tx.rollback()
            await holder.close()
            assert (await held).status_code == 202, "the held batch went through"
            answers = await asyncio.gather(*burst)
            assert [r.status_code for r in answers] == [503] * 20
            assert all(r.json()["error"]["code"] for r in answers)
            stored = await admin.fetchval("SELECT count(*) FROM executions")
            assert stored == 2, "the warm-up and the held trigger only: nothing of the batch"
            after = await api.client.post(url, json={"input": {"n": 99}}, headers=auth)
            assert after.status_code == 202, after.text
    finally:
        await admin.close()
