"""Tenants' named secrets, encrypted at rest with ``SECRETS_KEY``.

A secret's value is stored as ``base64(nonce ‖ AES-256-GCM(value))`` with the tenant id and
the name as associated data (a ciphertext copied to another row or tenant does not decrypt),
next to ``key_id`` — the first 16 hex digits of the key's SHA-256 — naming the key that
encrypted it. ``SECRETS_KEY`` holds one or more keys: the first encrypts, every one decrypts
(the row's ``key_id`` picks it), so a key is rotated by putting the new one first, running
``conveyor secrets reencrypt`` (:meth:`SecretService.reencrypt`) and then dropping the old one.

Values are never returned by the API; only the engine reads them (:meth:`SecretService.resolve`)
when an ``http`` step runs. Processes that need them check at start-up
(:meth:`SecretService.check_keys`) that every stored secret can be decrypted.
"""

from __future__ import annotations

import base64
import binascii
import builtins
import hashlib
import os
import re
from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from sqlalchemy import delete, func, select, update

from conveyor.errors import ConfigError, Conflict, InvalidValue, NotFound, SecretsUnavailable
from conveyor.store._base import ServiceBase
from conveyor.store._types import new_id, utcnow
from conveyor.store.schema import secrets, tenants

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

__all__ = [
    "MAX_SECRET_BYTES",
    "MIN_SECRET_CHARS",
    "SECRET_NAME_PATTERN",
    "SecretInfo",
    "SecretService",
    "key_id",
]

SECRET_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
"""A secret's name: a letter or ``_``, then letters, digits, ``_``; at most 64 characters (so
that ``{{ secrets.NAME }}`` is a plain JMESPath field)."""
MIN_SECRET_CHARS = 4
"""Shortest value: every occurrence of a value is redacted from recorded data, and a value of
one or two characters would blank out half of it."""
MAX_SECRET_BYTES = 16 * 1024
"""Largest value (UTF-8 bytes)."""

_NAME = re.compile(SECRET_NAME_PATTERN)
_NONCE_BYTES = 12
_REENCRYPT_BATCH = 500


def key_id(key: bytes) -> str:
    """The identifier stored next to a ciphertext: 16 hex digits of the key's SHA-256."""
    return hashlib.sha256(key).hexdigest()[:16]


@dataclass(frozen=True, slots=True)
class SecretInfo:
    """What may be shown of a secret: never its value."""

    name: str
    created_at: datetime
    updated_at: datetime


def check_name(name: str) -> str:
    if not isinstance(name, str) or _NAME.fullmatch(name) is None:
        raise InvalidValue(
            "a secret's name is a letter or '_' then letters, digits or '_' (at most 64)",
            field="name",
        )
    return name


def check_value(value: str) -> str:
    if not isinstance(value, str) or len(value) < MIN_SECRET_CHARS:
        raise InvalidValue(
            f"a secret's value has at least {MIN_SECRET_CHARS} characters", field="value"
        )
    if len(value.encode()) > MAX_SECRET_BYTES:
        raise InvalidValue(
            f"a secret's value has at most {MAX_SECRET_BYTES} bytes (UTF-8)", field="value"
        )
    return value


