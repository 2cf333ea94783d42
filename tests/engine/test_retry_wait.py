"""Durable retry backoff on both backends, with an injected clock (no sleeps): a failing
``http`` step against a real local server waits for its next try on a timer row (execution
``waiting``, no lease held), resumes at the next attempt with the history restored; the pure
steps before it are recorded with the wait; ``retry_on`` / ``retry_statuses`` decide what is
retried; a cancelled wait is not resumed."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from conveyor.engine import Engine, OutcomeKind, RunOutcome
from conveyor.settings import Settings
from conveyor.store import Store
from tests.engine._script import Script, scripted_target
from tests.engine._support import start
from tests.store._fixtures import settings_for


@pytest.fixture
def target() -> Iterator[Script]:
    with scripted_target() as running:
        yield running


@pytest.fixture
def allowed(settings: Settings) -> Settings:
    return settings_for(settings.database_url, http_allowlist="127.0.0.1")


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2030, 1, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


def _http(step_id: str, url: str, **retry: Any) -> dict[str, Any]:
    return {"id": step_id, "type": "http", "url": url, "timeout_s": 10, "retry": retry}


async def _run(store: Store, settings: Settings, clock: Clock, execution_id: str) -> RunOutcome:
    async with Engine(store, settings, clock=clock) as engine:
        return await engine.run(execution_id)


async def test_a_retry_waits_on_a_timer_and_resumes_at_the_next_attempt(
    store: Store, allowed: Settings, target: Script
) -> None:
    clock = Clock()
    t0 = clock.now
    url = target.url("/flaky", 500, 500, 200)
    tenant, execution_id = await start(
        store,
        [
            {"id": "a", "type": "noop"},
            {"id": "shape", "type": "transform", "expression": "input.n"},
            _http("call", url, attempts=3, backoff="fixed", delay_s=5),
            {"id": "after", "type": "transform", "expression": "steps.call.status"},
        ],
        {"n": 1},
    )

    parked = await _run(store, allowed, clock, execution_id)
    assert parked.kind is OutcomeKind.WAITING and parked.wake_at == t0 + timedelta(seconds=5)
    assert target.hits["/flaky"] == 1
    waiting = await store.executions.get(tenant, execution_id, with_steps=True)
    # no worker slot held: parked, no lease; the pure steps before rode with the wait's write
    assert (waiting.status, waiting.lease_expires_at, waiting.wake_at) == (
        "waiting", None, parked.wake_at
    )  # fmt: skip
    assert [s.step_id for s in waiting.steps] == ["a", "shape"] and waiting.next_step == 2
    assert waiting.step_attempt == 1
    assert [(e["attempt"], e["details"]["status"]) for e in waiting.step_errors] == [(1, 500)]
    timers = await store.timers.for_execution(tenant, execution_id)
    assert [(t.status, t.due_at, t.seq) for t in timers] == [("pending", parked.wake_at, 2)]
    assert parked.timer_id == timers[0].id

    clock.advance(4)
    early = await _run(store, allowed, clock, execution_id)
    assert early.kind is OutcomeKind.NOT_DUE and target.hits["/flaky"] == 1

    clock.advance(1)
    again = await _run(store, allowed, clock, execution_id)
    assert again.kind is OutcomeKind.WAITING and again.wake_at == t0 + timedelta(seconds=10)
    assert target.hits["/flaky"] == 2
    second = await store.executions.get(tenant, execution_id)
    assert second.step_attempt == 2 and [e["attempt"] for e in second.step_errors] == [1, 2]
    # the step's timer row is taken over by its next wait
    timers = await store.timers.for_execution(tenant, execution_id)
    assert [(t.id, t.status, t.due_at) for t in timers] == [
        (again.timer_id, "pending", again.wake_at)
    ]
    assert again.timer_id != parked.timer_id

    clock.advance(5)
    done_run = await _run(store, allowed, clock, execution_id)
    assert done_run.kind is OutcomeKind.SUCCEEDED and target.hits["/flaky"] == 3
    assert done_run.queue_latency_ms is None  # measured once, on the run that started it
    done = await store.executions.get(tenant, execution_id, with_steps=True)
    assert done.output == 200 and done.attempts == 1  # waiting for a retry is no new attempt
    assert (done.step_attempt, done.step_errors) == (0, None)
    call = done.steps[2]
    assert (call.step_id, call.status, call.attempts, call.error) == ("call", "succeeded", 3, None)
    assert call.started_at == t0 and call.finished_at == t0 + timedelta(seconds=10)
    assert [s.step_id for s in done.steps] == ["a", "shape", "call", "after"]


async def test_the_final_failure_lists_every_attempt(
    store: Store, allowed: Settings, target: Script
) -> None:
    clock = Clock()
    url = target.url("/down", 503, 500, 502)
    tenant, execution_id = await start(
        store, [_http("call", url, attempts=3, delay_s=2, backoff="exponential")]
    )
    assert (await _run(store, allowed, clock, execution_id)).wake_at == clock.now + timedelta(
        seconds=2
    )
    clock.advance(2)
    second = await _run(store, allowed, clock, execution_id)
    assert second.wake_at == clock.now + timedelta(seconds=4)  # exponential: 2, 4
    clock.advance(4)
    last = await _run(store, allowed, clock, execution_id)
    assert last.kind is OutcomeKind.FAILED and target.hits["/down"] == 3
    failed = await store.executions.get(tenant, execution_id, with_steps=True)
    (step,) = failed.steps
    assert (step.status, step.attempts) == ("failed", 3)
    attempts = [(a["attempt"], a["details"]["status"]) for a in step.error["attempts"]]
    assert attempts == [(1, 503), (2, 500), (3, 502)]
    assert failed.error["step"] == "call" and failed.error["details"]["status"] == 502
    assert (failed.step_attempt, failed.step_errors) == (0, None)
    assert [t.status for t in await store.timers.for_execution(tenant, execution_id)] == [
        "pending"  # fired by the dispatcher in production; here nobody claimed it
    ]


async def test_a_cancelled_retry_wait_is_not_resumed(
    store: Store, allowed: Settings, target: Script
) -> None:
    clock = Clock()
    url = target.url("/flaky", 500, 200)
    tenant, execution_id = await start(store, [_http("call", url, attempts=2, delay_s=30)])
    assert (await _run(store, allowed, clock, execution_id)).kind is OutcomeKind.WAITING
    cancelled = await store.executions.cancel(tenant, execution_id)
    assert cancelled.status == "cancelled" and cancelled.wake_at is None
    assert [t.status for t in await store.timers.for_execution(tenant, execution_id)] == [
        "cancelled"
    ]
    clock.advance(31)
    assert (await _run(store, allowed, clock, execution_id)).kind is OutcomeKind.SKIPPED
    assert target.hits["/flaky"] == 1


async def test_short_waits_stay_in_the_worker(
    store: Store, allowed: Settings, target: Script
) -> None:
    """Below DURABLE_RETRY_MIN_S (1 s) the worker sleeps: no timer, one run."""
    clock = Clock()
    url = target.url("/flaky", 500, 200)
    tenant, execution_id = await start(store, [_http("call", url, attempts=2, delay_s=0.01)])
    outcome = await _run(store, allowed, clock, execution_id)
    assert outcome.kind is OutcomeKind.SUCCEEDED and target.hits["/flaky"] == 2
    assert await store.timers.for_execution(tenant, execution_id) == []


@pytest.mark.parametrize(
    ("statuses", "retry", "hits"),
    [
        ((404, 200), {}, 1),  # a 404 is permanent by default
        ((404, 200), {"retry_statuses": [404]}, 2),  # unless listed
        ((404, 200), {"retry_statuses": ["4xx"]}, 2),  # or its class is
        ((500, 200), {"retry_statuses": [404]}, 1),  # the list replaces the defaults
        ((500, 200), {"retry_statuses": ["5xx"]}, 2),
        ((429, 200), {}, 2),  # 408, 425, 429 and 5xx by default
        ((500, 200), {"retry_on": ["timeout", "connection"]}, 1),  # statuses not retried
        ((500, 200), {"retry_on": ["status"]}, 2),
        ((404, 200), {"retry_on": ["status"], "retry_statuses": [404]}, 2),
    ],
)
async def test_retry_on_and_retry_statuses_decide_what_is_retried(
    store: Store,
    allowed: Settings,
    target: Script,
    statuses: tuple[int, ...],
    retry: dict[str, Any],
    hits: int,
) -> None:
    clock = Clock()
    url = target.url("/t", *statuses)
    tenant, execution_id = await start(store, [_http("call", url, attempts=2, delay_s=3, **retry)])
    first = await _run(store, allowed, clock, execution_id)
    if hits == 1:
        assert first.kind is OutcomeKind.FAILED and target.hits["/t"] == 1
        (step,) = (await store.executions.get(tenant, execution_id, with_steps=True)).steps
        assert step.attempts == 1 and step.error["details"]["status"] == statuses[0]
        return
    assert first.kind is OutcomeKind.WAITING
    clock.advance(3)
    assert (await _run(store, allowed, clock, execution_id)).kind is OutcomeKind.SUCCEEDED
    assert target.hits["/t"] == 2


async def test_retry_on_timeout_only_retries_timeouts(
    store: Store, allowed: Settings, target: Script
) -> None:
    """A connection error (nothing listens) is not a timeout."""
    clock = Clock()
    closed = "http://127.0.0.1:9/"  # discard port: refused
    tenant, execution_id = await start(
        store, [_http("call", closed, attempts=3, delay_s=3, retry_on=["timeout"])]
    )
    assert (await _run(store, allowed, clock, execution_id)).kind is OutcomeKind.FAILED
    (step,) = (await store.executions.get(tenant, execution_id, with_steps=True)).steps
    assert step.attempts == 1

    _, other = await start(
        store, [_http("call", closed, attempts=3, delay_s=3, retry_on=["connection"])], None,
        tenant,
    )  # fmt: skip
    assert (await _run(store, allowed, clock, other)).kind is OutcomeKind.WAITING


async def test_the_next_wait_takes_the_fired_timer_row_over(
    store: Store, allowed: Settings, target: Script
) -> None:
    """As the timer dispatcher sees it: the first wait's timer is claimed and enqueued, the
    next try fails before the dispatcher marks it fired — the mark then matches nothing and
    the next wait's timer (a new id, so a new ``timer:<id>`` job) is pending and claimable."""
    clock = Clock()
    url = target.url("/flaky", 500, 500, 200)
    tenant, execution_id = await start(store, [_http("call", url, attempts=3, delay_s=5)])
    first = await _run(store, allowed, clock, execution_id)
    clock.advance(5)
    (claimed,) = await store.timers.claim(clock(), owner="dispatcher")
    assert claimed.id == first.timer_id
    second = await _run(store, allowed, clock, execution_id)
    assert second.kind is OutcomeKind.WAITING and second.timer_id != first.timer_id
    assert await store.timers.mark_fired([claimed.id], owner="dispatcher", at=clock()) == 0
    assert await store.timers.claim(clock(), owner="dispatcher") == []  # not due yet
    clock.advance(10)
    (again,) = await store.timers.claim(clock(), owner="dispatcher")
    assert (again.id, again.seq, again.job_id) == (second.timer_id, 0, f"timer:{second.timer_id}")
    assert await store.timers.mark_fired([again.id], owner="dispatcher", at=clock()) == 1
    assert (await _run(store, allowed, clock, execution_id)).kind is OutcomeKind.SUCCEEDED
    assert target.hits["/flaky"] == 3
    timers = await store.timers.for_execution(tenant, execution_id)
    assert [(t.id, t.status) for t in timers] == [(second.timer_id, "fired")]
