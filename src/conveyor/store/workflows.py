"""Workflows and their immutable versions.

``create`` validates the definition with :func:`conveyor.workflows.parse_definition` and stores
version 1; ``update`` stores the next version and makes it current (executions keep running the
version they were triggered with). ``delete`` is a soft delete: the workflow disappears from
reads and cannot be triggered, its executions stay readable. Parsed versions are cached in
process (:class:`DefinitionCache`): a version never changes once written.
"""

from __future__ import annotations

import hmac
import secrets
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any, cast

from sqlalchemy import select, update
from sqlalchemy.engine import RowMapping
from sqlalchemy.ext.asyncio import AsyncEngine

from conveyor.errors import ConveyorError, NotFound, WorkflowInvalid
from conveyor.settings import Settings
from conveyor.store._base import ServiceBase
from conveyor.store._group_commit import GroupCommit
from conveyor.store._ticks import cancel_ticks_ahead, lock_schedules
from conveyor.store._types import check_storable, new_id, utcnow
from conveyor.store.records import Page, Workflow, WorkflowVersion
from conveyor.store.schema import schedules, tenants, workflow_versions, workflows
from conveyor.store.statements import Statements
from conveyor.store.tenants import hash_secret
from conveyor.workflows.definition import WorkflowDefinition, parse_definition

__all__ = ["DefinitionCache", "WorkflowService"]

VersionKey = tuple[str, str, int]
"""(tenant_id, workflow_id, version)."""
_Fetched = WorkflowDefinition | ConveyorError
"""A fetch's answer in a batch: the parsed version, or the error for it alone."""

WEBHOOK_SECRET_PREFIX = "whs"
_COLUMNS = (
    workflows.c.id,
    workflows.c.tenant_id,
    workflows.c.name,
    workflows.c.region,
    workflows.c.current_version,
    workflows.c.enabled,
    workflows.c.created_at,
    workflows.c.updated_at,
    workflows.c.deleted_at,
    workflows.c.webhook_secret_hash.is_not(None).label("has_webhook_secret"),
)


class DefinitionCache:
    """LRU cache of parsed workflow versions keyed by (tenant_id, workflow_id, version).

    ``maxsize`` is ``WORKFLOW_CACHE_SIZE``; entries are made only for versions used, so a large
    bound costs nothing until that many workflows run. ``hits`` / ``misses`` count lookups."""

    def __init__(self, maxsize: int = 10_000) -> None:
        self.maxsize = maxsize
        self._items: OrderedDict[VersionKey, WorkflowDefinition] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: VersionKey) -> WorkflowDefinition | None:
        found = self._items.get(key)
        if found is not None:
            self.hits += 1
            self._items.move_to_end(key)
        else:
            self.misses += 1
        return found

    def peek(self, key: VersionKey) -> WorkflowDefinition | None:
        """``get`` without counting or reordering."""
        return self._items.get(key)

    def put(self, key: VersionKey, definition: WorkflowDefinition) -> None:
        self._items[key] = definition
        self._items.move_to_end(key)
        while len(self._items) > self.maxsize:
            self._items.popitem(last=False)

    def __contains__(self, key: object) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)


