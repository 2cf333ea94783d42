"""``{{ secrets.NAME }}`` through the engine and the real store: resolved for the execution's
tenant only; a missing secret fails the step naming it; nothing stored shows a value."""

from __future__ import annotations

import base64
import json
import os

from conveyor.engine import Engine, OutcomeKind
from conveyor.settings import Settings
from conveyor.store import Store
from tests.engine._support import start
from tests.store._fixtures import settings_for
from tests.workflows.conftest import LocalServer

VALUE = "tenant-a-api-token-7f3e"


async def test_a_tenant_uses_its_own_secrets_only(
    settings: Settings, local_server: LocalServer
) -> None:
    key = base64.b64encode(os.urandom(32)).decode()
    allowed = settings_for(
        settings.database_url, http_allowlist=f"127.0.0.1:{local_server.port}", secrets_key=key
    )
    steps = [
        {
            "id": "call",
            "type": "http",
            "method": "POST",
            "url": local_server.url("/echo") + "?k={{ secrets.TOKEN }}",
            "headers": {"X-Token": "{{ secrets.TOKEN }}"},
            "body": {"token": "{{ secrets.TOKEN }}"},
        }
    ]
    async with Store(allowed, pool_size=4) as store:
        a = (await store.tenants.create("a")).id
        b = (await store.tenants.create("b")).id
        await store.secrets.create(a, "TOKEN", VALUE)
        _, mine = await start(store, steps, tenant_id=a)
        _, theirs = await start(store, steps, tenant_id=b)
        async with Engine(store, allowed) as engine:
            ok = await engine.run(mine)
            failed = await engine.run(theirs)
        assert ok.kind is OutcomeKind.SUCCEEDED, ok
        assert failed.kind is OutcomeKind.FAILED, failed
        assert len(local_server.requests) == 1  # b's step sent nothing
        assert local_server.requests[0].headers["x-token"] == VALUE
        done = await store.executions.get(a, mine, with_steps=True)
        echoed = done.steps[0].output["body"]
        assert echoed["headers"]["x-token"] == "[secret]"
        assert json.loads(echoed["body"]) == {"token": "[secret]"}
        assert done.steps[0].input["url"].endswith("?k=[secret]")
        denied = await store.executions.get(b, theirs, with_steps=True)
        assert denied.error is not None
        assert "secret 'TOKEN' is not defined" in denied.error["message"]
        assert denied.steps[0].error is not None
        assert denied.steps[0].error["type"] == "PermanentStepError"
        for execution in (done, denied):
            assert VALUE not in json.dumps(
                [execution.output, execution.error, [(s.input, s.output, s.error)
                 for s in execution.steps]], default=str
            )  # fmt: skip
