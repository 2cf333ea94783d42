"""Test support for the API tests."""

from __future__ import annotations

import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.helpers import REDIS_SERVER, RedisServer, free_port, wait_for


class RestartableRedis(RedisServer):
    """``tests.helpers.RedisServer`` whose ``start()`` closes its copy of the log file
    (the helper's leaks it, which pytest reports as an unraisable ResourceWarning)."""

    def start(self, timeout: float = 10.0) -> RestartableRedis:
        with open(self.dir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(
                [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                 "--dir", str(self.dir), "--save", "", "--appendonly", "no", *self.args],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_for(self._ready, timeout=timeout)
        return self


@contextmanager
def restartable_redis(*args: str) -> Iterator[RestartableRedis]:
    with tempfile.TemporaryDirectory(prefix="conveyor-api-redis-") as tmp:
        server = RestartableRedis(port=free_port(), args=list(args), dir=Path(tmp))
        server.start()
        try:
            yield server
        finally:
            server.stop()
