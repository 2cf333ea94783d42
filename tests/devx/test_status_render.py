"""Unit tests: rendering the admin status document, the status client's error mapping, --watch."""

from __future__ import annotations

import argparse
import io
import json
from typing import Any

import httpx
import pytest

from conveyor.cli import status
from conveyor.cli.tables import age, parse_time, queue_rows, render, table
from conveyor.settings import load_settings

SEED_SAMPLE: dict[str, Any] = {
    "success": True,
    "data": {
        "timestamp": "2024-05-15T18:19:00.000Z",
        "executionWorker": {
            "started": True,
            "queueDriver": "bullmq",
            "metrics": {
                "queueDepths": {"workflow.execute.us": {"waiting": 2, "active": 1, "total": 3}}
            },
        },
        "scheduler": {"preferredStrategy": "postgres", "redis": {"status": "ready"}},
    },
}

FULL: dict[str, Any] = {
    "success": True,
    "data": {
        "timestamp": "2024-05-15T18:19:00.000Z",
        "executionWorker": {
            "started": True,
            "queueDriver": "bullmq",
            "metrics": {
                "queueDepths": {
                    "workflow.execute.us": {"waiting": 12, "active": 2, "delayed": 1, "total": 15},
                    "workflow.execute.eu": {"waiting": 7, "active": 0, "delayed": 0, "total": 7},
                }
            },
        },
        "scheduler": {
            "preferredStrategy": "redis",
            "redis": {"status": "ready"},
            "lastTick": "2024-05-15T18:18:55.000Z",
        },
        "timerDispatcher": {"nextDueAt": "2024-05-15T18:21:00.000Z", "backlog": 4, "lagMs": 35},
        "regions": [
            {"queue": "workflow.execute.us", "region": "us", "status": "consumed", "workers": 1},
            {"queue": "workflow.execute.eu", "region": "eu", "status": "unconsumed", "workers": 0},
        ],
        "processes": [
            {"id": "worker-a-101", "role": "worker", "regions": ["us"], "pid": 101, "host": "a",
             "startedAt": "2024-05-15T17:19:00.000Z", "lastHeartbeat": "2024-05-15T18:18:57.000Z",
             "concurrency": 4, "activeJobs": 2, "jobsDone": 90, "jobsFailed": 3},
            {"id": "scheduler-b-7", "role": "scheduler", "regions": ["us"], "pid": 7, "host": "b",
             "startedAt": "2024-05-15T18:00:00.000Z", "lastHeartbeat": "2024-05-15T18:18:59.000Z",
             "lockHeld": True, "lastTick": "2024-05-15T18:18:55.000Z"},
            {"id": "scheduler-c-8", "role": "scheduler", "regions": ["us"], "pid": 8, "host": "c",
             "startedAt": "2024-05-15T18:00:00.000Z", "lastHeartbeat": 1715797138000,
             "lockHeld": False},
        ],
        "errors": ["heartbeats: timed out"],
    },
}  # fmt: skip


def _line(text: str, start: str) -> str:
    return next(line for line in text.splitlines() if line.startswith(start))


def _proc(text: str, pid: int) -> str:
    return next(
        line for line in text.splitlines() if line.split()[0:3:2] == ["scheduler", str(pid)]
    )


def test_seed_sample_renders_depths_driver_and_strategy() -> None:
    text = render(SEED_SAMPLE, source="http://api:8000")
    assert "http://api:8000" in text and "2024-05-15T18:19:00.000Z" in text
    assert _line(text, "QUEUE ").split() == ["QUEUE", "REGION", "WAITING", "ACTIVE", "TOTAL"]
    assert _line(text, "workflow.execute.us").split() == [
        "workflow.execute.us",
        "us",
        "2",
        "1",
        "3",
    ]
    assert "queue driver bullmq" in text and "redis ready" in text
    assert "strategy     postgres" in text
    assert "PROCESSES (0 live)" in text


def test_full_document_tables() -> None:
    text = render(FULL)
    # Queues: sorted, extra counts between active and total, consumers from `regions`.
    assert _line(text, "QUEUE ").split() == [
        "QUEUE", "REGION", "WAITING", "ACTIVE", "DELAYED", "TOTAL", "WORKERS", "CONSUMERS"
    ]  # fmt: skip
    assert _line(text, "workflow.execute.eu").split() == [
        "workflow.execute.eu",
        "eu",
        "7",
        "0",
        "0",
        "7",
        "0",
        "unconsumed",
    ]
    assert text.index("workflow.execute.eu") < text.index("workflow.execute.us")
    # Processes: ages against the document's timestamp (ms epoch accepted too), role details.
    assert "PROCESSES (3 live)" in text
    worker = _line(text, "worker ")
    assert worker.split()[:7] == ["worker", "us", "101", "a", "2/4", "3s", "ago"]
    assert "done 90, failed 3" in worker
    assert "lock holder, last tick 5s ago" in _proc(text, 7)
    assert "standby" in _proc(text, 8) and "2s ago" in _proc(text, 8)
    # Scheduler: lock holder taken from the heartbeats when the section does not name one.
    assert "lock holder  scheduler-b-7" in text and "last tick    5s ago" in text
    # Timers: next due and backlog from the timerDispatcher section.
    assert "next due     2024-05-15T18:21:00+00:00 (in 2m00s)" in text
    assert "backlog      4" in text and "lag          35ms" in text
    assert "!! heartbeats: timed out" in text


