"""How to try a running ``conveyor dev``: the example commands, and ``--demo`` seeding.

Both go through the public HTTP API only (admin routes for the tenant and its API key, tenant
routes for the workflow and its executions), so they show exactly what a user would type.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from typing import Any

import httpx

from conveyor.errors import ConveyorError

#: A workflow that needs no network: reshape the input, wait a second (a durable timer), finish.
SAMPLE_WORKFLOW: dict[str, Any] = {
    "name": "hello-conveyor",
    "steps": [
        {
            "id": "greet",
            "type": "transform",
            "expression": "{hello: input.name}",
        },
        {"id": "pause", "type": "delay", "seconds": 1},
        {"id": "done", "type": "noop"},
    ],
}
SAMPLE_INPUT: dict[str, Any] = {"name": "world"}


class DemoFailed(ConveyorError):
    """Seeding the demo tenant through the API failed."""


@dataclass(frozen=True)
class Demo:
    tenant_id: str
    api_key: str
    workflow_id: str
    text: str


def _json(doc: Any) -> str:
    return shlex.quote(json.dumps(doc, separators=(",", ":")))


def try_it_text(api_url: str, admin_token: str) -> str:
    """Copy-paste commands that create a tenant, an API key and a workflow, then trigger it."""
    wf = _json(SAMPLE_WORKFLOW)
    body = _json({"input": SAMPLE_INPUT})
    return f"""Try it (in another terminal; needs jq):
  export CONVEYOR={api_url} ADMIN_TOKEN={shlex.quote(admin_token)}
  TENANT=$(curl -sf -X POST $CONVEYOR/api/admin/tenants -H "Authorization: Bearer $ADMIN_TOKEN" \\
      -H 'Content-Type: application/json' -d '{{"name":"demo"}}' | jq -r .data.id)
  KEY=$(curl -sf -X POST $CONVEYOR/api/admin/tenants/$TENANT/api-keys \\
      -H "Authorization: Bearer $ADMIN_TOKEN" | jq -r .data.key)
  WF=$(curl -sf -X POST $CONVEYOR/api/workflows -H "Authorization: Bearer $KEY" \\
      -H 'Content-Type: application/json' -d {wf} | jq -r .data.id)
  EXEC=$(curl -sf -X POST $CONVEYOR/api/workflows/$WF/executions -H "Authorization: Bearer $KEY" \\
      -H 'Content-Type: application/json' -d {body} | jq -r .data.id)
  sleep 2; curl -s $CONVEYOR/api/executions/$EXEC -H "Authorization: Bearer $KEY" | jq .data.status
Or restart with `conveyor dev --demo` to have the tenant, key and workflow created for you."""


def _data(response: httpx.Response, what: str) -> dict[str, Any]:
    if response.status_code >= 400:
        raise DemoFailed(f"{what}: HTTP {response.status_code} {response.text[:300]}")
    doc = response.json()
    data = doc.get("data", doc) if isinstance(doc, dict) else None
    if not isinstance(data, dict):
        raise DemoFailed(f"{what}: unexpected answer {response.text[:300]}")
    return data


async def seed_demo(api_url: str, admin_token: str) -> Demo:
    """Create a demo tenant, an API key and the sample workflow through the API."""
    admin = {"Authorization": f"Bearer {admin_token}"}
    async with httpx.AsyncClient(base_url=api_url, timeout=10.0, trust_env=False) as client:
        try:
            tenant = _data(
                await client.post("/api/admin/tenants", json={"name": "demo"}, headers=admin),
                "create tenant",
            )
            key_doc = _data(
                await client.post(
                    f"/api/admin/tenants/{tenant['id']}/api-keys", json={}, headers=admin
                ),
                "create API key",
            )
            api_key = str(key_doc["key"])
            tenant_auth = {"Authorization": f"Bearer {api_key}"}
            workflow = _data(
                await client.post("/api/workflows", json=SAMPLE_WORKFLOW, headers=tenant_auth),
                "create workflow",
            )
        except httpx.HTTPError as exc:
            raise DemoFailed(f"the API did not answer: {exc!r}") from exc
        except (KeyError, ValueError) as exc:
            raise DemoFailed(f"unexpected answer from the API: {exc!r}") from exc
    text = f"""Demo tenant {tenant["id"]} with API key and workflow {workflow["id"]} are ready.
Trigger it:
  curl -s -X POST {api_url}/api/workflows/{workflow["id"]}/executions \\
      -H 'Authorization: Bearer {api_key}' -H 'Content-Type: application/json' \\
      -d {_json({"input": SAMPLE_INPUT})}
then read the execution (the "id" it returned):
  curl -s {api_url}/api/executions/<id> -H 'Authorization: Bearer {api_key}'"""
    return Demo(
        tenant_id=str(tenant["id"]), api_key=api_key, workflow_id=str(workflow["id"]), text=text
    )
