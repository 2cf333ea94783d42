"""The console in a real browser: Debian's chromium driven by Playwright, against real
``conveyor api``, ``worker`` and ``timers`` processes on Redis and PostgreSQL.

Every test fails on a browser console error or an uncaught page error. The pages' screenshots
(light theme, 1280 x 900) are written to a temporary folder, or to ``docs/console/`` with
``UPDATE_SCREENSHOTS=1`` (how ``docs/console.md`` is refreshed).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from playwright.sync_api import Browser, ConsoleMessage, Dialog, Page, expect, sync_playwright

from tests.api.conftest import ADMIN, ADMIN_TOKEN
from tests.conftest import REDIS_HOST, REDIS_PORT
from tests.helpers import free_port, wait_for
from tests.scheduler._support import base_env, processes

pytestmark = pytest.mark.slow

DOCS = Path(__file__).resolve().parents[2] / "docs" / "console"
VIEWPORT = {"width": 1280, "height": 900}
XSS_TEXT = '<script>document.title="pwned"</script>'
XSS_LINK = "javascript:alert(document.domain)"

DELAY_WORKFLOW = {"name": "nightly-report", "steps": [
    {"id": "prepare", "type": "transform", "expression": "{report: input.report, rows: `42`}"},
    {"id": "wait", "type": "delay", "seconds": 3600},
    {"id": "send", "type": "noop"},
]}  # fmt: skip
QUICK_WORKFLOW = {"name": "order-sync", "steps": [
    {"id": "shape", "type": "transform", "expression": "{order: input.order, ok: `true`}"},
    {"id": "done", "type": "noop"},
]}  # fmt: skip
XSS_WORKFLOW = {"name": "untrusted-output", "steps": [
    {"id": "evil", "type": "transform",
     "expression": f"{{html: '{XSS_TEXT}', link: '{XSS_LINK}', anchor: '<a href=\"{XSS_LINK}\">x</a>'}}"},
]}  # fmt: skip


@dataclass
class Stack:
    base: str
    http: httpx.Client
    tenant_id: str = ""
    auth: dict[str, str] = field(default_factory=dict)
    workflows: dict[str, str] = field(default_factory=dict)

    def trigger(self, name: str, data: Any = None) -> str:
        r = self.http.post(
            f"/api/workflows/{self.workflows[name]}/executions",
            json={"input": data},
            headers=self.auth,
        )
        assert r.status_code == 202, r.text
        return str(r.json()["data"]["id"])

    def status(self, execution_id: str) -> str:
        r = self.http.get(f"/api/executions/{execution_id}", headers=self.auth)
        return str(r.json()["data"]["status"])


def _screens_dir(tmp: Path) -> Path:
    if os.environ.get("UPDATE_SCREENSHOTS") == "1":
        DOCS.mkdir(parents=True, exist_ok=True)
        return DOCS
    return tmp


@pytest.fixture(scope="module")
def stack(migrated_pg: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The API, one worker, the timer dispatcher and the scheduler as real processes, with a tenant, its key,
    three workflows (one with a new version) and a schedule."""
    prefix = f"cvc{uuid.uuid4().hex[:10]}"
    port = free_port()
    env = base_env(
        {"QUEUE_REDIS_HOST": REDIS_HOST, "QUEUE_REDIS_PORT": str(REDIS_PORT), "QUEUE_PREFIX": prefix},
        migrated_pg,
        ADMIN_TOKEN=ADMIN_TOKEN, API_PORT=str(port), EXECUTION_REGIONS="us",
        LOG_FORMAT="text", LOG_LEVEL="WARNING",
    )  # fmt: skip
    try:
        with (
            processes() as start,
            httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http,
        ):
            api = start("conveyor.api", env, "api")
            start("conveyor.workers.execution", env, "worker")
            start("conveyor.workers.timer_dispatcher", env, "timers")
            start("conveyor.workers.scheduler", env, "scheduler")

            def ready() -> bool:
                assert api.alive(), api.log()[-3000:]
                try:
                    return http.get("/api/health/ready").status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(ready, timeout=30, interval=0.2)
            s = Stack(base=f"http://127.0.0.1:{port}", http=http)
            _seed(s)
            yield s
    finally:
        client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT)
        keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
        for i in range(0, len(keys), 500):
            client.delete(*keys[i : i + 500])
        client.close()


