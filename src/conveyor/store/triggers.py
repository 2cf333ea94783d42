"""Triggering: creating a ``queued`` execution of a workflow's current version.

An execution is created ``queued`` and committed before its job is enqueued (the caller's
job). ``Idempotency-Key``: ``UNIQUE (tenant_id, idempotency_key)``; a second create with the
same key returns the first execution (``created=False``) — or raises ``Conflict`` when the key
was used for another workflow.

The trigger is the API's hottest path: a workflow whose current version this process has seen
(and whose definition is cached) is triggered with ONE statement
(:meth:`~conveyor.store.statements.Statements.trigger`); anything else takes the general path,
which raises the same errors in the same order. Concurrent one-statement triggers share that
statement and its commit (group commit: :class:`~conveyor.store._group_commit.GroupCommit`,
:meth:`~conveyor.store.statements.Statements.trigger_many`); a lone trigger is sent at once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, cast

from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.errors import Conflict, ConveyorError, DatabaseUnavailable, InputInvalid, NotFound
from conveyor.settings import Settings
from conveyor.store._base import ServiceBase
from conveyor.store._group_commit import GroupCommit, each_alone
from conveyor.store._types import check_storable, dumps, new_id, utcnow
from conveyor.store.records import Execution
from conveyor.store.statements import Statements, TriggerRequest
from conveyor.store.workflows import WorkflowService
from conveyor.workflows.definition import validate_input

__all__ = ["TriggerService", "insert_values", "new_execution"]

VERSION_HINTS = 10_000
"""Most (tenant, workflow) version hints kept for the one-statement trigger."""


def new_execution(
    *,
    tenant_id: str,
    workflow_id: str,
    version: int,
    region: str,
    input: Any,
    triggered_by: str,
    now: datetime,
    idempotency_key: str | None = None,
    schedule_id: str | None = None,
    retry_of: str | None = None,
    execution_id: str | None = None,
    scheduled_for: datetime | None = None,
) -> Execution:
    """A fresh ``queued`` execution record (not yet stored); ``scheduled_for`` is the tick
    instant of a schedule's execution."""
    return Execution(
        id=execution_id or new_id(),
        tenant_id=tenant_id,
        workflow_id=workflow_id,
        workflow_version=version,
        status="queued",
        region=region,
        triggered_by=triggered_by,
        input=input,
        output=None,
        error=None,
        next_step=0,
        steps_run=0,
        attempts=0,
        lease=0,
        lease_expires_at=None,
        wake_at=None,
        idempotency_key=idempotency_key,
        schedule_id=schedule_id,
        retry_of=retry_of,
        created_at=now,
        queued_at=now,
        enqueued_at=None,
        started_at=None,
        finished_at=None,
        updated_at=now,
        scheduled_for=scheduled_for,
    )


def insert_values(execution: Execution) -> dict[str, Any]:
    return {
        "id": execution.id,
        "tenant_id": execution.tenant_id,
        "workflow_id": execution.workflow_id,
        "workflow_version": execution.workflow_version,
        "status": execution.status,
        "region": execution.region,
        "triggered_by": execution.triggered_by,
        "input": execution.input,
        "idempotency_key": execution.idempotency_key,
        "schedule_id": execution.schedule_id,
        "retry_of": execution.retry_of,
        "scheduled_for": execution.scheduled_for,
        "created_at": execution.created_at,
        "queued_at": execution.queued_at,
        "updated_at": execution.updated_at,
    }


def _check_input(value: Any) -> None:
    """Refuse input no backend can store (NaN, NUL characters) with ``InputInvalid``."""
    try:
        check_storable(value, "input")
    except ValueError as exc:
        error = InputInvalid(str(exc))
        error.details = cast(Any, [{"field": "", "message": str(exc)}])
        raise error from None


def _input_json(value: Any) -> str | None:
    """``value`` as the JSON text to store (``None`` for SQL NULL), checked like
    :func:`_check_input`."""
    if value is None:
        return None
    _check_input(value)
    return dumps(value)


_Triggered = Mapping[str, Any] | None | ConveyorError
"""A trigger's answer in a batch: the workflow's row (see ``Statements.trigger``), ``None``
(no such live workflow), or the error the database gave for this request alone."""


