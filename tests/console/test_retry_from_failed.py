"""The console's two retry actions on a failed execution ("Retry from start", "Retry from
failed step") and how it shows steps reused by a retry from the failed step (in process, real
Redis and Postgres, a real local HTTP target that fails and then recovers)."""

from __future__ import annotations

from conveyor.engine import Engine, OutcomeKind
from tests.api.conftest import NOOP_WORKFLOW, Api, make_settings
from tests.console.conftest import csrf_of, sign_in
from tests.engine._target import http_target


async def _run(api: Api, execution_id: str) -> OutcomeKind:
    settings = make_settings(DATABASE_URL=api.settings.database_url, HTTP_ALLOWLIST="127.0.0.1")
    async with Engine(api.ctx.store, settings) as engine:
        return (await engine.run(execution_id)).kind


async def test_retry_from_failed_step_in_the_console(api: Api) -> None:
    headers = await api.tenant("resume")
    with http_target() as target:
        wf = await api.workflow(headers, {"name": "flaky", "steps": [
            {"id": "fetch", "type": "http", "url": target.url("/ok/a"), "timeout_s": 10},
            {"id": "post", "type": "http", "url": target.url("/flaky/b"), "timeout_s": 10},
        ]})  # fmt: skip
        r = await api.client.post(f"/api/workflows/{wf}/executions", headers=headers)
        failed = r.json()["data"]["id"]
        assert await _run(api, failed) is OutcomeKind.FAILED
        await sign_in(api.client)

        page = (await api.client.get(f"/console/executions/{failed}")).text
        assert f'href="/console/executions/{failed}/retry">Retry from start…' in page
        assert f'href="/console/executions/{failed}/retry-failed">Retry from failed step…' in page
        confirm = await api.client.get(f"/console/executions/{failed}/retry-failed")
        assert confirm.status_code == 200 and "resumes at the failed step" in confirm.text
        target.failing = False
        r = await api.client.post(f"/console/executions/{failed}/retry-failed",
                                  data={"csrf": csrf_of(confirm.text)})  # fmt: skip
        assert r.status_code == 303
        resumed = r.headers["location"].rsplit("/", 1)[-1]
        state = await api.ctx.execution_queue("us").get_job_state(resumed)
        assert state in ("waiting", "prioritized")
        assert await _run(api, resumed) is OutcomeKind.SUCCEEDED
        assert dict(target.hits) == {"/ok/a": 1, "/flaky/b": 2}

    page = (await api.client.get(f"/console/executions/{resumed}")).text
    assert page.count('<span class="badge reused"') == 1  # fetch; post ran
    assert f'from <a href="/console/executions/{failed}"><code>{failed}</code></a>' in page
    assert 'class="bar reused"' in page and 'class="step reused" data-step="fetch"' in page
    assert "/retry" not in page  # succeeded: no retry action
    refused = await api.client.post(f"/console/executions/{resumed}/retry-failed",
                                    data={"csrf": csrf_of(confirm.text)})  # fmt: skip
    assert refused.status_code == 409 and "only failed executions" in refused.text


async def test_a_cancelled_execution_offers_only_retry_from_start(api: Api) -> None:
    headers = await api.tenant("cancelled")
    wf = await api.workflow(headers, NOOP_WORKFLOW)
    r = await api.client.post(f"/api/workflows/{wf}/executions", headers=headers)
    execution_id = r.json()["data"]["id"]
    await api.client.post(f"/api/executions/{execution_id}/cancel", headers=headers)
    await sign_in(api.client)
    page = (await api.client.get(f"/console/executions/{execution_id}")).text
    assert "Retry from start…" in page and "retry-failed" not in page