class WorkflowService(ServiceBase):
    """Create, version, read, disable and delete workflows; verify webhook secrets."""

    def __init__(
        self,
        engine: AsyncEngine,
        settings: Settings,
        statements: Statements,
        cache: DefinitionCache,
    ) -> None:
        super().__init__(engine, settings, statements)
        self.cache = cache
        self.fetches: GroupCommit[VersionKey, _Fetched] = GroupCommit(
            self._fetch_one, self._fetch_many, name="store.definition_fetch"
        )
        """Cache misses of concurrent callers (e.g. the runs of one claimed batch) share ONE
        statement; its ``batches`` count is read by tests."""

    async def create(self, tenant_id: str, definition: Mapping[str, Any] | str | bytes) -> Workflow:
        """Validate and store a new workflow (version 1). Raises ``WorkflowInvalid``.

        The answer carries the workflow's webhook secret (shown once).
        """
        parsed, doc = _parse(definition)
        now = utcnow()
        workflow_id = new_id()
        secret = _new_webhook_secret()
        region = parsed.region or self._settings.default_region
        async with self._tx() as conn:
            exists = (
                await conn.execute(select(tenants.c.id).where(tenants.c.id == tenant_id))
            ).first()
            if exists is None:
                raise NotFound("tenant not found", tenant_id=tenant_id)
            await conn.execute(
                workflows.insert().values(
                    id=workflow_id,
                    tenant_id=tenant_id,
                    name=parsed.name,
                    region=region,
                    current_version=1,
                    enabled=True,
                    webhook_secret_hash=hash_secret(secret),
                    created_at=now,
                    updated_at=now,
                )
            )
            await conn.execute(
                workflow_versions.insert().values(
                    workflow_id=workflow_id,
                    version=1,
                    tenant_id=tenant_id,
                    definition=doc,
                    created_at=now,
                )
            )
        self.cache.put((tenant_id, workflow_id, 1), parsed)
        return Workflow(
            id=workflow_id,
            tenant_id=tenant_id,
            name=parsed.name,
            region=region,
            current_version=1,
            enabled=True,
            created_at=now,
            updated_at=now,
            deleted_at=None,
            definition=doc,
            has_webhook_secret=True,
            webhook_secret=secret,
        )

    async def update(
        self, tenant_id: str, workflow_id: str, definition: Mapping[str, Any] | str | bytes
    ) -> Workflow:
        """Store ``definition`` as the next version and make it current."""
        parsed, doc = _parse(definition)
        now = utcnow()
        region = parsed.region or self._settings.default_region
        async with self._tx() as conn:
            row = (
                await conn.execute(
                    update(workflows)
                    .where(
                        workflows.c.tenant_id == tenant_id,
                        workflows.c.id == workflow_id,
                        workflows.c.deleted_at.is_(None),
                    )
                    .values(
                        current_version=workflows.c.current_version + 1,
                        name=parsed.name,
                        region=region,
                        updated_at=now,
                    )
                    .returning(*_COLUMNS)
                )
            ).first()
            if row is None:
                raise NotFound("workflow not found", workflow_id=workflow_id)
            version = row.current_version
            await conn.execute(
                workflow_versions.insert().values(
                    workflow_id=workflow_id,
                    version=version,
                    tenant_id=tenant_id,
                    definition=doc,
                    created_at=now,
                )
            )
        self.cache.put((tenant_id, workflow_id, version), parsed)
        return Workflow.from_mapping(row._mapping, definition=doc)

    async def get(self, tenant_id: str, workflow_id: str) -> Workflow:
        """The workflow with its current definition; NotFound if absent, deleted or another
        tenant's."""
        query = (
            select(*_COLUMNS, workflow_versions.c.definition)
            .join(
                workflow_versions,
                (workflow_versions.c.workflow_id == workflows.c.id)
                & (workflow_versions.c.version == workflows.c.current_version),
            )
            .where(
                workflows.c.tenant_id == tenant_id,
                workflows.c.id == workflow_id,
                workflows.c.deleted_at.is_(None),
            )
        )
        async with self._auto() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            raise NotFound("workflow not found", workflow_id=workflow_id)
        return Workflow.from_mapping(row._mapping)

    async def get_version(self, tenant_id: str, workflow_id: str, version: int) -> WorkflowVersion:
        query = select(workflow_versions).where(
            workflow_versions.c.tenant_id == tenant_id,
            workflow_versions.c.workflow_id == workflow_id,
            workflow_versions.c.version == version,
        )
        async with self._auto() as conn:
            row = (await conn.execute(query)).first()
        if row is None:
            raise NotFound("workflow version not found", workflow_id=workflow_id, version=version)
        return WorkflowVersion.from_mapping(row._mapping)

    async def get_definition(
        self, tenant_id: str, workflow_id: str, version: int
    ) -> WorkflowDefinition:
        """The parsed definition of one version (cached in process; versions are immutable).

        Misses of concurrent callers go to the database together (:attr:`fetches`): one
        statement for a batch of versions, each parsed once."""
        key = (tenant_id, workflow_id, version)
        found = self.cache.get(key)
        if found is not None:
            return found
        fetched = await self.fetches.submit(key)
        if isinstance(fetched, ConveyorError):
            raise fetched
        return fetched

    async def _fetch_one(self, key: VersionKey) -> _Fetched:
        return (await self._fetch_many([key]))[0]

    async def _fetch_many(self, keys: Sequence[VersionKey]) -> list[_Fetched]:
        found: dict[VersionKey, _Fetched] = {}
        for key in keys:  # cached meanwhile (by an earlier batch, or a create/update)
            cached = self.cache.peek(key)
            if cached is not None:
                found[key] = cached
        missing = sorted({k for k in keys if k not in found})
        if missing:
            # three IN lists (one cached statement whatever the batch's size; tenant-scoped like
            # every query), then only the rows asked for (a workflow's other versions in the set
            # are read and dropped)
            c = workflow_versions.c
            query = select(c.tenant_id, c.workflow_id, c.version, c.definition).where(
                c.tenant_id.in_(sorted({t for t, _w, _v in missing})),
                c.workflow_id.in_(sorted({w for _t, w, _v in missing})),
                c.version.in_(sorted({v for _t, _w, v in missing})),
            )
            wanted = set(missing)
            async with self._auto() as conn:
                rows = (await conn.execute(query)).all()
            for row in rows:
                key = (row.tenant_id, row.workflow_id, row.version)
                if key not in wanted:
                    continue
                try:
                    parsed = parse_definition(row.definition)
                except WorkflowInvalid as exc:  # stored before a stricter release: this one fails
                    found[key] = exc
                    continue
                found[key] = parsed
                self.cache.put(key, parsed)
        return [found[key] if key in found else _not_found(key) for key in keys]

    async def list(
        self,
        tenant_id: str,
        *,
        limit: int = 50,
        cursor: str | None = None,
        enabled: bool | None = None,
    ) -> Page[Workflow]:
        """Workflows of ``tenant_id``, newest first (definitions not included)."""
        query = select(*_COLUMNS).where(
            workflows.c.tenant_id == tenant_id, workflows.c.deleted_at.is_(None)
        )
        if enabled is not None:
            query = query.where(workflows.c.enabled.is_(enabled))
        return await self._page(query, workflows, Workflow, limit=limit, cursor=cursor)

    async def set_enabled(self, tenant_id: str, workflow_id: str, enabled: bool) -> Workflow:
        """Enable or disable (a disabled workflow cannot be triggered; schedules skip it, and
        the ticks they materialised ahead are cancelled)."""
        now = utcnow()
        async with self._tx() as conn:
            row = (
                await conn.execute(
                    update(workflows)
                    .where(
                        workflows.c.tenant_id == tenant_id,
                        workflows.c.id == workflow_id,
                        workflows.c.deleted_at.is_(None),
                    )
                    .values(enabled=enabled, updated_at=now)
                    .returning(*_COLUMNS)
                )
            ).first()
            if row is None:
                raise NotFound("workflow not found", workflow_id=workflow_id)
            if not enabled and await lock_schedules(conn, tenant_id, workflow_id=workflow_id):
                await cancel_ticks_ahead(conn, tenant_id, utcnow(), workflow_id=workflow_id)
        return Workflow.from_mapping(row._mapping)

    async def delete(self, tenant_id: str, workflow_id: str) -> None:
        """Soft-delete the workflow and disable its schedules (the ticks they materialised
        ahead are cancelled)."""
        now = utcnow()
        async with self._tx() as conn:
            row = (
                await conn.execute(
                    update(workflows)
                    .where(
                        workflows.c.tenant_id == tenant_id,
                        workflows.c.id == workflow_id,
                        workflows.c.deleted_at.is_(None),
                    )
                    .values(deleted_at=now, enabled=False, updated_at=now)
                    .returning(workflows.c.id)
                )
            ).first()
            if row is None:
                raise NotFound("workflow not found", workflow_id=workflow_id)
            await conn.execute(
                update(schedules)
                .where(schedules.c.tenant_id == tenant_id, schedules.c.workflow_id == workflow_id)
                .values(enabled=False, next_fire_at=None, updated_at=now)
            )  # waits for a scheduler pass materialising their ticks: then they are seen
            await cancel_ticks_ahead(conn, tenant_id, utcnow(), workflow_id=workflow_id)

    async def rotate_webhook_secret(self, tenant_id: str, workflow_id: str) -> str:
        """A new webhook secret (the old one stops working); returned once."""
        secret = _new_webhook_secret()
        async with self._auto() as conn:
            row = (
                await conn.execute(
                    update(workflows)
                    .where(
                        workflows.c.tenant_id == tenant_id,
                        workflows.c.id == workflow_id,
                        workflows.c.deleted_at.is_(None),
                    )
                    .values(webhook_secret_hash=hash_secret(secret), updated_at=utcnow())
                    .returning(workflows.c.id)
                )
            ).first()
        if row is None:
            raise NotFound("workflow not found", workflow_id=workflow_id)
        return secret

    async def verify_webhook(self, workflow_id: str, secret: str) -> Workflow | None:
        """The workflow whose webhook ``secret`` this is, or ``None``.

        The only tenant-less lookup: the secret authenticates the caller, and the answer
        carries the workflow's tenant. Deleted workflows never match.
        """
        query = select(*_COLUMNS, workflows.c.webhook_secret_hash).where(
            workflows.c.id == workflow_id, workflows.c.deleted_at.is_(None)
        )
        async with self._auto() as conn:
            row: RowMapping | None = (await conn.execute(query)).mappings().first()
        stored = row["webhook_secret_hash"] if row is not None else None
        if not hmac.compare_digest(hash_secret(secret), stored or "0" * 64) or row is None:
            return None
        return Workflow.from_mapping(row)


def _parse(
    definition: Mapping[str, Any] | str | bytes,
) -> tuple[WorkflowDefinition, dict[str, Any]]:
    """Validate; the stored document is the normalised definition."""
    parsed = parse_definition(definition)
    doc = parsed.to_document()
    try:
        check_storable(doc, "definition")
    except ValueError as exc:
        error = WorkflowInvalid(str(exc))
        error.details = cast(Any, [{"step": None, "index": None, "field": "", "message": str(exc)}])
        raise error from None
    return parsed, doc


def _not_found(key: VersionKey) -> NotFound:
    return NotFound("workflow version not found", workflow_id=key[1], version=key[2])


def _new_webhook_secret() -> str:
    return f"{WEBHOOK_SECRET_PREFIX}_{secrets.token_urlsafe(32)}"
