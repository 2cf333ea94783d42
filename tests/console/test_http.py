"""The console over HTTP (in process, real Redis and Postgres): sign-in and sessions, CSRF,
the security headers, escaping of tenant-controlled values, the actions and the filters."""

from __future__ import annotations

import re
import time
from datetime import timedelta
from typing import Any

from conveyor.api.console import _session
from conveyor.store import utcnow
from conveyor.store.schema import step_runs
from tests.api.conftest import ADMIN_TOKEN, NOOP_WORKFLOW, Api, make_settings, running_api
from tests.console.conftest import csrf_of, sign_in

XSS = '<script>document.title="pwned"</script><a href="javascript:alert(1)">click</a>'


async def _trigger(api: Api, headers: dict[str, str], workflow_id: str, data: Any = None) -> str:
    r = await api.client.post(
        f"/api/workflows/{workflow_id}/executions", json={"input": data}, headers=headers
    )
    assert r.status_code == 202, r.text
    return str(r.json()["data"]["id"])


async def _tenant_id(api: Api, headers: dict[str, str]) -> str:
    found = await api.ctx.authenticate(headers["Authorization"].removeprefix("Bearer "))
    assert found is not None
    return found[0]


async def test_signed_out_browser_is_sent_to_sign_in(api: Api) -> None:
    for path in ("/console", "/console/executions?status=failed", "/console/tenants"):
        r = await api.client.get(path)
        assert r.status_code == 303
        assert r.headers["location"].startswith("/console/sign-in")
    r = await api.client.get("/console/executions?status=failed")
    assert r.headers["location"] == "/console/sign-in?next=/console/executions%3Fstatus%3Dfailed"
    r = await api.client.get("/console/live/overview")
    assert r.status_code == 303


async def test_sign_in_sets_a_strict_session_cookie_and_sign_out_clears_it(api: Api) -> None:
    r = await sign_in(api.client, "not-the-token")
    assert r.status_code == 401 and "not the admin token" in r.text
    assert f"{_session.COOKIE}=" not in r.headers.get("set-cookie", "")
    r = await sign_in(api.client)
    assert r.status_code == 303 and r.headers["location"] == "/console"
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{_session.COOKIE}=")
    for flag in (
        "HttpOnly",
        "SameSite=strict",
        "Path=/console",
        f"Max-Age={_session.SESSION_TTL_S}",
    ):
        assert flag in cookie
    page = await api.client.get("/console")
    assert page.status_code == 200 and "Overview" in page.text
    r = await api.client.post("/console/sign-out", data={"csrf": csrf_of(page.text)})
    assert r.status_code == 303 and r.headers["location"] == "/console/sign-in"
    assert (await api.client.get("/console")).status_code == 303


async def test_forged_and_expired_sessions_are_signed_out(api: Api) -> None:
    settings = api.settings
    now = time.time()
    expired = _session.encode(settings, _session.Session(csrf="x", expires_at=now - 1))
    other = make_settings(ADMIN_TOKEN="another-token-0123456789")
    forged = _session.encode(other, _session.Session(csrf="x", expires_at=now + 60))
    good = _session.encode(settings, _session.Session(csrf="x", expires_at=now + 60))
    assert _session.decode(settings, good) is not None
    for value in (expired, forged, good[:-2] + "00", "garbage", good.replace(".", "")):
        assert _session.decode(settings, value) is None
        api.client.cookies.set(_session.COOKIE, value, path="/console")
        r = await api.client.get("/console/executions")
        assert r.status_code == 303, value


async def test_sign_in_needs_its_form_token_and_never_redirects_off_site(api: Api) -> None:
    r = await api.client.post("/console/sign-in", data={"token": ADMIN_TOKEN})
    assert r.status_code == 403
    assert r.json() == {
        "success": False,
        "error": {"code": "csrf_failed", "message": r.json()["error"]["message"], "details": {}},
    }
    page = await api.client.get("/console/sign-in")
    for target in ("//evil.example/x", "https://evil.example", "/console/../api", "/console\\x"):
        r = await api.client.post(
            "/console/sign-in",
            data={"csrf": csrf_of(page.text), "token": ADMIN_TOKEN, "next": target},
        )
        assert r.status_code == 303
        assert r.headers["location"] == "/console", target


