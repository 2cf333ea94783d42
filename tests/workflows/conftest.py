"""A local HTTP server for ``http`` step tests (a threaded ``http.server``; no internet)."""

from __future__ import annotations

import functools
import json
import socket
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from conveyor.settings import Settings, load_settings


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    server: str


@dataclass
class LocalServer:
    host: str
    port: int
    requests: list[Seen] = field(default_factory=list)

    def url(self, path: str = "/", host: str | None = None) -> str:
        name = host or self.host
        if ":" in name:
            name = f"[{name}]"
        return f"http://{name}:{self.port}{path}"


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def _reply(self, status: int, body: bytes, content_type: str, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, status: int, doc: Any, **headers: str) -> None:
        self._reply(status, json.dumps(doc).encode(), "application/json", **headers)

    def _handle(self) -> None:  # noqa: C901 - one branch per route
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        split = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(split.query).items()}
        self.server.owner.requests.append(
            Seen(
                self.command,
                self.path,
                {k.lower(): v for k, v in self.headers.items()},
                body,
                self.server.owner.host,
            )
        )
        route = split.path
        if route == "/json":
            self._json(200, {"hello": "world", "server": self.server.owner.host})
        elif route == "/echo":
            self._json(
                200,
                {
                    "method": self.command,
                    "path": self.path,
                    "headers": {k.lower(): v for k, v in self.headers.items()},
                    "body": body.decode(),
                },
            )
        elif route == "/setcookie":
            self._json(200, {}, Set_Cookie="session=secret; Path=/")
        elif route == "/text":
            self._reply(200, "plain text ✓".encode(), "text/plain; charset=utf-8")
        elif route.startswith("/status/"):
            status = int(route.rsplit("/", 1)[1])
            extra = {"Retry_After": "7"} if status in (429, 503) else {}
            self._json(status, {"error": f"status {status}"}, **extra)
        elif route.startswith("/deny/"):
            self._deny(route, query)
        elif route == "/redirect":
            self._reply(int(query.get("code", "302")), b"", "text/plain", Location=query["to"])
        elif route == "/loop":
            self._reply(302, b"", "text/plain", Location="/loop")
        elif route == "/big":
            self._reply(200, b"x" * int(query["n"]), "application/octet-stream")
        elif route == "/chunked":
            self._chunked(int(query["n"]))
        elif route in ("/heads", "/gzip"):
            getattr(self, "_" + route[1:])(query)
        elif route == "/slow":
            time.sleep(float(query.get("s", "2")))
            self._json(200, {"slow": True})
        else:
            self._json(404, {"error": "no route"})

    def _deny(self, route: str, query: dict[str, str]) -> None:
        """``/deny/<pad>/<charset>``: 401 echoing ``?t=`` after ``pad`` x's, in ``charset``."""
        _deny, pad, charset = route.rsplit("/", 2)
        text = "x" * int(pad) + " invalid key " + query.get("t", "")
        self._reply(401, text.encode(charset), f"text/plain; charset={charset}")

    def _heads(self, query: dict[str, str]) -> None:
        """One header of ``size`` bytes and ``count`` small ones."""
        extra = {f"X_H{i}": "v" for i in range(int(query.get("count", "0")))}
        self._json(200, {}, X_Big="b" * int(query.get("size", "1")), **extra)

    def _gzip(self, query: dict[str, str]) -> None:
        """``{"pad": "zz…"}`` with ``n`` z's, gzip-encoded (a bomb when large; ``bad``: not
        gzip at all)."""
        body = b"not gzip" if "bad" in query else gzipped_json_pad(int(query.get("n", "10")))
        self._reply(200, body, "application/json", Content_Encoding="gzip")

    def _chunked(self, total: int) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        chunk = b"y" * 8192
        sent = 0
        try:
            while sent < total:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
            self.wfile.write(b"0\r\n\r\n")
        except OSError:
            pass  # the client stopped reading: that is the point

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle


@functools.cache
def gzipped_json_pad(n: int) -> bytes:
    """``{"pad": "zz…"}`` with ``n`` z's, gzip-compressed a megabyte at a time (never held
    whole: tests measuring the client's memory call this before they start)."""
    out = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    parts = [out.compress(b'{"pad": "')]
    block = b"z" * 1_000_000
    for start in range(0, n, len(block)):
        parts.append(out.compress(block[: min(len(block), n - start)]))
    parts.append(out.compress(b'"}'))
    parts.append(out.flush())
    return b"".join(parts)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    owner: LocalServer

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # clients that hang up early (size caps, timeouts) are expected here


def _start(host: str, port: int = 0) -> tuple[_Server, LocalServer]:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    server_cls = type("_S", (_Server,), {"address_family": family})
    server = server_cls((host, port), _Handler)
    owner = LocalServer(host, server.server_address[1])
    server.owner = owner
    threading.Thread(
        target=server.serve_forever, args=(0.05,), name=f"http-{host}", daemon=True
    ).start()
    return server, owner


@pytest.fixture
def local_server() -> Iterator[LocalServer]:
    """An HTTP server on 127.0.0.1 (free port), stopped after the test."""
    server, owner = _start("127.0.0.1")
    yield owner
    server.shutdown()
    server.server_close()


@pytest.fixture
def server_pair() -> Iterator[tuple[LocalServer, LocalServer]]:
    """Two servers on the same port: one on 127.0.0.2, one on 127.0.0.1."""
    for _ in range(20):
        first, owner_a = _start("127.0.0.2")
        try:
            second, owner_b = _start("127.0.0.1", owner_a.port)
        except OSError:
            first.shutdown()
            first.server_close()
            continue
        yield owner_a, owner_b
        for server in (first, second):
            server.shutdown()
            server.server_close()
        return
    pytest.skip("no port free on both 127.0.0.1 and 127.0.0.2")


def make_settings(*allowlist: str) -> Settings:
    return load_settings({}, http_allowlist=",".join(allowlist))
