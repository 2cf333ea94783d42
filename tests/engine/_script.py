"""A real local HTTP target whose paths answer scripted statuses (retry tests)."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Script:
    """Each path answers the statuses of its script in turn (the last one from then on; an
    unscripted path 404) and counts its requests."""

    def __init__(self) -> None:
        self.statuses: dict[str, list[int]] = {}
        self.hits: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.base = ""

    def url(self, path: str, *statuses: int) -> str:
        """``path``'s URL; it will answer ``statuses``."""
        self.statuses[path] = list(statuses)
        return self.base + path

    def answer(self, path: str) -> int:
        with self.lock:
            self.hits[path] += 1
            script = self.statuses.get(path, [404])
            return script[min(self.hits[path], len(script)) - 1]


@contextmanager
def scripted_target() -> Iterator[Script]:
    """A :class:`Script` served on 127.0.0.1 (a free port), stopped afterwards."""
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            status = script.answer(self.path)
            body = json.dumps({"status": status}).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            return None

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    script.base = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield script
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)