def test_missing_sections_render_dashes() -> None:
    text = render({"success": True, "data": {}})
    assert "(no queues)" in text and "(no live process" in text
    assert "strategy     -" in text and "TIMERS\n  -" in text


def test_helpers() -> None:
    now = parse_time("2024-05-15T18:19:00Z")
    assert age("2024-05-15T18:18:00Z", now) == "1m00s ago"
    assert age("2024-05-15T20:19:00+00:00", now) == "in 2h00m"
    assert age(1715797140000 - 4000, now) == "4s ago"
    assert age(None, now) == "-" and age("garbage", now) == "-"
    lines = table(["NAME", "N"], [["a", 5], ["long-name", 12345]], right=[1])
    assert lines == ["NAME           N", "a              5", "long-name  12345"]
    _headers, rows = queue_rows({"other": {"waiting": 1, "total": 1}})
    assert rows == [["other", "-", 1, None, 1]]


def _client(handler: Any) -> httpx.Client:
    return httpx.Client(transport=httpx.MockTransport(handler))


@pytest.mark.parametrize(
    ("code", "body", "expected"),
    [
        (401, {"success": False, "error": {"code": "unauthorized", "message": "bad token"}}, "refused the admin token"),
        (503, {"success": False, "error": {"code": "admin_disabled", "message": "admin API disabled"}},
         "admin API disabled"),
        (404, {"detail": "nope"}, "HTTP 404"),
    ],
)  # fmt: skip
def test_fetch_maps_refusals(code: int, body: dict[str, Any], expected: str) -> None:
    with (
        _client(lambda request: httpx.Response(code, json=body)) as client,
        pytest.raises(status.ApiRefused) as exc,
    ):
        status.fetch(client, "http://api", "t")
    assert expected in exc.value.message


def test_fetch_unreachable_and_ok() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with _client(refuse) as client, pytest.raises(status.ApiUnreachable) as exc:
        status.fetch(client, "http://api:1", "t")
    assert "cannot reach the Conveyor API at http://api:1" in exc.value.message

    seen: list[str] = []

    def ok(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers["authorization"])
        return httpx.Response(200, json=SEED_SAMPLE)

    with _client(ok) as client:
        assert status.fetch(client, "http://api/", "sekret") == SEED_SAMPLE
    assert seen == ["Bearer sekret"]


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    status.add_arguments(parser)
    return parser.parse_args(argv)


def test_arguments() -> None:
    assert _parse().watch is None
    assert _parse("--watch").watch == 30.0
    assert _parse("--watch", "5").watch == 5.0
    with pytest.raises(SystemExit):
        _parse("--watch", "0")


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_screen_clears_in_place_on_a_terminal_only() -> None:
    tty = _Tty()
    screen = status._Screen(tty, as_json=False, watching=True, source="x")
    screen.show(SEED_SAMPLE, every_s=30)
    screen.show(SEED_SAMPLE, every_s=30, warning="API unreachable")
    frames = tty.getvalue().split("\x1b[H\x1b[2J")
    assert frames[0] == "" and len(frames) == 3
    assert "refreshing every 30s" in frames[1] and frames[2].startswith("!! API unreachable")

    plain = io.StringIO()
    screen = status._Screen(plain, as_json=True, watching=True, source="x")
    screen.show(SEED_SAMPLE, every_s=30)
    screen.show(SEED_SAMPLE, every_s=30)
    assert "\x1b" not in plain.getvalue()
    assert [json.loads(line) for line in plain.getvalue().splitlines()] == [
        SEED_SAMPLE,
        SEED_SAMPLE,
    ]


def test_no_token_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    settings = load_settings({})
    assert status.run(_parse("--url", "http://127.0.0.1:9"), settings) == 1
    assert "no admin token" in capsys.readouterr().err


def test_redis_line_shows_the_master_and_the_sentinels() -> None:
    view = {"master": "main", "masterAddress": "10.0.0.5:6379", "sentinels": 3, "reachable": 2,
            "quorum": 2, "quorumOk": True, "masterDown": False, "errors": ["sentinel x: refused"]}  # fmt: skip
    doc = {"data": {**FULL["data"], "queue": {"address": "10.0.0.5:6379", "sentinel": view}}}
    text = render(doc)
    assert "redis master 10.0.0.5:6379 | sentinel main: 2/3 answering, quorum 2 ok\n" in text
    lost = {**view, "reachable": 1, "quorumOk": False, "masterDown": True}
    text = render({"data": {"queue": {"address": None, "sentinel": lost}}})
    assert "redis master - | sentinel main: 1/3 answering, quorum 2 NOT REACHABLE" in text
    assert "master seen down" in text
    # Without Sentinel: the address only; an older API (no address): no line at all.
    assert "redis master 127.0.0.1:6379\n" in render({"data": {"queue": {
        "address": "127.0.0.1:6379", "sentinel": None}}})  # fmt: skip
    assert "redis master" not in render(SEED_SAMPLE)
