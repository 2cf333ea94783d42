"""A real local HTTP target for resume tests: counts requests per path; ``/flaky/...`` answers
500 while ``failing`` is set and 200 after."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Target:
    def __init__(self, port: int) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.hits: Counter[str] = Counter()
        self.failing = True
        self.lock = threading.Lock()

    def url(self, path: str) -> str:
        return self.base + path


def _handler(target: Target) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            path = self.path.split("?", 1)[0]
            with target.lock:
                target.hits[path] += 1
                failing = target.failing
            status = 500 if failing and path.startswith("/flaky/") else 200
            name = path.rsplit("/", 1)[-1]
            body = json.dumps({"name": name, "token": f"tok-{name}", "path": self.path}).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

        def log_message(self, *args: object) -> None:
            return None

    return Handler


@contextmanager
def http_target() -> Iterator[Target]:
    """A :class:`Target` on 127.0.0.1 (a free port), stopped afterwards."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _handler(Target(0)))
    target = Target(int(httpd.server_address[1]))
    httpd.RequestHandlerClass = _handler(target)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield target
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