async def test_console_disabled_without_admin_token(api_env: dict[str, str]) -> None:
    env = {k: v for k, v in api_env.items() if k != "ADMIN_TOKEN"}
    async with running_api(make_settings(**env)) as api:
        page = await api.client.get("/console/sign-in")
        assert page.status_code == 503 and "ADMIN_TOKEN is not set" in page.text
        assert 'name="token"' not in page.text
        r = await api.client.post("/console/sign-in", data={"csrf": "x", "token": ""})
        assert r.status_code == 403
        assert (await api.client.get("/console")).status_code == 303


async def test_posts_without_the_csrf_token_are_refused(api: Api) -> None:
    headers = await api.tenant("csrf")
    tenant_id = await _tenant_id(api, headers)
    workflow_id = await api.workflow(headers)
    execution_id = await _trigger(api, headers, workflow_id)
    await sign_in(api.client)
    keys = await api.ctx.store.api_keys.list(tenant_id)
    posts = [
        f"/console/executions/{execution_id}/cancel",
        f"/console/tenants/{tenant_id}/keys",
        f"/console/tenants/{tenant_id}/keys/{keys[0].id}/revoke",
        "/console/tenants",
        "/console/sign-out",
    ]
    for path in posts:
        for data in ({}, {"csrf": "wrong"}):
            r = await api.client.post(path, data={**data, "name": "x"})
            assert r.status_code == 403, path
            body = r.json()
            assert body["success"] is False and body["error"]["code"] == "csrf_failed"
    execution = await api.ctx.store.executions.get(tenant_id, execution_id)
    assert execution.status == "queued"
    assert [k.active for k in await api.ctx.store.api_keys.list(tenant_id)] == [True]


async def test_pages_carry_a_strict_csp_and_no_inline_script(api: Api) -> None:
    headers = await api.tenant("csp")
    workflow_id = await api.workflow(headers)
    execution_id = await _trigger(api, headers, workflow_id)
    tenant_id = await _tenant_id(api, headers)
    await sign_in(api.client)
    pages = ["/console", "/console/executions", f"/console/executions/{execution_id}",
             "/console/workflows", f"/console/tenants/{tenant_id}/workflows/{workflow_id}",
             "/console/schedules", "/console/tenants", f"/console/tenants/{tenant_id}",
             "/console/sign-in"]  # fmt: skip
    for path in pages:
        r = await api.client.get(path)
        assert r.status_code in (200, 303), path
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "default-src 'none'" in csp
        assert "unsafe-inline" not in csp
        assert r.headers["x-frame-options"] == "DENY"
        assert re.findall(r"<script(?![^>]*\bsrc=)", r.text) == [], path
        assert " style=" not in r.text and "<style" not in r.text, path


async def _store_step(api: Api, tenant_id: str, execution_id: str, output: Any) -> None:
    now = utcnow()
    async with api.ctx.store.engine.begin() as conn:
        await conn.execute(
            step_runs.insert().values(
                execution_id=execution_id, seq=0, tenant_id=tenant_id, step_id="evil",
                step_type="transform", status="succeeded", attempts=1, input={"html": XSS},
                output=output, output_truncated=False, error={"message": XSS},
                started_at=now - timedelta(milliseconds=30), finished_at=now,
            )
        )  # fmt: skip


async def test_tenant_values_are_escaped(api: Api) -> None:
    headers = await api.tenant('<img src=x onerror="alert(1)">')
    tenant_id = await _tenant_id(api, headers)
    workflow_id = await api.workflow(headers, {**NOOP_WORKFLOW, "name": "<b>bold</b>"})
    execution_id = await _trigger(api, headers, workflow_id, {"x": XSS})
    await _store_step(api, tenant_id, execution_id, {"body": XSS, "link": "javascript:alert(1)"})
    await sign_in(api.client)
    for path in (f"/console/executions/{execution_id}", f"/console/executions/{execution_id}/live",
                 "/console/tenants", f"/console/tenants/{tenant_id}/workflows/{workflow_id}",
                 f"/console/workflows?tenant={tenant_id}"):  # fmt: skip
        text = (await api.client.get(path)).text
        assert "<script>document" not in text and '<a href="javascript:' not in text, path
        assert "<img src=x" not in text and "<b>bold</b>" not in text, path
    detail = (await api.client.get(f"/console/executions/{execution_id}")).text
    assert "&lt;script&gt;document.title=" in detail
    assert "javascript:alert(1)" in detail  # shown as text, never as a link
    assert 'href="javascript' not in detail


