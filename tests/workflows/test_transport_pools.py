"""The connection pool of ``http`` steps (:mod:`conveyor.workflows.transport`): it keeps to
``max_connections`` exactly and uses all of it under load, a lone caller keeps reusing one
kept-alive connection, and every request's place is given back, answered or failed."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conveyor.errors import RetryableStepError
from conveyor.workflows.http import SafeHttpClient
from conveyor.workflows.steps import run_step
from tests.helpers import free_port
from tests.workflows.conftest import make_settings
from tests.workflows.test_http import ctx, http_step


class CountingServer(ThreadingHTTPServer):
    """HTTP/1.1 keep-alive; each answer takes ``hold_s``; counts connections, open and ever."""

    daemon_threads = True

    def __init__(self, hold_s: float) -> None:
        self.hold_s = hold_s
        self.lock = threading.Lock()
        self.open = self.most_open = self.opened = 0
        super().__init__(("127.0.0.1", 0), _Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: CountingServer

    def setup(self) -> None:
        super().setup()
        with self.server.lock:
            self.server.open += 1
            self.server.opened += 1
            self.server.most_open = max(self.server.most_open, self.server.open)

    def finish(self) -> None:
        with self.server.lock:
            self.server.open -= 1
        super().finish()

    def do_GET(self) -> None:
        time.sleep(self.server.hold_s)
        body = b'{"ok": true}'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_: object) -> None:
        return


@pytest.fixture
def server() -> Iterator[CountingServer]:
    httpd = CountingServer(hold_s=0.1)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("limit", [7, 25])
async def test_the_pool_keeps_to_the_limit_and_uses_all_of_it(
    server: CountingServer, limit: int
) -> None:
    allow = f"127.0.0.1:{server.port}"
    step = http_step(url=f"http://127.0.0.1:{server.port}/slow")
    async with SafeHttpClient(make_settings(allow), max_connections=limit) as client:
        results = await asyncio.gather(
            *(run_step(step, ctx(allow, http=client)) for _ in range(limit * 2 + 3))
        )
        assert {r.output["status"] for r in results} == {200}
    assert server.most_open == limit  # never more connections than allowed, and all used


async def test_a_lone_caller_reuses_one_connection(server: CountingServer) -> None:
    server.hold_s = 0.0
    allow = f"127.0.0.1:{server.port}"
    step = http_step(url=f"http://127.0.0.1:{server.port}/one")
    async with SafeHttpClient(make_settings(allow), max_connections=50) as client:
        for _ in range(8):
            result = await run_step(step, ctx(allow, http=client))
            assert result.output["status"] == 200
    assert server.opened == 1


async def test_a_failed_request_gives_its_place_back(server: CountingServer) -> None:
    """With room for one connection, three failed requests (nothing listens) and then three
    to a live server: each gets the place the one before gave back."""
    server.hold_s = 0.0
    port = free_port()  # nothing listens there
    allow = f"127.0.0.1:{port},127.0.0.1:{server.port}"
    async with SafeHttpClient(make_settings(allow), max_connections=1) as client:
        for _ in range(3):
            with pytest.raises(RetryableStepError):
                await run_step(http_step(url=f"http://127.0.0.1:{port}/"), ctx(allow, http=client))
        for _ in range(3):
            step = http_step(url=f"http://127.0.0.1:{server.port}/", timeout_s=5)
            result = await asyncio.wait_for(run_step(step, ctx(allow, http=client)), 10)
            assert result.output["status"] == 200
    assert server.opened == 1


def test_a_client_needs_a_connection() -> None:
    with pytest.raises(ValueError, match="max_connections must be at least 1"):
        SafeHttpClient(make_settings(), max_connections=0)