def _seed(s: Stack) -> None:
    tenant = s.http.post("/api/admin/tenants", json={"name": "Acme Logistics"}, headers=ADMIN)
    s.tenant_id = tenant.json()["data"]["id"]
    key = s.http.post(f"/api/admin/tenants/{s.tenant_id}/api-keys", json={"name": "backend"},
                      headers=ADMIN).json()["data"]["key"]  # fmt: skip
    s.auth = {"Authorization": f"Bearer {key}"}
    for name, doc in (("delay", DELAY_WORKFLOW), ("quick", QUICK_WORKFLOW), ("xss", XSS_WORKFLOW)):
        r = s.http.post("/api/workflows", json=doc, headers=s.auth)
        assert r.status_code == 201, r.text
        s.workflows[name] = r.json()["data"]["id"]
    changed = {**QUICK_WORKFLOW, "steps": [*QUICK_WORKFLOW["steps"][:1],
               {"id": "notify", "type": "noop"}, {"id": "done", "type": "noop"}]}  # fmt: skip
    r = s.http.put(f"/api/workflows/{s.workflows['quick']}", json=changed, headers=s.auth)
    assert r.status_code == 200, r.text
    r = s.http.post("/api/schedules", headers=s.auth, json={
        "workflowId": s.workflows["quick"], "name": "hourly sync", "cron": "0 * * * *",
        "timezone": "Europe/Berlin", "input": {"order": 7}})  # fmt: skip
    assert r.status_code == 201, r.text
    r = s.http.post("/api/schedules", headers=s.auth, json={
        "workflowId": s.workflows["quick"], "name": "ping every 5 s", "cron": "*/5 * * * * *",
        "input": {"order": 0}})  # fmt: skip
    assert r.status_code == 201, r.text


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    executable = shutil.which("chromium")
    assert executable, (
        "Debian's chromium is missing: apt-get install -y chromium (scripts/test does)"
    )
    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=executable, args=["--no-sandbox"])
        yield launched
        launched.close()


@dataclass
class Watched:
    page: Page
    errors: list[str]
    dialogs: list[str]


@pytest.fixture
def watched(browser: Browser, stack: Stack) -> Iterator[Watched]:
    """A fresh browser context (light theme, fixed viewport); fails the test on any console
    error or uncaught page error."""
    context = browser.new_context(viewport=VIEWPORT, color_scheme="light", base_url=stack.base)  # type: ignore[arg-type]
    page = context.new_page()
    page.set_default_timeout(15_000)
    errors: list[str] = []
    dialogs: list[str] = []

    def on_console(msg: ConsoleMessage) -> None:
        if msg.type == "error":
            errors.append(msg.text)

    def on_dialog(dialog: Dialog) -> None:
        dialogs.append(dialog.message)
        dialog.accept()

    page.on("console", on_console)
    page.on("pageerror", lambda exc: errors.append(f"page error: {exc}"))
    page.on("dialog", on_dialog)
    yield Watched(page, errors, dialogs)
    context.close()
    assert errors == [], errors


def sign_in(page: Page, path: str = "/console") -> None:
    page.goto(path)
    expect(page).to_have_url(re.compile(r"/console/sign-in"))
    page.get_by_label("Admin token").fill(ADMIN_TOKEN)
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("navigation", name="Console")).to_be_visible()


def test_signed_out_browser_is_redirected_and_signs_in(watched: Watched, tmp_path: Path) -> None:
    page = watched.page
    page.goto("/console/executions?status=failed")
    expect(page).to_have_url(re.compile(r"/console/sign-in\?next="))
    page.screenshot(path=str(_screens_dir(tmp_path) / "sign-in.png"))
    page.get_by_label("Admin token").fill("wrong")
    page.keyboard.press("Enter")
    expect(page.get_by_role("alert")).to_contain_text("not the admin token")
    page.get_by_label("Admin token").fill(ADMIN_TOKEN)
    page.keyboard.press("Enter")
    expect(page).to_have_url(re.compile(r"/console/executions\?status=failed$"))
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(re.compile(r"/console/sign-in$"))
    page.goto("/console")
    expect(page).to_have_url(re.compile(r"/console/sign-in"))
    # Failed sign-ins are 401 answers, which the browser reports as console errors.
    watched.errors[:] = [e for e in watched.errors if "401" not in e]