async def test_cancel_and_retry_from_the_console(api: Api) -> None:
    headers = await api.tenant("actions")
    tenant_id = await _tenant_id(api, headers)
    workflow_id = await api.workflow(headers)
    execution_id = await _trigger(api, headers, workflow_id)
    await sign_in(api.client)
    confirm = await api.client.get(f"/console/executions/{execution_id}/cancel")
    assert confirm.status_code == 200 and "Cancel this execution?" in confirm.text
    r = await api.client.post(
        f"/console/executions/{execution_id}/cancel", data={"csrf": csrf_of(confirm.text)}
    )
    assert r.status_code == 303 and r.headers["location"] == f"/console/executions/{execution_id}"
    assert (await api.ctx.store.executions.get(tenant_id, execution_id)).status == "cancelled"
    again = await api.client.post(
        f"/console/executions/{execution_id}/retry", data={"csrf": csrf_of(confirm.text)}
    )
    assert again.status_code == 303
    retried_id = again.headers["location"].rsplit("/", 1)[-1]
    retried = await api.ctx.store.executions.get(tenant_id, retried_id)
    assert retried.retry_of == execution_id and retried.status == "queued"
    state = await api.ctx.execution_queue(retried.region).get_job_state(retried_id)
    assert state in ("waiting", "prioritized")
    refused = await api.client.post(
        f"/console/executions/{retried_id}/retry", data={"csrf": csrf_of(confirm.text)}
    )
    assert refused.status_code == 409 and "only failed or cancelled" in refused.text


async def test_issue_and_revoke_a_key(api: Api) -> None:
    headers = await api.tenant("keys")
    tenant_id = await _tenant_id(api, headers)
    await sign_in(api.client)
    page = await api.client.get(f"/console/tenants/{tenant_id}")
    r = await api.client.post(
        f"/console/tenants/{tenant_id}/keys", data={"csrf": csrf_of(page.text), "name": "ci"}
    )
    assert r.status_code == 201 and r.headers["cache-control"] == "no-store"
    token = re.search(r'id="issued-token">([^<]+)<', r.text)
    assert token is not None
    key_headers = {"Authorization": f"Bearer {token.group(1)}"}
    assert (await api.client.get("/api/executions", headers=key_headers)).status_code == 200
    later = await api.client.get(f"/console/tenants/{tenant_id}")
    assert token.group(1) not in later.text  # shown once
    key = next(k for k in await api.ctx.store.api_keys.list(tenant_id) if k.name == "ci")
    r = await api.client.post(
        f"/console/tenants/{tenant_id}/keys/{key.id}/revoke", data={"csrf": csrf_of(later.text)}
    )
    assert r.status_code == 303
    assert (await api.client.get("/api/executions", headers=key_headers)).status_code == 401


async def test_filters_and_cursor_pages(api: Api) -> None:
    a = await api.tenant("filter-a")
    b = await api.tenant("filter-b")
    wa = await api.workflow(a)
    wb = await api.workflow(b)
    ids_a = [await _trigger(api, a, wa) for _ in range(3)]
    ids_b = [await _trigger(api, b, wb) for _ in range(2)]
    tenant_a = (await api.ctx.store.insights.find_execution(ids_a[0])).tenant_id
    await api.ctx.store.executions.cancel(tenant_a, ids_a[0])
    await sign_in(api.client)

    async def listed(query: str) -> list[str]:
        r = await api.client.get(f"/console/executions?{query}")
        assert r.status_code == 200, r.text
        return re.findall(r'href="/console/executions/([0-9a-f]{32})"', r.text)

    assert await listed(f"tenant={tenant_a}") == ids_a[::-1]
    assert await listed(f"workflow={wb}") == ids_b[::-1]
    assert await listed(f"workflow={wb}&tenant={tenant_a}") == []
    assert await listed(f"tenant={tenant_a}&status=cancelled") == [ids_a[0]]
    assert set(await listed("status=queued")) >= {*ids_a[1:], *ids_b}
    assert await listed(f"tenant={tenant_a}&since=2999-01-01T00:00") == []
    assert await listed("schedule=nope") == []
    bad = await api.client.get("/console/executions?since=yesterday")
    assert bad.status_code == 400 and "since" in bad.text
    bad = await api.client.get("/console/executions?status=lost")
    assert bad.status_code == 400
    # Cursor pages through the store's own pagination.
    page = await api.ctx.store.insights.search_executions(_filter(tenant_id=tenant_a), limit=2)
    assert [e.id for e in page.items] == ids_a[:0:-1] and page.next_cursor
    r = await api.client.get(f"/console/executions?tenant={tenant_a}&cursor={page.next_cursor}")
    assert ids_a[0] in r.text and ids_a[2] not in r.text