class _Keyring:
    """The AEADs of ``SECRETS_KEY``, by key id; the first one encrypts.

    ``cryptography`` is imported only when there are keys: its Rust extension is ~7 MB of
    every process's memory, for nothing where ``SECRETS_KEY`` is unset."""

    def __init__(self, keys: tuple[bytes, ...]) -> None:
        self.ids = tuple(key_id(key) for key in keys)
        self._aeads: dict[str, AESGCM] = {}
        if keys:
            from cryptography.hazmat.primitives.ciphers.aead import AESGCM

            self._aeads = {kid: AESGCM(key) for kid, key in zip(self.ids, keys, strict=True)}

    def _require(self) -> None:
        if not self.ids:
            raise SecretsUnavailable("SECRETS_KEY is not set: secrets cannot be stored or read")

    def encrypt(self, tenant_id: str, name: str, value: str) -> tuple[str, str]:
        """``(ciphertext, key_id)`` of ``value`` under the first key."""
        self._require()
        kid = self.ids[0]
        nonce = os.urandom(_NONCE_BYTES)
        sealed = self._aeads[kid].encrypt(nonce, value.encode(), _aad(tenant_id, name))
        return base64.b64encode(nonce + sealed).decode("ascii"), kid

    def decrypt(self, tenant_id: str, name: str, ciphertext: str, kid: str) -> str:
        self._require()
        aead = self._aeads.get(kid)
        if aead is None:
            raise SecretsUnavailable(
                f"SECRETS_KEY lacks the key (id {kid}) that encrypted secret {name!r}",
                key_id=kid,
            )
        from cryptography.exceptions import InvalidTag  # loaded with the keys: no cost here

        try:
            raw = base64.b64decode(ciphertext, validate=True)
            plain = aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], _aad(tenant_id, name))
        except (InvalidTag, binascii.Error, ValueError):
            raise SecretsUnavailable(
                f"secret {name!r} cannot be decrypted with SECRETS_KEY (key id {kid})",
                key_id=kid,
            ) from None
        return plain.decode()


def _aad(tenant_id: str, name: str) -> bytes:
    return f"conveyor-secret\x00{tenant_id}\x00{name}".encode()