def test_live_overview_updates_after_a_trigger(
    watched: Watched, stack: Stack, tmp_path: Path
) -> None:
    page = watched.page
    sign_in(page)
    started = page.locator('[data-total="started"]')
    expect(started).to_be_visible()
    before = int(started.inner_text())
    page.evaluate("window.__notReloaded = true")
    ids = [stack.trigger("quick", {"order": i}) for i in range(3)]
    expect(started).to_have_text(re.compile(r"\d+"))
    wait_for(lambda: int(started.inner_text()) >= before + 3, timeout=20, interval=0.3)
    assert page.evaluate("window.__notReloaded") is True
    wait_for(lambda: all(stack.status(i) == "succeeded" for i in ids), timeout=20, interval=0.2)
    expect(page.locator('[data-queue="workflow.execute.us"]')).to_be_visible()
    expect(page.get_by_role("img", name=re.compile("Executions per minute"))).to_be_visible()
    page.screenshot(path=str(_screens_dir(tmp_path) / "overview.png"), full_page=True)


def test_find_an_execution_by_filter_and_see_its_steps(
    watched: Watched, stack: Stack, tmp_path: Path
) -> None:
    page = watched.page
    execution_id = stack.trigger("delay", {"report": "daily"})
    wait_for(lambda: stack.status(execution_id) == "waiting", timeout=20, interval=0.2)
    sign_in(page, "/console/executions")
    page.get_by_label("Workflow").fill(stack.workflows["delay"])
    page.get_by_label("Status").select_option("waiting")
    page.get_by_role("button", name="Filter").click()
    expect(page).to_have_url(re.compile(r"status=waiting"))
    link = page.get_by_role("link", name=execution_id)
    expect(link).to_be_visible()
    page.screenshot(path=str(_screens_dir(tmp_path) / "executions.png"), full_page=True)
    link.click()
    expect(page.locator("#exec-status")).to_have_text("waiting")
    steps = page.locator("li.step")
    expect(steps).to_have_count(2)  # prepare, wait (send has not run)
    expect(steps.nth(0)).to_contain_text("prepare")
    steps.nth(0).locator("summary").click()
    expect(steps.nth(0).locator("pre.json").nth(1)).to_contain_text('"rows": 42')
    expect(page.get_by_text("Waiting on")).to_be_visible()
    expect(page.get_by_text(re.compile(r"timer:[0-9a-f]+"))).to_be_visible()
    page.screenshot(path=str(_screens_dir(tmp_path) / "execution.png"), full_page=True)


def test_cancel_a_waiting_execution_and_watch_its_status_change(
    watched: Watched, stack: Stack
) -> None:
    page = watched.page
    first = stack.trigger("delay", {"report": "weekly"})
    second = stack.trigger("delay", {"report": "monthly"})
    wait_for(
        lambda: {stack.status(first), stack.status(second)} == {"waiting"}, timeout=20, interval=0.2
    )
    sign_in(page, f"/console/executions/{first}")
    expect(page.locator("#exec-status")).to_have_text("waiting")
    page.get_by_role("link", name="Cancel…").click()
    expect(page.get_by_role("heading", name="Cancel execution")).to_be_visible()
    page.get_by_role("button", name="Cancel execution").click()
    expect(page).to_have_url(re.compile(f"/console/executions/{first}$"))
    expect(page.locator("#exec-status")).to_have_text("cancelled")
    assert stack.status(first) == "cancelled"
    # Cancelled elsewhere (the tenant API): the open page follows without a reload.
    page.goto(f"/console/executions/{second}")
    expect(page.locator("#exec-status")).to_have_text("waiting")
    r = stack.http.post(f"/api/executions/{second}/cancel", headers=stack.auth)
    assert r.status_code == 200
    expect(page.locator("#exec-status")).to_have_text("cancelled", timeout=10_000)
    expect(page.get_by_role("link", name="Retry from start…")).to_be_visible()
    expect(page.get_by_role("link", name="Retry from failed step…")).to_have_count(0)


def test_issue_and_revoke_a_key(watched: Watched, stack: Stack, tmp_path: Path) -> None:
    page = watched.page
    sign_in(page, "/console/tenants")
    page.get_by_role("link", name="Acme Logistics").click()
    page.get_by_label("Key name").fill("ci-pipeline")
    page.get_by_role("button", name="Issue key").click()
    token = page.locator("#issued-token").inner_text().strip()
    assert token.startswith("cvk_")
    assert (
        stack.http.get("/api/executions", headers={"Authorization": f"Bearer {token}"}).status_code
        == 200
    )
    page.screenshot(path=str(_screens_dir(tmp_path) / "tenant.png"), full_page=True)
    row = page.locator("tr", has_text="ci-pipeline")
    row.get_by_role("button", name="Revoke").click()
    expect(page.locator("tr", has_text="ci-pipeline")).to_contain_text("revoked")
    assert watched.dialogs and "Revoke the key" in watched.dialogs[-1]
    expect(page.locator("#issued-token")).to_have_count(0)
    assert (
        stack.http.get("/api/executions", headers={"Authorization": f"Bearer {token}"}).status_code
        == 401
    )