def _filter(**fields: Any) -> Any:
    from conveyor.store import ExecutionFilter

    return ExecutionFilter(**fields)


async def test_overview_shows_queues_charts_and_a_banner_for_unconsumed_queues(api: Api) -> None:
    headers = await api.tenant("overview")
    workflow_id = await api.workflow(headers)
    await _trigger(api, headers, workflow_id)
    await sign_in(api.client)
    r = await api.client.get("/console")
    assert r.status_code == 200
    assert "workflow.execute.us" in r.text and "workflow.execute.eu" in r.text
    assert 'class="chart"' in r.text and "Executions per minute" in r.text
    assert "no live worker consumes it" in r.text  # no worker in this test
    # storage figures (GET /api/admin/storage's database part), read once per page load
    storage = r.text[r.text.index("<h2>Storage</h2>") :]
    row = re.search(r"<td>executions</td>\s*<td class=\"num\">(\d+)</td>", storage)
    assert row is not None and int(row.group(1)) >= 1, storage[:600]
    live = await api.client.get("/console/live/overview")
    assert "<h2>Storage</h2>" not in live.text  # not recounted on every live refresh


async def test_activity_counts_starts_per_minute(api: Api) -> None:
    headers = await api.tenant("activity")
    tenant_id = await _tenant_id(api, headers)
    workflow_id = await api.workflow(headers)
    execution_id = await _trigger(api, headers, workflow_id)
    now = utcnow()
    claimed = await api.ctx.store.runs.claim(execution_id, now, now + timedelta(seconds=30))
    assert claimed is not None
    activity = await api.ctx.store.insights.activity()
    assert len(activity.minutes) == 60
    assert sum(activity.started) >= 1 and activity.p50_ms[-1] is not None
    found = await api.ctx.store.insights.find_execution(execution_id)
    assert found.tenant_id == tenant_id and found.status == "running"


async def test_overview_answers_with_a_banner_when_redis_is_down(api_env: dict[str, str]) -> None:
    from tests.helpers import free_port

    env = {**api_env, "QUEUE_REDIS_PORT": str(free_port())}  # nothing listens there
    async with running_api(make_settings(**env)) as api:
        await sign_in(api.client)
        r = await api.client.get("/console")
        assert r.status_code == 200
        assert "Redis is unreachable" in r.text
        assert 'class="chart"' in r.text  # the database part still renders
        live = await api.client.get("/console/live/overview")
        assert live.status_code == 200 and "Redis is unreachable" in live.text


async def test_a_sub_workflow_links_to_its_parent(api: Api) -> None:
    headers = await api.tenant("subflows")
    tenant_id = await _tenant_id(api, headers)
    workflow_id = await api.workflow(headers)
    parent_id = await _trigger(api, headers, workflow_id)
    child, created = await api.ctx.store.children.start(
        tenant_id=tenant_id, parent_id=parent_id, seq=0, depth=1, workflow_id=workflow_id,
        version="latest", input=None, now=utcnow(),
    )  # fmt: skip
    assert created and child.triggered_by == "workflow"
    await sign_in(api.client)
    page = (await api.client.get(f"/console/executions/{child.id}")).text
    assert f'sub-workflow of <a href="/console/executions/{parent_id}">' in page
    assert "depth 1" in page
    parent_page = (await api.client.get(f"/console/executions/{parent_id}")).text
    assert "sub-workflow of" not in parent_page
