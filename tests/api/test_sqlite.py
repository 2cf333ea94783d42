"""The API on the embedded default database (SQLite): same behaviour, Redis scheduler lock."""

from __future__ import annotations

from pathlib import Path

from conveyor.store import migrate
from tests.api.conftest import ADMIN, NOOP_WORKFLOW, make_settings, running_api


async def test_api_on_sqlite(api_env: dict[str, str], tmp_path: Path) -> None:
    settings = make_settings(**{**api_env, "DATABASE_URL": f"sqlite:///{tmp_path}/conveyor.db"})
    await migrate(settings)
    async with running_api(settings) as api:
        health = (await api.client.get("/api/health")).json()["data"]
        assert health["database"] == {**health["database"], "dialect": "sqlite", "status": "ready"}
        assert (await api.client.get("/api/health/ready")).status_code == 200
        auth = await api.tenant()
        wf = await api.workflow(auth, NOOP_WORKFLOW)
        headers = {**auth, "Idempotency-Key": "same"}
        first = await api.client.post(f"/api/workflows/{wf}/executions", headers=headers)
        again = await api.client.post(f"/api/workflows/{wf}/executions", headers=headers)
        assert first.status_code == 202 and again.status_code == 200
        assert first.json()["data"]["id"] == again.json()["data"]["id"]
        status = (await api.client.get("/api/admin/workers/status", headers=ADMIN)).json()["data"]
        assert status["scheduler"]["preferredStrategy"] == "redis"
        depth = status["executionWorker"]["metrics"]["queueDepths"]["workflow.execute.us"]
        assert depth["waiting"] == 1
