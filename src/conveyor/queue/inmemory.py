"""The ``inmemory`` driver (``QUEUE_DRIVER=inmemory``): for isolated unit tests only.

It honours the same interface and the behaviour tests rely on: concurrency, job ids
(adding an existing id is a no-op), priorities (none first, then 1 = highest), delays,
attempts with backoff, ``JobDeferred`` (no attempt used), ``UnrecoverableError`` /
``PayloadInvalid`` (no retry), events (``added``, ``waiting``, ``active``, ``delayed``,
``completed``, ``failed``, ``stalled``) and job counts. Nothing survives the process:
it reports itself as not durable and readiness fails with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from bullmq.custom_errors import UnrecoverableError
from pydantic import BaseModel

from conveyor.errors import PayloadInvalid
from conveyor.queue._base import (
    JOB_COUNT_STATES,
    EventHandler,
    JobContext,
    JobDeferred,
    Processor,
    QueueEvent,
    ScriptCall,
    parked_before,
)
from conveyor.queue._emitter import Emitter
from conveyor.queue.payloads import PayloadSpec, job_options
from conveyor.settings import Settings

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Job:
    id: str
    name: str
    data: Any
    opts: dict[str, Any]
    timestamp: int
    state: str = "waiting"
    attempts_made: int = 0
    priority: int = 0
    run_at: float = 0.0
    failed_reason: str | None = None
    returnvalue: Any = None


@dataclass
class _QueueState:
    """One queue's jobs, shared by every handle the factory made for that name."""

    name: str
    jobs: dict[str, _Job] = field(default_factory=dict)
    wait: deque[str] = field(default_factory=deque)
    prioritized: list[tuple[int, int, str]] = field(default_factory=list)
    delayed: list[tuple[float, int, str]] = field(default_factory=list)
    finished: dict[str, deque[str]] = field(
        default_factory=lambda: {"completed": deque(), "failed": deque()}
    )
    counts: Counter[str] = field(default_factory=Counter)
    seq: itertools.count[int] = field(default_factory=itertools.count)
    ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    signal: asyncio.Event = field(default_factory=asyncio.Event)
    paused: bool = False
    listeners: set[MemoryQueueEvents] = field(default_factory=set)

    def publish(self, event: str, job_id: str | None = None, **data: Any) -> None:
        for listener in tuple(self.listeners):
            listener.deliver(QueueEvent(event, self.name, job_id, data))

    def notify(self) -> None:
        old, self.signal = self.signal, asyncio.Event()
        old.set()

    def set_state(self, job: _Job, state: str) -> None:
        self.counts[job.state] -= 1
        job.state = state
        self.counts[state] += 1

    def enqueue(self, job: _Job) -> None:
        """Make ``job`` runnable now (waiting, or prioritized when it has a priority)."""
        if job.priority:
            self.set_state(job, "prioritized")
            heapq.heappush(self.prioritized, (job.priority, next(self.seq), job.id))
        else:
            self.set_state(job, "waiting")
            self.wait.append(job.id)
        self.publish("waiting", job.id)
        self.notify()

    def delay(self, job: _Job, delay_ms: int) -> None:
        self.set_state(job, "delayed")
        job.run_at = time.monotonic() + delay_ms / 1000.0
        heapq.heappush(self.delayed, (job.run_at, next(self.seq), job.id))
        self.publish("delayed", job.id, delay=delay_ms)
        self.notify()

    def promote_due(self) -> float | None:
        """Move due delayed jobs to waiting; return seconds until the next one is due."""
        now = time.monotonic()
        while self.delayed:
            run_at, _, job_id = self.delayed[0]
            job = self.jobs.get(job_id)
            if job is None or job.state != "delayed" or job.run_at != run_at:
                heapq.heappop(self.delayed)
                continue
            if run_at > now:
                return run_at - now
            heapq.heappop(self.delayed)
            self.enqueue(job)
        return None

    def take(self) -> _Job | None:
        if self.paused:
            return None
        while self.wait:
            job = self.jobs.get(self.wait.popleft())
            if job is not None and job.state == "waiting":
                return job
        while self.prioritized:
            priority, _, job_id = heapq.heappop(self.prioritized)
            job = self.jobs.get(job_id)
            if job is not None and job.state == "prioritized" and job.priority == priority:
                return job  # (an entry left behind by change_priority has the old priority)
        return None

    def change_priority(self, job_id: str, priority: int) -> None:
        """Re-rank a waiting job (as BullMQ does: it goes behind its new equals)."""
        job = self.jobs.get(job_id)
        if job is None or job.state not in ("waiting", "prioritized"):
            return
        if job.state == "waiting":
            with contextlib.suppress(ValueError):
                self.wait.remove(job_id)
        job.priority = priority
        self.enqueue(job)

    def finish(self, job: _Job, state: str, keep: Any) -> None:
        self.set_state(job, state)
        done = self.finished[state]
        done.append(job.id)
        limit = _keep_count(keep)
        while limit is not None and len(done) > limit:
            self.drop(done.popleft())

    def drop(self, job_id: str) -> bool:
        job = self.jobs.pop(job_id, None)
        if job is None:
            return False
        self.counts[job.state] -= 1
        return True