def test_stored_xss_in_a_step_output_stays_inert(watched: Watched, stack: Stack) -> None:
    page = watched.page
    execution_id = stack.trigger("xss", {"note": XSS_TEXT})
    wait_for(lambda: stack.status(execution_id) == "succeeded", timeout=20, interval=0.2)
    sign_in(page, f"/console/executions/{execution_id}")
    title = page.title()
    page.locator("li.step summary").first.click()
    expect(page.locator("li.step").first).to_contain_text("<script>document.title=")
    expect(page.locator("li.step").first).to_contain_text(XSS_LINK)
    assert page.title() == title and "pwned" not in page.title()
    assert page.locator('a[href^="javascript:"]').count() == 0
    assert page.locator("main script").count() == 0
    page.wait_for_timeout(2500)  # one live refresh later, still inert
    assert page.title() == title and watched.dialogs == []


def test_actions_without_the_csrf_token_are_refused(watched: Watched, stack: Stack) -> None:
    page = watched.page
    sign_in(page)
    r = page.request.post(f"/console/tenants/{stack.tenant_id}/keys", form={"name": "sneaky"})
    assert r.status == 403
    assert r.json()["success"] is False and r.json()["error"]["code"] == "csrf_failed"
    keys = stack.http.get(f"/api/admin/tenants/{stack.tenant_id}/api-keys", headers=ADMIN).json()
    assert "sneaky" not in [k["name"] for k in keys["data"]]


def test_every_page_renders_without_console_errors(
    watched: Watched, stack: Stack, tmp_path: Path
) -> None:
    page = watched.page
    sign_in(page)
    shots = _screens_dir(tmp_path)
    quick = stack.workflows["quick"]
    page.goto(f"/console/tenants/{stack.tenant_id}/workflows/{quick}?a=1&b=2")
    expect(page.locator("pre.diff")).to_contain_text('+      "id": "notify"')
    page.screenshot(path=str(shots / "workflow.png"), full_page=True)
    page.goto(f"/console/schedules?tenant={stack.tenant_id}")
    schedule = page.locator("article.schedule", has_text="hourly sync")
    expect(schedule.locator("ol").first.locator("li")).to_have_count(5)
    expect(schedule.locator("ol").first).to_contain_text("CET")
    ping = page.locator("article.schedule", has_text="ping every 5 s")

    def ticked() -> bool:
        if ping.locator("ol").nth(1).get_by_role("link", name="run").count() > 0:
            return True
        page.reload()
        return False

    wait_for(ticked, timeout=15, interval=1.0)
    page.screenshot(path=str(shots / "schedules.png"), full_page=True)
    schedule.get_by_role("button", name="Pause").click()
    expect(page.locator("article.schedule", has_text="hourly sync")).to_contain_text("paused")
    page.locator("article.schedule", has_text="hourly sync").get_by_role(
        "button", name="Resume"
    ).click()
    expect(page.locator("article.schedule", has_text="hourly sync")).to_contain_text("active")
    for path in ("/console", "/console/executions", "/console/workflows", "/console/tenants",
                 f"/console/tenants/{stack.tenant_id}", "/console/executions?status=succeeded"):  # fmt: skip
        page.goto(path)
        expect(page.get_by_role("heading", level=1)).to_be_visible()
    page.goto("/console/tenants")
    page.screenshot(path=str(shots / "tenants.png"), full_page=True)
    # Keyboard: the skip link is the first stop and leads to the content.
    page.keyboard.press("Tab")
    expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    page.wait_for_timeout(100)


def test_dark_theme_follows_the_system(browser: Browser, stack: Stack, tmp_path: Path) -> None:
    context = browser.new_context(
        viewport={"width": 390, "height": 844}, color_scheme="dark", base_url=stack.base
    )
    page = context.new_page()
    try:
        sign_in(page)
        background = page.evaluate("getComputedStyle(document.body).backgroundColor")
        assert background == "rgb(18, 21, 27)"
        page.screenshot(path=str(tmp_path / "overview-dark-phone.png"))
    finally:
        context.close()
