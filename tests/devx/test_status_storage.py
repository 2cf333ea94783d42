"""Unit tests: the storage section of ``conveyor status`` (``GET /api/admin/storage``)."""

from __future__ import annotations

import argparse
import io
from typing import Any

import httpx
import pytest

from conveyor.cli import status
from conveyor.cli.tables import render, size, storage_lines
from conveyor.settings import load_settings

STORAGE: dict[str, Any] = {
    "success": True,
    "data": {
        "timestamp": "2024-05-15T18:19:00.000Z",
        "database": {
            "dialect": "postgresql",
            "totalBytes": 3 * 1024**3,
            "tables": [
                {"name": "executions", "rows": 1250000, "rowsExact": False,
                 "bytes": 2831155200, "oldest": "2024-05-01T18:19:00Z"},
                {"name": "tenants", "rows": 3, "rowsExact": True, "bytes": 16384,
                 "oldest": None},
            ],
        },
        "redis": {"status": "ready", "usedMemory": 5 * 1024**2, "maxmemory": 0,
                  "queues": [{"queue": "workflow.execute.us", "completed": 1000, "failed": 12,
                              "events": 10012}]},
        "retention": {"executionRetentionS": 1209600, "maxPerTenant": None,
                      "tenantsOverriding": 2,
                      "queueKeepCompleted": {"count": 1000, "ageS": 86400},
                      "queueKeepFailed": {"count": 10000, "ageS": 604800},
                      "queueEventsMaxLen": 10000},
    },
}  # fmt: skip
_CLIENT = httpx.Client
STATUS: dict[str, Any] = {"success": True, "data": {"timestamp": "2024-05-15T18:19:00.000Z"}}


def test_storage_section() -> None:
    text = "\n".join(storage_lines(STORAGE))
    assert text.startswith("STORAGE  database postgresql 3.0 GB | redis 5.0 MB used")
    executions = next(line for line in text.splitlines() if line.startswith("executions"))
    assert executions.split() == ["executions", "~1250000", "2.6", "GB", "14d00h", "ago"]
    tenants = next(line for line in text.splitlines() if line.startswith("tenants"))
    assert tenants.split() == ["tenants", "3", "16.0", "KB", "-"]
    queue = next(line for line in text.splitlines() if line.startswith("workflow.execute.us"))
    assert queue.split() == ["workflow.execute.us", "1000", "12", "10012"]
    assert "retention 14d00h, cap -, 2 tenant(s) override" in text
    assert "keeps completed 1000 jobs/1d00h, failed 10000 jobs/7d00h | events <= 10000" in text


def test_sizes_and_missing_pieces() -> None:
    assert (size(812), size(4300), size(None), size(True)) == ("812 B", "4.2 KB", "-", "-")
    assert storage_lines(None, "storage not shown: HTTP 404") == [
        "STORAGE",
        "  storage not shown: HTTP 404",
    ]
    down = {"data": {"database": {"dialect": "sqlite", "tables": []},
                     "redis": {"status": "unreachable"}}}  # fmt: skip
    assert storage_lines(down)[0] == "STORAGE  database sqlite - | redis unreachable"
    assert "STORAGE" not in render(STATUS)  # not asked for: no section


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    status.add_arguments(parser)
    return parser.parse_args(argv)


def _run_against(monkeypatch: pytest.MonkeyPatch, handler: Any, *argv: str) -> str:
    out = io.StringIO()

    def client(**kwargs: Any) -> httpx.Client:
        return _CLIENT(transport=httpx.MockTransport(handler), **kwargs)

    monkeypatch.setattr(httpx, "Client", client)
    code = status.run(_parse("--url", "http://api", "--token", "t", *argv),
                      load_settings({}), out=out)  # fmt: skip
    assert code == 0
    return out.getvalue()


def test_status_shows_storage_and_survives_an_api_without_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def both(request: httpx.Request) -> httpx.Response:
        doc = STORAGE if request.url.path == status.STORAGE_PATH else STATUS
        return httpx.Response(200, json=doc)

    assert "STORAGE  database postgresql" in _run_against(monkeypatch, both)

    def older(request: httpx.Request) -> httpx.Response:
        if request.url.path == status.STORAGE_PATH:
            return httpx.Response(404, json={"detail": "Not Found"})
        return httpx.Response(200, json=STATUS)

    text = _run_against(monkeypatch, older)
    assert "storage not shown: GET http://api/api/admin/storage answered HTTP 404" in text
    assert "/api/admin/storage" not in _run_against(
        monkeypatch, both, "--json"
    )  # --json: status only