class SecretService(ServiceBase):
    """Create, list, rotate, delete and (for the engine) resolve a tenant's secrets."""

    @property
    def _keys(self) -> _Keyring:
        ring: _Keyring | None = getattr(self, "_ring", None)
        if ring is None:
            ring = self._ring = _Keyring(self._settings.secrets_keys)
        return ring

    async def create(self, tenant_id: str, name: str, value: str) -> SecretInfo:
        """Store a new secret; ``Conflict`` if the tenant already has one of that name."""
        check_name(name)
        check_value(value)
        ciphertext, kid = self._keys.encrypt(tenant_id, name, value)
        now = utcnow()
        async with self._tx() as conn:
            exists = (
                await conn.execute(select(tenants.c.id).where(tenants.c.id == tenant_id))
            ).first()
            if exists is None:
                raise NotFound("tenant not found", tenant_id=tenant_id)
            taken = (
                await conn.execute(
                    select(secrets.c.id).where(
                        secrets.c.tenant_id == tenant_id, secrets.c.name == name
                    )
                )
            ).first()
            if taken is not None:
                raise Conflict(f"a secret named {name!r} already exists", name=name)
            await conn.execute(
                secrets.insert().values(
                    id=new_id(),
                    tenant_id=tenant_id,
                    name=name,
                    ciphertext=ciphertext,
                    key_id=kid,
                    created_at=now,
                    updated_at=now,
                )
            )
        return SecretInfo(name, now, now)

    async def list(self, tenant_id: str) -> builtins.list[SecretInfo]:
        """The tenant's secrets by name (no values)."""
        query = (
            select(secrets.c.name, secrets.c.created_at, secrets.c.updated_at)
            .where(secrets.c.tenant_id == tenant_id)
            .order_by(secrets.c.name)
        )
        async with self._auto() as conn:
            rows = (await conn.execute(query)).all()
        return [SecretInfo(r.name, r.created_at, r.updated_at) for r in rows]

    async def rotate(self, tenant_id: str, name: str, value: str) -> SecretInfo:
        """Replace a secret's value; ``NotFound`` if the tenant has none of that name."""
        check_name(name)
        check_value(value)
        ciphertext, kid = self._keys.encrypt(tenant_id, name, value)
        now = utcnow()
        async with self._tx() as conn:
            row = (
                await conn.execute(
                    update(secrets)
                    .where(secrets.c.tenant_id == tenant_id, secrets.c.name == name)
                    .values(ciphertext=ciphertext, key_id=kid, updated_at=now)
                    .returning(secrets.c.created_at)
                )
            ).first()
        if row is None:
            raise NotFound(f"secret {name!r} not found", name=name)
        return SecretInfo(name, row.created_at, now)

    async def delete(self, tenant_id: str, name: str) -> None:
        """Delete a secret; ``NotFound`` if the tenant has none of that name."""
        async with self._tx() as conn:
            result = await conn.execute(
                delete(secrets).where(secrets.c.tenant_id == tenant_id, secrets.c.name == name)
            )
        if not result.rowcount:
            raise NotFound(f"secret {name!r} not found", name=name)

    async def resolve(self, tenant_id: str, names: Collection[str]) -> dict[str, str]:
        """The values of ``names`` for ``tenant_id``. ``NotFound`` naming the first missing
        secret; ``SecretsUnavailable`` when one cannot be decrypted."""
        wanted = sorted(set(names))
        if not wanted:
            return {}
        query = select(secrets.c.name, secrets.c.ciphertext, secrets.c.key_id).where(
            secrets.c.tenant_id == tenant_id, secrets.c.name.in_(wanted)
        )
        async with self._auto() as conn:
            rows = (await conn.execute(query)).all()
        found = {r.name: r for r in rows}
        for name in wanted:
            if name not in found:
                raise NotFound(f"secret {name!r} is not defined for this tenant", secret=name)
        keys = self._keys
        return {
            name: keys.decrypt(tenant_id, name, row.ciphertext, row.key_id)
            for name, row in found.items()
        }

    async def count(self) -> int:
        """Secrets stored, all tenants."""
        async with self._auto() as conn:
            return int((await conn.execute(select(func.count()).select_from(secrets))).scalar_one())

    async def check_keys(self) -> None:
        """Start-up check of a process that decrypts secrets: ``ConfigError`` naming
        ``SECRETS_KEY`` when secrets are stored and it is unset or lacks a key they use."""
        query = select(secrets.c.key_id, func.count()).group_by(secrets.c.key_id)
        async with self._auto() as conn:
            used = {kid: int(n) for kid, n in (await conn.execute(query)).all()}
        if not used:
            return
        total = sum(used.values())
        if not self._keys.ids:
            raise ConfigError(
                f"SECRETS_KEY is not set but the database holds {total} secret(s): set it to "
                "the key(s) they were encrypted with"
            )
        missing = {kid: n for kid, n in used.items() if kid not in self._keys.ids}
        if missing:
            ids = ", ".join(sorted(missing))
            raise ConfigError(
                f"SECRETS_KEY lacks the key that encrypted {sum(missing.values())} secret(s) "
                f"(key id {ids}): keep the old key in the list until `conveyor secrets "
                "reencrypt` has run"
            )

    async def reencrypt(self) -> int:
        """Re-encrypt every secret not under the first key with it; the number re-encrypted.
        ``SecretsUnavailable`` if one cannot be decrypted with the keys given."""
        keys = self._keys
        if not keys.ids:
            raise SecretsUnavailable("SECRETS_KEY is not set: nothing can be re-encrypted")
        first = keys.ids[0]
        done = 0
        while True:
            query = (
                select(
                    secrets.c.id,
                    secrets.c.tenant_id,
                    secrets.c.name,
                    secrets.c.ciphertext,
                    secrets.c.key_id,
                )
                .where(secrets.c.key_id != first)
                .order_by(secrets.c.id)
                .limit(_REENCRYPT_BATCH)
            )
            async with self._auto() as conn:
                rows = (await conn.execute(query)).all()
            if not rows:
                return done
            async with self._tx() as conn:
                for row in rows:
                    value = keys.decrypt(row.tenant_id, row.name, row.ciphertext, row.key_id)
                    ciphertext, kid = keys.encrypt(row.tenant_id, row.name, value)
                    result = await conn.execute(
                        update(secrets)
                        .where(secrets.c.id == row.id, secrets.c.key_id == row.key_id)
                        .values(ciphertext=ciphertext, key_id=kid)
                    )
                    done += result.rowcount or 0