class TriggerService(ServiceBase):
    """Creates executions (``store.executions.create`` delegates here)."""

    def __init__(
        self,
        engine: AsyncEngine,
        settings: Settings,
        statements: Statements,
        workflows: WorkflowService,
    ) -> None:
        super().__init__(engine, settings, statements)
        self._workflows = workflows
        # (tenant, workflow) -> last current version seen: a hint only (the one-statement
        # trigger re-checks it in SQL), so it may be stale or come from another tenant's miss.
        self._versions: dict[tuple[str, str], int] = {}
        self.group_commit: GroupCommit[TriggerRequest, _Triggered] = GroupCommit(
            self._trigger_one, self._trigger_many, name="store.trigger_batch"
        )
        # Replays (idempotency key already used) read their executions together, too.
        self.replays: GroupCommit[tuple[str, str], Execution | None] = GroupCommit(
            self._by_key_one, self._by_keys, name="store.replay_batch"
        )

    async def _by_keys(self, keys: Sequence[tuple[str, str]]) -> list[Execution | None]:
        found = await self._statements.executions_by_keys(list(dict.fromkeys(keys)))
        return [found.get(key) for key in keys]

    async def _trigger_many(self, requests: Sequence[TriggerRequest]) -> Sequence[_Triggered]:
        """One statement for the batch; refused (for one request's sake: a value the database
        will not store), one statement per request, each answered alone (:func:`each_alone`)
        — a request never fails, nor sees, another's (another tenant's) input."""
        try:
            return await self._statements.trigger_many(requests)
        except DatabaseUnavailable:
            raise
        except ConveyorError:
            return await each_alone(requests, self._trigger_one)

    async def _trigger_one(self, r: TriggerRequest) -> Mapping[str, Any] | None:
        return await self._statements.trigger(
            r.execution_id,
            r.tenant_id,
            r.workflow_id,
            r.version,
            triggered_by=r.triggered_by,
            input=r.input,
            input_json=r.input_json,
            idempotency_key=r.idempotency_key,
            now=r.now,
        )

    async def create(
        self,
        tenant_id: str,
        workflow_id: str,
        input: Any = None,
        *,
        idempotency_key: str | None = None,
        triggered_by: str = "api",
    ) -> tuple[Execution, bool]:
        """Create a ``queued`` execution of the workflow's current version.

        Returns ``(execution, created)``; ``created`` is False when ``idempotency_key`` was
        already used (the earlier execution is returned). Raises NotFound (no such workflow for
        this tenant), Conflict (workflow disabled; key used for another workflow) and
        ``InputInvalid`` (input does not match the workflow's input schema).

        Triggering a workflow whose current version this process has already seen (and whose
        definition is cached) is ONE statement: the input is validated against that version
        first and the row is inserted only if it is still current. Anything else (first
        trigger, a new version, invalid input, an idempotent replay) takes the general path,
        which raises the same errors in the same order.
        """
        done = await self._create_known(
            tenant_id, workflow_id, input, idempotency_key, triggered_by
        )
        if done is not None:
            return done
        found = await self._trigger_target(tenant_id, workflow_id)
        if found is None:
            raise NotFound("workflow not found", workflow_id=workflow_id)
        version, region, enabled = found
        if idempotency_key is not None:  # a replay answers what the first request got, even
            # if the workflow was disabled or given a new input schema since
            earlier = await self._by_key(tenant_id, idempotency_key)
            if earlier is not None:
                return _replayed(earlier, workflow_id, idempotency_key)
        if not enabled:
            raise Conflict("workflow is disabled", workflow_id=workflow_id)
        definition = await self._workflows.get_definition(tenant_id, workflow_id, version)
        _check_input(input)
        validate_input(definition, input)
        execution = new_execution(
            tenant_id=tenant_id,
            workflow_id=workflow_id,
            version=version,
            region=region,
            input=input,
            triggered_by=triggered_by,
            now=utcnow(),
            idempotency_key=idempotency_key,
        )
        if await self._insert_new(execution):
            return execution, True
        assert idempotency_key is not None
        return await self._replay(tenant_id, workflow_id, idempotency_key)

    async def _create_known(
        self,
        tenant_id: str,
        workflow_id: str,
        input: Any,
        idempotency_key: str | None,
        triggered_by: str,
    ) -> tuple[Execution, bool] | None:
        """The one-statement trigger; ``None`` when the general path must decide."""
        target = (tenant_id, workflow_id)
        version = self._versions.get(target)
        if version is None:
            return None
        definition = self._workflows.cache.get((tenant_id, workflow_id, version))
        if definition is None:
            return None
        try:
            input_json = _input_json(input)
            validate_input(definition, input)
        except InputInvalid:
            return None  # raised by the general path, after its NotFound/Conflict checks
        now = utcnow()
        execution_id = new_id()
        row = await self.group_commit.submit(
            TriggerRequest(
                execution_id=execution_id,
                tenant_id=tenant_id,
                workflow_id=workflow_id,
                version=version,
                triggered_by=triggered_by,
                input=input,
                input_json=input_json,
                idempotency_key=idempotency_key,
                now=now,
            )
        )
        if isinstance(row, ConveyorError):
            raise row
        if row is None:
            self._versions.pop(target, None)
            raise NotFound("workflow not found", workflow_id=workflow_id)
        current, region = int(row["current_version"]), str(row["region"])
        self._remember_version(target, current)
        if not row["enabled"]:
            if idempotency_key is not None:  # a replay, whatever happened to the workflow since
                earlier = await self._by_key(tenant_id, idempotency_key)
                if earlier is not None:
                    return _replayed(earlier, workflow_id, idempotency_key)
            raise Conflict("workflow is disabled", workflow_id=workflow_id)
        if row["inserted"]:
            execution = new_execution(
                tenant_id=tenant_id,
                workflow_id=workflow_id,
                version=current,
                region=region,
                input=input,
                triggered_by=triggered_by,
                now=now,
                idempotency_key=idempotency_key,
                execution_id=execution_id,
            )
            return execution, True
        if current != version:
            return None  # a new version since: validate the input against it first
        assert idempotency_key is not None
        return await self._replay(tenant_id, workflow_id, idempotency_key)

    async def _replay(
        self, tenant_id: str, workflow_id: str, idempotency_key: str
    ) -> tuple[Execution, bool]:
        """The execution created earlier with ``idempotency_key`` (``created=False``)."""
        earlier = await self._by_key(tenant_id, idempotency_key)
        if earlier is None:  # deleted in between: extremely unlikely; let the caller retry
            raise Conflict("idempotency key race, try again", idempotency_key=idempotency_key)
        return _replayed(earlier, workflow_id, idempotency_key)

    def _remember_version(self, target: tuple[str, str], version: int) -> None:
        """Note a workflow's current version: the next trigger of it can be one statement."""
        if target not in self._versions and len(self._versions) >= VERSION_HINTS:
            self._versions.clear()
        self._versions[target] = version

    async def _trigger_target(
        self, tenant_id: str, workflow_id: str
    ) -> tuple[int, str, bool] | None:
        """(current version, region, enabled) of a live workflow of this tenant."""
        row = await self._statements.trigger_target(tenant_id, workflow_id)
        if row is None:
            return None
        version = int(row["current_version"])
        self._remember_version((tenant_id, workflow_id), version)
        return version, str(row["region"]), bool(row["enabled"])

    async def _insert_new(self, execution: Execution) -> bool:
        """Insert; False if its idempotency key was already used."""
        return await self._statements.insert_execution(execution)

    async def _by_key(self, tenant_id: str, key: str) -> Execution | None:
        return await self.replays.submit((tenant_id, key))

    async def _by_key_one(self, key: tuple[str, str]) -> Execution | None:
        return await self._statements.execution_by_key(*key)


def _replayed(earlier: Execution, workflow_id: str, key: str) -> tuple[Execution, bool]:
    """The execution an idempotency key made first, as a replay's answer (``created=False``);
    ``Conflict`` when the key was used for another workflow."""
    if earlier.workflow_id != workflow_id:
        raise Conflict(
            "idempotency key already used for another workflow",
            idempotency_key=key,
            execution_id=earlier.id,
        )
    return earlier, False