def _keep_count(keep: Any) -> int | None:
    if keep is True:
        return 0
    if keep is False or keep is None:
        return None
    if isinstance(keep, int):
        return keep
    if isinstance(keep, Mapping):
        return keep.get("count")
    return None


class Broker:
    """All in-memory queues of one factory."""

    def __init__(self) -> None:
        self._queues: dict[str, _QueueState] = {}

    def state(self, name: str) -> _QueueState:
        st = self._queues.get(name)
        if st is None:
            st = self._queues[name] = _QueueState(name)
        return st


class MemoryQueue:
    def __init__(
        self,
        name: str,
        spec: PayloadSpec,
        settings: Settings,
        broker: Broker,
        redis: Callable[[], aioredis.Redis] | None = None,
    ) -> None:
        self._name = name
        self._spec = spec
        self._settings = settings
        self._state = broker.state(name)
        self._emitter = Emitter(f"queue[{name}]")
        self._redis = redis
        """Where :meth:`add_after` runs its script (the factory's client: Conveyor's own keys
        live in Redis also when the queue itself is in memory)."""

    @property
    def name(self) -> str:
        return self._name

    @property
    def settings(self) -> Settings:
        return self._settings

    def on(self, event: str, handler: EventHandler) -> None:
        """Local events: ``waiting`` for each job added through this handle."""
        self._emitter.on(event, handler)

    def off(self, event: str, handler: EventHandler) -> None:
        self._emitter.off(event, handler)

    async def add(
        self,
        payload: BaseModel | Mapping[str, Any],
        *,
        job_id: str | None = None,
        priority: int = 0,
        delay_ms: int = 0,
    ) -> str:
        return self._add(payload, {"job_id": job_id, "priority": priority, "delay_ms": delay_ms})

    async def add_bulk(
        self, items: Sequence[tuple[BaseModel | Mapping[str, Any], Mapping[str, Any]]]
    ) -> list[str]:
        return [self._add(payload, options) for payload, options in items]

    async def add_after(
        self,
        call: ScriptCall,
        payload: BaseModel | Mapping[str, Any],
        *,
        job_id: str,
        priority: int = 0,
    ) -> tuple[Any, str]:
        """The script runs on the factory's Redis; then the job is added here."""
        if self._redis is None:
            raise RuntimeError("this in-memory queue has no Redis to run scripts on")
        script = self._redis().register_script(call.source)
        result = await script(keys=list(call.keys), args=list(call.args))
        return result, self._add(payload, {"job_id": job_id, "priority": priority})

    async def change_priority(self, job_id: str, priority: int) -> None:
        self._state.change_priority(job_id, priority)

    async def is_paused(self) -> bool:
        return self._state.paused

    async def pause(self) -> None:
        self._state.paused = True
        self._state.publish("paused")

    async def resume(self) -> None:
        self._state.paused = False
        self._state.publish("resumed")
        self._state.notify()

    def add_raw(self, data: Any, job_id: str | None = None) -> str:
        """Enqueue ``data`` without validation, as a foreign producer could (for tests)."""
        return self._put(json.loads(json.dumps(data)), {"jobId": job_id} if job_id else {})

    def _add(self, payload: BaseModel | Mapping[str, Any], options: Mapping[str, Any]) -> str:
        model, data = self._spec.dump(self._name, payload)
        return self._put(data, job_options(self._spec, model, options))

    def _put(self, data: Any, opts: dict[str, Any]) -> str:
        st = self._state
        job_id = opts.get("jobId") or str(next(st.ids))
        if job_id in st.jobs:
            return job_id
        merged = {**self._spec.options_for(self._settings), **opts}
        job = _Job(job_id, self._spec.base_name, data, merged, int(time.time() * 1000))
        job.priority = int(merged.get("priority") or 0)
        st.jobs[job_id] = job
        st.counts["waiting"] += 1
        st.publish("added", job_id, name=job.name)
        delay = int(merged.get("delay") or 0)
        if delay:
            st.delay(job, delay)
        else:
            st.enqueue(job)
        self._emitter.emit(QueueEvent("waiting", self._name, job_id, {"name": job.name}))
        return job_id

    async def get_job_counts(self, *states: str) -> dict[str, int]:
        return {s: max(self._state.counts[s], 0) for s in (states or JOB_COUNT_STATES)}

    async def get_job_state(self, job_id: str) -> str | None:
        job = self._state.jobs.get(job_id)
        return job.state if job is not None else None

    async def promote(self, job_id: str) -> bool:
        job = self._state.jobs.get(job_id)
        if job is None or job.state != "delayed":
            return False
        self._state.enqueue(job)
        return True

    async def remove(self, job_id: str) -> bool:
        job = self._state.jobs.get(job_id)
        if job is None or job.state == "active":
            return False
        self._state.drop(job_id)
        self._state.publish("removed", job_id)
        return True

    async def close(self) -> None:
        pass


