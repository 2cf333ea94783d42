"""Helpers for engine tests: a recording step runner and quick set-up."""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

from conveyor.store import Store
from conveyor.workflows import StepContext, StepResult, run_step
from conveyor.workflows.steps import AnyStep

Hook = Callable[[StepContext, int], Awaitable[StepResult | None]]


class Recorder:
    """Counts step calls; a hook per step id may replace or precede the real runner."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.hooks: dict[str, Hook] = {}

    async def __call__(self, step: AnyStep, ctx: StepContext) -> StepResult:
        self.calls[step.id] += 1
        hook = self.hooks.get(step.id)
        if hook is not None:
            result = await hook(ctx, self.calls[step.id])
            if result is not None:
                return result
        return await run_step(step, ctx)


def slow_step(step_id: str) -> dict[str, Any]:
    """A step the engine treats as I/O-bound (an ``http`` step; tests hook its runner)."""
    return {"id": step_id, "type": "http", "url": "http://example.invalid/"}


async def start(
    store: Store, steps: list[dict[str, Any]], input: Any = None, tenant_id: str | None = None
) -> tuple[str, str]:
    """Create a tenant (unless given), a workflow of ``steps`` and one queued execution."""
    if tenant_id is None:
        tenant_id = (await store.tenants.create("acme")).id
    workflow = await store.workflows.create(tenant_id, {"name": "wf", "steps": steps})
    execution, _ = await store.executions.create(tenant_id, workflow.id, input)
    return tenant_id, execution.id
