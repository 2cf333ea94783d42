"""Benchmark: execution triggers and health checks over HTTP against ONE ``conveyor api``
process (Postgres + Redis on this machine, no worker running).

* ``POST /api/workflows/{id}/executions`` (API-key auth, execution row committed, job added
  to ``workflow.execute.us`` through the dispatcher) — requests/s and p99 latency;
* ``GET /api/health`` (Redis + database probes) — requests/s;
* baseline, same run and same load generator: a bare uvicorn app answering a POST with a small
  JSON body (the HTTP stack's ceiling on this machine); the ratio triggers/baseline is printed.

Load generator: ``wrk`` when installed (Debian package ``wrk``), else an async httpx client
(which competes with the API for the same two cores, so expect lower figures).
The script creates and drops its own database and Redis key prefix.

    python bench/api_trigger.py [--duration 10] [--connections 16] [--tool auto|wrk|httpx]

Last line: JSON with ``triggers_per_s``, ``trigger_p99_ms``, ``health_per_s`` (plus the
baseline, the ratio and the API process's CPU time per request — the figure that stays stable
when other processes share the machine).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import redis

from conveyor.settings import load_settings
from conveyor.store import migrate

ADMIN_DSN = os.environ.get("TEST_PG_DSN", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_HOST, REDIS_PORT = "127.0.0.1", 6379
ADMIN_TOKEN = "bench-admin-token"
BODY = '{"input": {"orderId": 42}}'

BASELINE_APP = """
import uvicorn
BODY = b'{"success":true,"data":{"id":"x","status":"queued"}}'
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 202,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": BODY})
uvicorn.run(app, host="127.0.0.1", port=%d, log_level="warning", access_log=False)
"""


@dataclass
class Result:
    requests_per_s: float
    p99_ms: float
    errors: int


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2).status_code < 500:
                return
        time.sleep(0.2)
    raise SystemExit(f"{url} did not answer within {timeout}s")


@contextlib.contextmanager
def spawn(argv: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


# --- load generators ------------------------------------------------------------------------
def _ms(text: str) -> float:
    match = re.match(r"([\d.]+)(us|ms|s)", text)
    if not match:
        return float("nan")
    value, unit = float(match.group(1)), match.group(2)
    return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value


def run_wrk(url: str, method: str, headers: dict[str, str], body: str | None, duration: float,
            connections: int, tmp: Path) -> Result:  # fmt: skip
    script = tmp / f"wrk_{uuid.uuid4().hex[:6]}.lua"
    lines = [f'wrk.method = "{method}"']
    if body is not None:
        lines.append(f"wrk.body = '{body}'")
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    script.write_text("\n".join(lines) + "\n")
    out = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency", "-s", str(script), url],
        capture_output=True, text=True, timeout=duration + 60, check=True,
    ).stdout  # fmt: skip
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M)
    errors = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", out)
    socket_errors = re.search(r"Socket errors:.*", out)
    if socket_errors:
        print("  wrk:", socket_errors.group(0), file=sys.stderr)
    return Result(rps, _ms(p99.group(1)) if p99 else float("nan"),
                  int(errors.group(1)) if errors else 0)  # fmt: skip


async def _httpx_load(url: str, method: str, headers: dict[str, str], body: str | None,
                      duration: float, connections: int) -> Result:  # fmt: skip
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        deadline = time.perf_counter() + duration

        async def loop() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                r = await client.request(method, url, headers=headers, content=body)
                latencies.append(time.perf_counter() - start)
                errors += r.status_code >= 300

        started = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(connections)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000 if latencies else float("nan")
    return Result(len(latencies) / elapsed, p99, errors)


def load(tool: str, url: str, method: str, headers: dict[str, str], body: str | None,
         duration: float, connections: int, tmp: Path) -> Result:  # fmt: skip
    if tool == "wrk":
        return run_wrk(url, method, headers, body, duration, connections, tmp)
    return asyncio.run(_httpx_load(url, method, headers, body, duration, connections))


# --- set-up ---------------------------------------------------------------------------------
async def _pg(sql: str) -> None:
    conn = await asyncpg.connect(ADMIN_DSN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def setup_tenant(base: str) -> tuple[dict[str, str], str]:
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    with httpx.Client(base_url=base, timeout=10) as c:
        tenant = c.post("/api/admin/tenants", json={"name": "bench"}, headers=admin).json()
        key = c.post(f"/api/admin/tenants/{tenant['data']['id']}/api-keys", headers=admin)
        auth = {"Authorization": f"Bearer {key.json()['data']['key']}"}
        wf = c.post("/api/workflows", headers=auth,
                    json={"name": "bench", "steps": [{"id": "a", "type": "noop"}]})  # fmt: skip
        return auth, wf.json()["data"]["id"]


def delete_prefix(prefix: str) -> None:
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT)
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{prefix}:*", count=5000):
            batch.append(key)
            if len(batch) >= 1000:
                client.delete(*batch)
                batch.clear()
        if batch:
            client.delete(*batch)
    finally:
        client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--tool", choices=("auto", "wrk", "httpx"), default="auto")
    args = parser.parse_args()
    tool = args.tool if args.tool != "auto" else ("wrk" if shutil.which("wrk") else "httpx")
    db = f"conveyor_bench_{uuid.uuid4().hex[:10]}"
    prefix = f"cvb{uuid.uuid4().hex[:8]}"
    database_url = f"{ADMIN_DSN.rsplit('/', 1)[0]}/{db}"
    asyncio.run(_pg(f'CREATE DATABASE "{db}"'))
    try:
        asyncio.run(migrate(load_settings({"DATABASE_URL": database_url})))
        return run(args, tool, database_url, prefix)
    finally:
        asyncio.run(_pg(f'DROP DATABASE IF EXISTS "{db}" WITH (FORCE)'))
        delete_prefix(prefix)


def run(args: argparse.Namespace, tool: str, database_url: str, prefix: str) -> int:
    d, c = args.duration, args.connections
    with tempfile.TemporaryDirectory(prefix="conveyor-bench-") as tmp_dir:
        tmp = Path(tmp_dir)
        base_port, api_port = free_port(), free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("QUEUE_", "API_"))}
        env.update(DATABASE_URL=database_url, QUEUE_PREFIX=prefix, ADMIN_TOKEN=ADMIN_TOKEN,
                   API_PORT=str(api_port), LOG_LEVEL="WARNING")  # fmt: skip
        print(f"load generator: {tool}, {c} connections, {d:.0f} s per measurement", flush=True)

        with spawn([sys.executable, "-c", BASELINE_APP % base_port], env, tmp / "base.log"):
            base_url = f"http://127.0.0.1:{base_port}/"
            wait_http(base_url)
            json_headers = {"Content-Type": "application/json"}
            load(tool, base_url, "POST", json_headers, BODY, 2, c, tmp)  # warm-up
            baseline = load(tool, base_url, "POST", json_headers, BODY, d, c, tmp)
        print(f"baseline (bare uvicorn POST): {baseline.requests_per_s:9.0f} req/s  "
              f"p99 {baseline.p99_ms:6.1f} ms", flush=True)  # fmt: skip

        with spawn([sys.executable, "-m", "conveyor.cli", "api"], env, tmp / "api.log") as api:
            base = f"http://127.0.0.1:{api_port}"
            wait_http(f"{base}/api/health/ready")
            auth, workflow_id = setup_tenant(base)
            url = f"{base}/api/workflows/{workflow_id}/executions"
            headers = {**auth, "Content-Type": "application/json"}
            load(tool, url, "POST", headers, BODY, 2, c, tmp)  # warm-up
            cpu0 = cpu_seconds(api.pid)
            triggers = load(tool, url, "POST", headers, BODY, d, c, tmp)
            cpu1 = cpu_seconds(api.pid)
            health = load(tool, f"{base}/api/health", "GET", {}, None, d, c, tmp)
            cpu2 = cpu_seconds(api.pid)
            queued = count_queued(base, auth)
            assert api.poll() is None, (tmp / "api.log").read_text()[-2000:]

    ratio = triggers.requests_per_s / baseline.requests_per_s
    trigger_cpu_ms = (cpu1 - cpu0) * 1000 / max(1.0, triggers.requests_per_s * d)
    health_cpu_ms = (cpu2 - cpu1) * 1000 / max(1.0, health.requests_per_s * d)
    print(f"triggers  POST …/executions:   {triggers.requests_per_s:9.0f} req/s  "
          f"p99 {triggers.p99_ms:6.1f} ms  errors {triggers.errors}  "
          f"API CPU {trigger_cpu_ms:.2f} ms/request")  # fmt: skip
    print(f"health    GET /api/health:     {health.requests_per_s:9.0f} req/s  "
          f"p99 {health.p99_ms:6.1f} ms  errors {health.errors}  "
          f"API CPU {health_cpu_ms:.2f} ms/request")  # fmt: skip
    print(f"ratio triggers / bare uvicorn: {ratio:.2f}   (jobs on the queue: {queued})")
    print(json.dumps({
        "triggers_per_s": round(triggers.requests_per_s, 1),
        "trigger_p99_ms": round(triggers.p99_ms, 2),
        "health_per_s": round(health.requests_per_s, 1),
        "baseline_per_s": round(baseline.requests_per_s, 1),
        "ratio": round(ratio, 3),
        "trigger_errors": triggers.errors,
        "trigger_api_cpu_ms": round(trigger_cpu_ms, 3),
        "health_api_cpu_ms": round(health_cpu_ms, 3),
        "tool": tool,
        "connections": c,
    }))  # fmt: skip
    return 0


def count_queued(base: str, auth: dict[str, str]) -> Any:
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    doc = httpx.get(f"{base}/api/admin/workers/status", headers=admin, timeout=10).json()
    return doc["data"]["executionWorker"]["metrics"]["queueDepths"]["workflow.execute.us"]["total"]


if __name__ == "__main__":
    raise SystemExit(main())
