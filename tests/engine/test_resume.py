"""Retry from the failed step (the store's ``retry_from`` + the engine): the step runs before
the failed one are copied (``reused_from``) and do not run again — a real local HTTP target
counts the requests — their outputs feed the steps after; a retry from the start runs all."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from conveyor.engine import Engine, OutcomeKind
from conveyor.errors import Conflict, NotFound
from conveyor.settings import Settings
from conveyor.store import Store
from tests.engine._support import start
from tests.engine._target import Target, http_target
from tests.store._fixtures import settings_for


@pytest.fixture
def target() -> Iterator[Target]:
    with http_target() as running:
        yield running


@pytest.fixture
def allowed(settings: Settings) -> Settings:
    return settings_for(settings.database_url, http_allowlist="127.0.0.1")


def _steps(target: Target) -> list[dict[str, Any]]:
    return [
        {"id": "a", "type": "http", "url": target.url("/ok/a"), "timeout_s": 10,
         "select": "body"},
        {"id": "shape", "type": "transform", "expression": "{token: steps.a.token}"},
        {"id": "b", "type": "http", "url": target.url("/flaky/b"), "timeout_s": 10},
        {"id": "c", "type": "http", "timeout_s": 10,
         "url": target.url("/ok/c") + "?from={{ steps.shape.token }}&n={{ input.n }}"},
    ]  # fmt: skip


async def _run(store: Store, settings: Settings, execution_id: str) -> OutcomeKind:
    async with Engine(store, settings) as engine:
        return (await engine.run(execution_id)).kind


async def _failed_at_b(store: Store, allowed: Settings, target: Target) -> tuple[str, str]:
    tenant, execution_id = await start(store, _steps(target), {"n": 7})
    assert await _run(store, allowed, execution_id) is OutcomeKind.FAILED
    assert dict(target.hits) == {"/ok/a": 1, "/flaky/b": 1}
    return tenant, execution_id


async def test_retry_from_failed_reuses_the_steps_before(
    store: Store, allowed: Settings, target: Target
) -> None:
    tenant, original_id = await _failed_at_b(store, allowed, target)
    original = await store.executions.get(tenant, original_id, with_steps=True)
    assert original.error["step"] == "b"
    target.failing = False

    retry, created = await store.executions.retry_from(tenant, original_id, start="failed")
    assert created and retry.retry_of == original_id and retry.triggered_by == "retry"
    assert (retry.status, retry.next_step, retry.steps_run) == ("queued", 2, 2)
    async with Engine(store, allowed) as engine:
        outcome = await engine.run(retry.id)
    assert outcome.kind is OutcomeKind.SUCCEEDED and outcome.steps_run == 2
    assert outcome.queue_latency_ms is not None  # this run started the execution

    # a and shape did not run again; b (the failed step) and c ran, c with a's output
    assert dict(target.hits) == {"/ok/a": 1, "/flaky/b": 2, "/ok/c": 1}
    done = await store.executions.get(tenant, retry.id, with_steps=True)
    assert done.status == "succeeded" and done.error is None
    assert done.output["body"]["path"] == "/ok/c?from=tok-a&n=7"
    steps = [(s.seq, s.step_id, s.status, s.reused_from) for s in done.steps]
    assert steps == [
        (0, "a", "succeeded", original_id),
        (1, "shape", "succeeded", original_id),
        (2, "b", "succeeded", None),
        (3, "c", "succeeded", None),
    ]
    for copy, source in zip(done.steps[:2], original.steps[:2], strict=True):
        assert (copy.input, copy.output, copy.attempts, copy.started_at) == (
            source.input, source.output, source.attempts, source.started_at)  # fmt: skip
    assert done.steps_run == 4
    # the original is untouched
    again = await store.executions.get(tenant, original_id, with_steps=True)
    assert again.status == "failed" and [s.reused_from for s in again.steps] == [None] * 3


async def test_retry_from_start_runs_everything_again(
    store: Store, allowed: Settings, target: Target
) -> None:
    tenant, original_id = await _failed_at_b(store, allowed, target)
    target.failing = False
    retry, created = await store.executions.retry_from(tenant, original_id, start="start")
    assert created and (retry.next_step, retry.steps_run) == (0, 0)
    assert await _run(store, allowed, retry.id) is OutcomeKind.SUCCEEDED
    assert dict(target.hits) == {"/ok/a": 2, "/flaky/b": 2, "/ok/c": 1}
    done = await store.executions.get(tenant, retry.id, with_steps=True)
    assert [(s.step_id, s.reused_from) for s in done.steps] == [
        ("a", None), ("shape", None), ("b", None), ("c", None)]  # fmt: skip
    # the default is from the start
    default = await store.executions.retry(tenant, original_id)
    assert (default.next_step, default.steps_run) == (0, 0)


async def test_a_resumed_retry_that_fails_again_can_be_resumed_again(
    store: Store, allowed: Settings, target: Target
) -> None:
    tenant, original_id = await _failed_at_b(store, allowed, target)
    first, _ = await store.executions.retry_from(tenant, original_id, start="failed")
    assert await _run(store, allowed, first.id) is OutcomeKind.FAILED  # b still fails
    target.failing = False
    second, _ = await store.executions.retry_from(tenant, first.id, start="failed")
    assert await _run(store, allowed, second.id) is OutcomeKind.SUCCEEDED
    assert dict(target.hits) == {"/ok/a": 1, "/flaky/b": 3, "/ok/c": 1}
    done = await store.executions.get(tenant, second.id, with_steps=True)
    # copies of copies point at the execution they were copied from
    assert [s.reused_from for s in done.steps] == [first.id, first.id, None, None]


async def test_retry_from_failed_refusals(store: Store, allowed: Settings, target: Target) -> None:
    tenant, failed_id = await _failed_at_b(store, allowed, target)
    other, _ = await start(store, [{"id": "x", "type": "noop"}])
    with pytest.raises(NotFound):  # another tenant's execution
        await store.executions.retry_from(other, failed_id, start="failed")

    _, queued_id = await start(store, [{"id": "x", "type": "noop"}], tenant_id=tenant)
    with pytest.raises(Conflict, match="only failed executions"):
        await store.executions.retry_from(tenant, queued_id, start="failed")
    with pytest.raises(Conflict, match="only failed or cancelled"):
        await store.executions.retry_from(tenant, queued_id, start="start")
    await store.executions.cancel(tenant, queued_id)
    with pytest.raises(Conflict, match="not cancelled"):
        await store.executions.retry_from(tenant, queued_id, start="failed")
    _, done_id = await start(store, [{"id": "x", "type": "noop"}], tenant_id=tenant)
    assert await _run(store, allowed, done_id) is OutcomeKind.SUCCEEDED
    with pytest.raises(Conflict, match="not succeeded"):
        await store.executions.retry_from(tenant, done_id, start="failed")


async def test_idempotency_key_returns_the_same_retry(
    store: Store, allowed: Settings, target: Target
) -> None:
    tenant, failed_id = await _failed_at_b(store, allowed, target)
    first, created = await store.executions.retry_from(
        tenant, failed_id, start="failed", idempotency_key="k1"
    )
    again, created_again = await store.executions.retry_from(
        tenant, failed_id, start="failed", idempotency_key="k1"
    )
    assert created and not created_again and again.id == first.id
    assert again.idempotency_key == "k1"
    # the key of a trigger, or of a retry of another execution, is not this retry's
    _, other_id = await start(store, [{"id": "x", "type": "noop"}], tenant_id=tenant)
    with pytest.raises(Conflict, match="idempotency key already used"):
        await store.executions.retry_from(tenant, other_id, idempotency_key="k1")
    # one retry was made, with its copies
    steps = await store.executions.step_runs(tenant, first.id)
    assert [s.step_id for s in steps] == ["a", "shape"]
