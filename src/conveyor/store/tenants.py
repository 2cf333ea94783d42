"""Tenants and their API keys.

An API key token looks like ``cvk_<prefix>_<secret>``: the 12-hex-digit prefix is stored in
clear for lookup, the token only as its SHA-256 (the secret has 256 bits of entropy, so a fast
hash is enough); verification compares digests with :func:`hmac.compare_digest`.
"""

from __future__ import annotations

import builtins
import hashlib
import hmac
import secrets

from sqlalchemy import select, update

from conveyor.errors import NotFound
from conveyor.store._base import ServiceBase
from conveyor.store._types import new_id, utcnow
from conveyor.store.records import ApiKey, IssuedApiKey, Page, Tenant
from conveyor.store.schema import api_keys, tenants

__all__ = ["ApiKeyService", "TenantService", "hash_secret"]

TOKEN_PREFIX = "cvk"
_KEY_COLUMNS = (
    api_keys.c.id,
    api_keys.c.tenant_id,
    api_keys.c.name,
    api_keys.c.prefix,
    api_keys.c.created_at,
    api_keys.c.revoked_at,
)


def hash_secret(secret: str) -> str:
    """SHA-256 hex digest of a high-entropy secret (API key token, webhook secret)."""
    return hashlib.sha256(secret.encode()).hexdigest()


class TenantService(ServiceBase):
    """Create and read tenants (organizations)."""

    async def create(self, name: str) -> Tenant:
        tenant = Tenant(id=new_id(), name=name, created_at=utcnow())
        async with self._auto() as conn:
            await conn.execute(
                tenants.insert().values(
                    id=tenant.id, name=tenant.name, created_at=tenant.created_at
                )
            )
        return tenant

    async def get(self, tenant_id: str) -> Tenant:
        async with self._auto() as conn:
            row = (await conn.execute(select(tenants).where(tenants.c.id == tenant_id))).first()
        if row is None:
            raise NotFound("tenant not found", tenant_id=tenant_id)
        return Tenant.from_mapping(row._mapping)

    async def list(self, *, limit: int = 50, cursor: str | None = None) -> Page[Tenant]:
        query = select(tenants)
        return await self._page(query, tenants, Tenant, limit=limit, cursor=cursor)


class ApiKeyService(ServiceBase):
    """Issue, list, revoke and verify API keys."""

    async def issue(self, tenant_id: str, name: str = "default") -> IssuedApiKey:
        """A new key for ``tenant_id``; the token in the answer is shown once."""
        prefix = secrets.token_hex(6)
        token = f"{TOKEN_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
        key = ApiKey(
            id=new_id(),
            tenant_id=tenant_id,
            name=name,
            prefix=prefix,
            created_at=utcnow(),
            revoked_at=None,
        )
        async with self._tx() as conn:
            exists = (
                await conn.execute(select(tenants.c.id).where(tenants.c.id == tenant_id))
            ).first()
            if exists is None:
                raise NotFound("tenant not found", tenant_id=tenant_id)
            await conn.execute(
                api_keys.insert().values(
                    id=key.id,
                    tenant_id=tenant_id,
                    name=name,
                    prefix=prefix,
                    key_hash=hash_secret(token),
                    created_at=key.created_at,
                )
            )
        return IssuedApiKey(key=key, token=token)

    async def list(self, tenant_id: str) -> builtins.list[ApiKey]:
        query = (
            select(*_KEY_COLUMNS)
            .where(api_keys.c.tenant_id == tenant_id)
            .order_by(api_keys.c.created_at, api_keys.c.id)
        )
        async with self._auto() as conn:
            rows = (await conn.execute(query)).all()
        return [ApiKey.from_mapping(r._mapping) for r in rows]

    async def revoke(self, tenant_id: str, key_id: str) -> ApiKey:
        """Revoke a key (idempotent); raises NotFound if it is not this tenant's."""
        now = utcnow()
        async with self._tx() as conn:
            await conn.execute(
                update(api_keys)
                .where(
                    api_keys.c.tenant_id == tenant_id,
                    api_keys.c.id == key_id,
                    api_keys.c.revoked_at.is_(None),
                )
                .values(revoked_at=now)
            )
            row = (
                await conn.execute(
                    select(*_KEY_COLUMNS).where(
                        api_keys.c.tenant_id == tenant_id, api_keys.c.id == key_id
                    )
                )
            ).first()
        if row is None:
            raise NotFound("API key not found", key_id=key_id)
        return ApiKey.from_mapping(row._mapping)

    async def verify(self, token: str) -> ApiKey | None:
        """The active key ``token`` belongs to, or ``None`` (unknown, malformed or revoked)."""
        parts = token.split("_", 2)
        if len(parts) != 3 or parts[0] != TOKEN_PREFIX or len(parts[1]) != 12:
            return None
        row = await self._statements.api_key(parts[1])
        if row is None:
            # Spend the same work as a real comparison so timing does not reveal prefixes.
            hmac.compare_digest(hash_secret(token), "0" * 64)
            return None
        if not hmac.compare_digest(hash_secret(token), row["key_hash"]) or row["revoked_at"]:
            return None
        return ApiKey.from_mapping(row)
