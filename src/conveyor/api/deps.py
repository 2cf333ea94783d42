"""Typed FastAPI dependencies: the process context, admin auth, tenant (API key) auth."""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from conveyor.api.context import ApiContext
from conveyor.api.errors import ApiError
from conveyor.settings import Settings

_admin_scheme = HTTPBearer(
    scheme_name="AdminToken",
    description="`Authorization: Bearer <ADMIN_TOKEN>`.",
    auto_error=False,
)
_tenant_scheme = HTTPBearer(
    scheme_name="ApiKey",
    description="`Authorization: Bearer <API key>` issued by the admin API.",
    auto_error=False,
)

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_ctx(request: Request) -> ApiContext:
    ctx: ApiContext | None = getattr(request.app.state, "ctx", None)
    if ctx is None:
        raise ApiError(503, "starting", "The API is starting; retry shortly.")
    return ctx


SettingsDep = Annotated[Settings, Depends(get_settings)]
CtxDep = Annotated[ApiContext, Depends(get_ctx)]
AdminCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_admin_scheme)]
TenantCredentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_tenant_scheme)]


async def require_admin(settings: SettingsDep, credentials: AdminCredentials) -> None:
    """``ADMIN_TOKEN`` bearer auth, compared in constant time; never open when unset."""
    expected = settings.admin_token
    if expected is None:
        raise ApiError(503, "admin_disabled", "admin API disabled (ADMIN_TOKEN is not set)")
    if credentials is None:
        raise ApiError(401, "unauthorized", "Missing bearer token.", headers=_CHALLENGE)
    given = credentials.credentials.encode()
    if not hmac.compare_digest(given, expected.get_secret_value().encode()):
        raise ApiError(401, "unauthorized", "Invalid admin token.", headers=_CHALLENGE)


@dataclass(frozen=True)
class TenantAuth:
    """The tenant a request acts for, from its API key."""

    tenant_id: str
    key_id: str


async def require_tenant(ctx: CtxDep, credentials: TenantCredentials) -> TenantAuth:
    """API-key bearer auth: the key's tenant scopes every query of the request."""
    if credentials is None:
        raise ApiError(401, "unauthorized", "Missing API key.", headers=_CHALLENGE)
    found = await ctx.authenticate(credentials.credentials)
    if found is None:
        raise ApiError(401, "unauthorized", "Invalid or revoked API key.", headers=_CHALLENGE)
    return TenantAuth(tenant_id=found[0], key_id=found[1])


AdminDep = Depends(require_admin)
TenantDep = Annotated[TenantAuth, Depends(require_tenant)]
