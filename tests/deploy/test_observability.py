"""deploy/observability: alert rules (promtool), the Grafana dashboard, and their metric names.

``promtool`` (Debian's ``prometheus`` package; ``.ci/run`` installs it) must be present: these
tests fail, never skip, without it. Every metric name the dashboard and the alert rules use is
checked against the families the real API renders on ``/metrics`` after one observation of
each kind, so a renamed metric breaks the suite instead of a dashboard.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from conveyor.queue import WorkflowExecute
from conveyor.runtime import Heartbeat, MetricsPublisher
from tests.api.conftest import Api, api, api_env, migrated_pg
from tests.deploy._files import ROOT

__all__ = ["api", "api_env", "migrated_pg"]  # fixtures of tests/api, used here

OBS = ROOT / "deploy" / "observability"
ALERTS = OBS / "prometheus" / "alerts.yml"
ALERT_TESTS = OBS / "prometheus" / "alerts.test.yml"
DASHBOARD = OBS / "grafana" / "conveyor.json"
OPERATIONS = ROOT / "docs" / "operations.md"
DATASOURCE_UID = "${DS_PROMETHEUS}"

# Series Prometheus adds itself, not rendered by /metrics.
PROMETHEUS_OWN = {"up", "scrape_duration_seconds", "scrape_samples_scraped"}


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        raise AssertionError(
            "`promtool` is not installed: apt-get install prometheus (.ci/run does it)"
        )
    return found


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], capture_output=True, text=True, timeout=120, cwd=cwd, check=False
    )


# --- alert rules ----------------------------------------------------------------------------
def _alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_promtool_check_rules() -> None:
    result = _promtool("check", "rules", ALERTS.name, cwd=ALERTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alert_rules())} rules found" in result.stdout


def test_promtool_test_rules() -> None:
    result = _promtool("test", "rules", ALERT_TESTS.name, cwd=ALERT_TESTS.parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_check_config_of_the_compose_prometheus(tmp_path: Path) -> None:
    """The compose profile's prometheus.yml is valid, with the rules at the path it mounts."""
    config = yaml.safe_load((OBS / "prometheus" / "prometheus.yml").read_text(encoding="utf-8"))
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    config["rule_files"] = [str(ALERTS)]
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    result = _promtool("check", "config", path.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_unit_tested_firing_and_resolved() -> None:
    doc = yaml.safe_load(ALERT_TESTS.read_text(encoding="utf-8"))
    fired: set[str] = set()
    quiet: set[str] = set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            (fired if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in _alert_rules()}
    assert names <= fired, f"never seen firing: {sorted(names - fired)}"
    assert names <= quiet, f"never seen quiet/resolved: {sorted(names - quiet)}"


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to dashes."""
    out = set()
    for heading in re.findall(r"^#{1,6} +(.+?) *$", markdown, re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        out.add(slug)
    return out


def test_every_alert_links_to_its_runbook_in_operations_md() -> None:
    text = OPERATIONS.read_text(encoding="utf-8")
    alerts_section = text[text.index("\n## Alerts\n") :]
    anchors = _anchors(alerts_section)
    for rule in _alert_rules():
        url = rule["annotations"]["runbook_url"]
        path, _, anchor = url.partition("#")
        assert path == "docs/operations.md", url
        assert anchor == rule["alert"].lower() and anchor in anchors, url
        assert rule["labels"]["severity"] in {"critical", "warning"}
        assert rule["annotations"]["summary"]


# --- dashboard ------------------------------------------------------------------------------
def _dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return data


def _panels(dash: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in dash["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _datasource_refs(value: Any) -> Iterator[Any]:
    if isinstance(value, dict):
        for key, item in value.items():
            if key == "datasource":
                yield item
            else:
                yield from _datasource_refs(item)
    elif isinstance(value, list):
        for item in value:
            yield from _datasource_refs(item)


def test_dashboard_is_importable_json_with_panels_and_targets() -> None:
    dash = _dashboard()
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36
    panels = list(_panels(dash))
    assert len({p["id"] for p in panels}) == len(panels), "panel ids are unique"
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 15
    for panel in graphs:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["expr"].strip() and target["refId"], panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]


def test_dashboard_datasource_references_are_consistent() -> None:
    """One datasource everywhere: the ``DS_PROMETHEUS`` variable, which works both when the
    JSON is imported by hand and when Grafana provisions it (the compose profile)."""
    dash = _dashboard()
    [variable] = [v for v in dash["templating"]["list"] if v["name"] == "DS_PROMETHEUS"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    refs = list(_datasource_refs(dash["panels"]))
    assert refs
    for ref in refs:
        assert ref == {"type": "prometheus", "uid": DATASOURCE_UID}, ref


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every dashboard query (as recording rules; Grafana's ``$__…`` range
    variables replaced by a duration)."""
    exprs = [re.sub(r"\$__\w+", "5m", e) for e in _dashboard_exprs()]
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{i}", "expr": e} for i, e in enumerate(exprs)
    ]}]}  # fmt: skip
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    result = _promtool("check", "rules", path.name, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_covers_the_issue() -> None:
    exprs = " ".join(_dashboard_exprs())
    for name in (
        "conveyor_queue_jobs", "conveyor_queue_oldest_waiting_seconds",
        "conveyor_executions_finished_total", "conveyor_start_latency_seconds_bucket",
        "conveyor_step_duration_seconds_bucket", "conveyor_timer_lag_seconds_bucket",
        "conveyor_scheduler_leader", "conveyor_scheduler_lag_seconds_bucket",
        "conveyor_worker_active_jobs", "conveyor_worker_concurrency",
        "conveyor_tenant_executions_finished_total",
    ):  # fmt: skip
        assert name in exprs, name
    assert "topk(" in exprs


# --- metric names in PromQL vs what /metrics renders -----------------------------------------
PROMQL_WORDS = {
    # aggregations and functions are followed by "(" and dropped by the regex; these are not
    "by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless",
    "offset", "bool", "inf", "nan",
}  # fmt: skip
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'')
_MATCHERS = re.compile(r"\{[^}]*\}")
_RANGES = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"(?<![\w:.$])([a-zA-Z_:][a-zA-Z0-9_:]*+)(?!\s*\()")


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers that are not functions (followed by
    ``(``), label names (inside ``{}`` or grouping clauses), durations or keywords."""
    text = _STRINGS.sub(" ", expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    return {n for n in _IDENT.findall(text) if n.lower() not in PROMQL_WORDS}


def test_metric_name_parser() -> None:
    expr = (
        "histogram_quantile(0.99, sum by (le) (rate(conveyor_timer_lag_seconds_bucket[5m])))"
        ' > 1 and on (queue) max by (queue) (conveyor_queue_jobs{state="active", x="a b"})'
        " == 0 or up{job='x'} / ignoring(instance) foo_total offset 5m"
        " / sum(rate(bar_seconds_sum[$__rate_interval]))"
    )
    assert metric_names(expr) == {
        "conveyor_timer_lag_seconds_bucket", "conveyor_queue_jobs", "up", "foo_total",
        "bar_seconds_sum",
    }  # fmt: skip


def _dashboard_exprs() -> list[str]:
    return [t["expr"] for p in _panels(_dashboard()) for t in p.get("targets", [])]


def _alert_exprs() -> list[str]:
    return [str(rule["expr"]) for rule in _alert_rules()]


async def _publish_one_of_each(api: Api) -> None:
    """Make every family of /metrics have samples: one observation of each kind, heartbeats
    of a worker and a leading scheduler, a waiting job, an HTTP request."""
    publisher = MetricsPublisher(api.ctx.queues)
    publisher.observe_execution(0.5, "succeeded")
    publisher.observe_step("noop", "succeeded", 0.001)
    publisher.count_tenant_execution("t1", "succeeded")
    publisher.count_stalled("workflow.execute.us")
    publisher.count_parked("concurrency")
    publisher.count_scheduler_misfires("fire_once")
    publisher.count_pruned("executions", 1)
    publisher.observe_start_latency(0.01)
    publisher.observe_scheduler_lag(0.02)
    publisher.observe_timer_lag(0.03)
    await publisher.flush()
    q, s = api.ctx.queues, api.settings
    await Heartbeat(q, role="worker", settings=s,
                    info_fn=lambda: {"activeJobs": 1, "concurrency": 2}).beat()  # fmt: skip
    await Heartbeat(q, role="scheduler", settings=s, info_fn=lambda: {"lockHeld": True}).beat()
    await api.ctx.dispatcher.enqueue(
        WorkflowExecute(execution_id="e1", tenant_id="t1", workflow_id="w", region="us")
    )
    await api.client.get("/api/health")


async def test_every_metric_the_dashboard_and_alerts_use_is_rendered(api: Api) -> None:
    await _publish_one_of_each(api)
    r = await api.client.get("/metrics")
    assert r.status_code == 200
    rendered: set[str] = set()
    empty: set[str] = set()
    for family in text_string_to_metric_families(r.text):
        rendered.add(family.name)
        rendered.update(sample.name for sample in family.samples)
        if not family.samples:
            empty.add(family.name)
    assert not empty, f"families without samples (publish one of each): {sorted(empty)}"

    used: dict[str, set[str]] = {}
    for where, exprs in (("dashboard", _dashboard_exprs()), ("alerts", _alert_exprs())):
        for expr in exprs:
            for name in metric_names(expr):
                used.setdefault(name, set()).add(where)
    assert used, "no metric names parsed"
    missing = {
        name: sorted(where)
        for name, where in used.items()
        if name not in rendered and name not in PROMETHEUS_OWN
    }
    assert not missing, f"used but not rendered by /metrics: {missing}"


@pytest.mark.parametrize("name", sorted(PROMETHEUS_OWN))
def test_prometheus_own_series_are_not_conveyors(name: str) -> None:
    assert not name.startswith("conveyor_")