class MemoryWorker:
    def __init__(
        self,
        name: str,
        processor: Processor,
        *,
        spec: PayloadSpec,
        settings: Settings,
        broker: Broker,
        concurrency: int = 1,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self._name = name
        self._spec = spec
        self._processor = processor
        self._settings = settings
        self._state = broker.state(name)
        self._concurrency = concurrency
        self._tasks: dict[asyncio.Task[None], _Job] = {}
        self._emitter = Emitter(f"worker[{name}]")
        self._closing = False
        self._running = False
        self._closed = asyncio.Event()

    @property
    def name(self) -> str:
        return self._name

    @property
    def active_count(self) -> int:
        return len(self._tasks)

    def on(self, event: str, handler: EventHandler) -> None:
        self._emitter.on(event, handler)

    def off(self, event: str, handler: EventHandler) -> None:
        self._emitter.off(event, handler)

    async def run(self) -> None:
        if self._closing:
            return
        if self._running:
            raise RuntimeError(f"worker for {self._name} is already running")
        self._running = True
        st = self._state
        while not self._closing:
            signal = st.signal
            next_due = st.promote_due()
            while len(self._tasks) < self._concurrency and not self._closing:
                job = st.take()
                if job is None:
                    break
                self._start(job)
            timeout = 1.0 if next_due is None else min(next_due, 1.0)
            try:
                async with asyncio.timeout(timeout):
                    await signal.wait()
            except TimeoutError:
                pass
        await self._closed.wait()

    def _start(self, job: _Job) -> None:
        self._state.set_state(job, "active")
        self._state.publish("active", job.id, prev="waiting")
        self._emitter.emit(QueueEvent("active", self._name, job.id))
        task = asyncio.get_running_loop().create_task(
            self._run_job(job), name=f"inmemory.job[{job.id}]"
        )
        self._tasks[task] = job
        task.add_done_callback(self._job_done)

    def _job_done(self, task: asyncio.Task[None]) -> None:
        job = self._tasks.pop(task)
        if task.cancelled() and job.state == "active":
            # Like a worker that died: the job is stalled and goes back to waiting.
            self._state.publish("stalled", job.id)
            self._emitter.emit(QueueEvent("stalled", self._name, job.id))
            self._state.enqueue(job)
        self._state.notify()

    async def _run_job(self, job: _Job) -> None:
        st = self._state
        parked = parked_before(job.data)
        ctx = JobContext(
            job.id, job.name, self._name, job.attempts_made, job.timestamp, parked=parked
        )
        try:
            payload = self._spec.validate(self._name, job.data)
            result = await self._processor(payload, ctx)
        except JobDeferred as deferred:
            if deferred.note and isinstance(job.data, dict):
                job.data = {**job.data, **deferred.note}
            st.delay(job, deferred.delay_ms)
        except (PayloadInvalid, UnrecoverableError) as exc:
            self._fail(job, exc, final=True)
        except Exception as exc:
            self._fail(job, exc, final=False)
        else:
            if isinstance(result, BaseModel):
                result = result.model_dump(mode="json", by_alias=True)
            job.returnvalue = json.loads(json.dumps(result))
            job.attempts_made += 1
            st.finish(job, "completed", job.opts.get("removeOnComplete"))
            st.publish("completed", job.id, returnvalue=job.returnvalue)
            self._emitter.emit(
                QueueEvent("completed", self._name, job.id, {"returnvalue": job.returnvalue})
            )

    def _fail(self, job: _Job, exc: BaseException, *, final: bool) -> None:
        st = self._state
        job.attempts_made += 1
        job.failed_reason = str(exc) or type(exc).__name__
        attempts = int(job.opts.get("attempts") or 1)
        if not final and job.attempts_made < attempts:
            delay = _backoff_ms(job.opts.get("backoff"), job.attempts_made)
            if delay:
                st.delay(job, delay)
            else:
                st.enqueue(job)
            return
        st.finish(job, "failed", job.opts.get("removeOnFail"))
        st.publish("failed", job.id, failedReason=job.failed_reason)
        self._emitter.emit(
            QueueEvent("failed", self._name, job.id, {"failedReason": job.failed_reason}, error=exc)
        )

    async def close(self, timeout_s: float | None = None) -> None:
        if self._closing:
            await self._closed.wait()
            return
        self._closing = True
        self._state.notify()
        grace = self._settings.shutdown_grace_s if timeout_s is None else timeout_s
        tasks = set(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=5)
        self._emitter.clear()
        self._closed.set()


def _backoff_ms(backoff: Any, attempts_made: int) -> int:
    if isinstance(backoff, int):
        return backoff
    if not isinstance(backoff, Mapping):
        return 0
    delay = int(backoff.get("delay", 0))
    if backoff.get("type") == "exponential":
        return int(delay * 2 ** (attempts_made - 1))
    return delay


class MemoryQueueEvents:
    def __init__(self, name: str, broker: Broker) -> None:
        self._name = name
        self._state = broker.state(name)
        self._emitter = Emitter(f"queue_events[{name}]")
        self._closed = asyncio.Event()
        self._state.listeners.add(self)

    @property
    def name(self) -> str:
        return self._name

    def deliver(self, event: QueueEvent) -> None:
        if self._emitter.has(event.name):
            self._emitter.emit(event)

    def on(self, event: str, handler: EventHandler) -> None:
        self._emitter.on(event, handler)

    def off(self, event: str, handler: EventHandler) -> None:
        self._emitter.off(event, handler)

    def start(self) -> None:
        """Events flow as soon as the object exists; nothing to start."""

    async def run(self) -> None:
        await self._closed.wait()

    async def close(self) -> None:
        self._state.listeners.discard(self)
        self._emitter.clear()
        self._closed.set()
