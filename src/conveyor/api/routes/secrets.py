"""``/api/secrets``: the tenant's named secrets (values go in, never come out)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path, Response

from conveyor.api.deps import CtxDep, TenantDep
from conveyor.api.schemas import (
    Envelope,
    SecretIn,
    SecretOut,
    SecretValueIn,
    error_responses,
)
from conveyor.store import SECRET_NAME_PATTERN, SecretInfo

router = APIRouter(
    prefix="/api/secrets",
    tags=["secrets"],
    responses=error_responses(400, 401, 404, 413, 422, 503),
)

SecretName = Annotated[
    str,
    Path(
        pattern=SECRET_NAME_PATTERN,
        max_length=64,
        description="The secret's name (`{{ secrets.NAME }}`).",
    ),
]


def secret_out(secret: SecretInfo) -> dict[str, Any]:
    return {
        "name": secret.name,
        "created_at": secret.created_at,
        "updated_at": secret.updated_at,
    }


@router.post(
    "",
    status_code=201,
    response_model=Envelope[SecretOut],
    responses=error_responses(409),
    summary="Create a secret",
    description=(
        "Stores a named secret, encrypted with `SECRETS_KEY`; `http` steps reference it as "
        "`{{ secrets.NAME }}` in their URL, headers and body. The value is never returned "
        "(no route shows it) and is replaced by `[secret]` in recorded step inputs, outputs "
        "and errors. 409 if the name is taken (rotate with PUT); 503 `secrets_unavailable` "
        "when `SECRETS_KEY` is not set."
    ),
)
async def create_secret(ctx: CtxDep, auth: TenantDep, body: SecretIn) -> dict[str, Any]:
    secret = await ctx.store.secrets.create(auth.tenant_id, body.name, body.value)
    return {"success": True, "data": secret_out(secret)}


@router.get(
    "",
    response_model=Envelope[list[SecretOut]],
    summary="List secrets",
    description="The tenant's secrets by name, with when each was created and last set. "
    "Never their values.",
)
async def list_secrets(ctx: CtxDep, auth: TenantDep) -> dict[str, Any]:
    secrets = await ctx.store.secrets.list(auth.tenant_id)
    return {"success": True, "data": [secret_out(s) for s in secrets]}


@router.put(
    "/{name}",
    response_model=Envelope[SecretOut],
    summary="Rotate a secret",
    description="Replaces the value; steps that run from then on use the new one. 404 if the "
    "tenant has no secret of that name.",
)
async def rotate_secret(
    ctx: CtxDep, auth: TenantDep, name: SecretName, body: SecretValueIn
) -> dict[str, Any]:
    secret = await ctx.store.secrets.rotate(auth.tenant_id, name, body.value)
    return {"success": True, "data": secret_out(secret)}


@router.delete("/{name}", status_code=204, response_class=Response, summary="Delete a secret")
async def delete_secret(ctx: CtxDep, auth: TenantDep, name: SecretName) -> Response:
    await ctx.store.secrets.delete(auth.tenant_id, name)
    return Response(status_code=204)
