"""A throwaway Redis group with Sentinel: one master, replicas, sentinels, all on free ports.

Every server is a ``redis-server`` (``--sentinel`` for the sentinels, from generated config
files) started here and stopped by PID at the end, also when the block fails. Nothing is
shared with the machine's Redis.
"""

from __future__ import annotations

import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis

from tests.helpers import REDIS_SERVER, free_port, port_open, wait_for

MASTER_NAME = "conveyor-ha"


@dataclass
class Node:
    """One ``redis-server`` process (a data node or a sentinel)."""

    name: str
    port: int
    argv: list[str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    auth: tuple[str, str] | None = None
    ca_file: Path | None = None
    """Set: the node listens with TLS only (verified with this CA)."""

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)
        wait_for(self._up, timeout=10)

    def _up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
        return port_open(self.port)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL (no shutdown, no last write): a lost machine."""
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(timeout=10)

    def freeze(self) -> None:
        """SIGSTOP: the process holds its sockets but does nothing (replication stalls)."""
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.send_signal(signal.SIGCONT)  # a frozen process cannot handle SIGTERM
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def client(self) -> redis.Redis:
        user, password = self.auth or (None, None)
        tls: dict[str, Any] = {}
        if self.ca_file is not None:
            tls = {"ssl": True, "ssl_ca_certs": str(self.ca_file)}
        return redis.Redis(
            port=self.port, username=user, password=password, socket_timeout=2,
            decode_responses=True, **tls,
        )  # fmt: skip


@dataclass
class SentinelGroup:
    master: Node
    replicas: list[Node]
    sentinels: list[Node]
    down_after_ms: int
    nodes: list[Node] = field(default_factory=list)

    @property
    def sentinel_setting(self) -> str:
        """The value of ``QUEUE_REDIS_SENTINELS`` for this group."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def env(self) -> dict[str, str]:
        """Conveyor settings that reach the group through its sentinels."""
        return {
            "QUEUE_REDIS_SENTINELS": self.sentinel_setting,
            "QUEUE_REDIS_SENTINEL_MASTER": MASTER_NAME,
            # Deliberately wrong: with sentinels the direct address must be ignored.
            "QUEUE_REDIS_HOST": "127.0.0.1",
            "QUEUE_REDIS_PORT": str(free_port()),
        }

    def master_port(self) -> int | None:
        """The master port a majority of the live sentinels name (``None``: no agreement)."""
        seen: dict[int, int] = {}
        for sentinel in self.sentinels:
            if not sentinel.running:
                continue
            client = sentinel.client()
            try:
                _, port = command(client, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
                seen[int(port)] = seen.get(int(port), 0) + 1
            except (redis.RedisError, OSError, TypeError, ValueError):
                continue
            finally:
                client.close()
        quorum = len(self.sentinels) // 2 + 1
        agreed = [port for port, n in seen.items() if n >= quorum]
        return agreed[0] if agreed else None

    def node_on(self, port: int) -> Node:
        return next(n for n in [self.master, *self.replicas] if n.port == port)

    def wait_replicas_synced(self, timeout: float = 20.0) -> None:
        def synced() -> bool:
            client = self.master.client()
            try:
                info = client.info("replication")
            finally:
                client.close()
            online = [v for k, v in info.items() if k.startswith("slave") and isinstance(v, dict)]
            return len(online) == len(self.replicas) and all(
                r.get("state") == "online" for r in online
            )

        wait_for(synced, timeout=timeout, interval=0.1)

    def wait_sentinels_ready(self, timeout: float = 30.0) -> None:
        """Every sentinel knows the master, its replicas and the other sentinels."""

        def ready() -> bool:
            for sentinel in self.sentinels:
                client = sentinel.client()
                try:
                    state = command(client, "SENTINEL MASTER", MASTER_NAME)
                except (redis.RedisError, OSError):
                    return False
                finally:
                    client.close()
                if int(state.get("num-other-sentinels", 0)) < len(self.sentinels) - 1:
                    return False
                if int(state.get("num-slaves", 0)) < len(self.replicas):
                    return False
            return True

        wait_for(ready, timeout=timeout, interval=0.1)

    def wait_failover(self, old_port: int, timeout: float = 30.0) -> int:
        """The new master's port once a majority of sentinels names one other than ``old_port``."""

        def moved() -> int | None:
            port = self.master_port()
            return port if port is not None and port != old_port else None

        port: Any = wait_for(moved, timeout=timeout, interval=0.05)
        return int(port)


def command(client: redis.Redis, *args: str) -> Any:
    """A raw command (redis-py's ``execute_command`` is untyped)."""
    execute: Any = client.execute_command
    return execute(*args)


def _tls_lines(port: int, tls: tuple[Path, Path] | None) -> list[str]:
    """Configuration lines: plain ``port``, or TLS only (also to replicate and to reach the
    other sentinels) with the certificate ``tls`` = (cert, key), its own CA."""
    if tls is None:
        return [f"port {port}"]
    cert, key = tls
    return [
        "port 0", f"tls-port {port}", f"tls-cert-file {cert}", f"tls-key-file {key}",
        f"tls-ca-cert-file {cert}", "tls-auth-clients no", "tls-replication yes",
    ]  # fmt: skip


def _data_node(
    name: str, port: int, directory: Path, *extra: str, tls: tuple[Path, Path] | None = None
) -> Node:
    config = directory / f"{name}.conf"
    config.write_text("\n".join(_tls_lines(port, tls)) + "\n")
    argv = [
        REDIS_SERVER, str(config), "--bind", "127.0.0.1", "--dir", str(directory),
        "--save", "", "--appendonly", "no", "--maxmemory-policy", "noeviction", *extra,
    ]  # fmt: skip
    return Node(name, port, argv, directory / f"{name}.log", ca_file=tls[0] if tls else None)


def _sentinel_node(
    name: str, port: int, directory: Path, master_port: int, *, down_after_ms: int,
    failover_timeout_ms: int, quorum: int, auth: tuple[str, str] | None,
    tls: tuple[Path, Path] | None,
) -> Node:  # fmt: skip
    config = directory / f"{name}.conf"
    lines = [
        *_tls_lines(port, tls),
        "bind 127.0.0.1",
        f"dir {directory}",
        f"sentinel monitor {MASTER_NAME} 127.0.0.1 {master_port} {quorum}",
        f"sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}",
        f"sentinel failover-timeout {MASTER_NAME} {failover_timeout_ms}",
        f"sentinel parallel-syncs {MASTER_NAME} 1",
    ]
    if auth is not None:
        user, password = auth
        # The sentinel's own clients must authenticate; it talks to its peers as that user.
        lines += [
            f"user {user} on >{password} ~* &* +@all",
            "user default off",
            f"sentinel sentinel-user {user}",
            f"sentinel sentinel-pass {password}",
        ]
    config.write_text("\n".join(lines) + "\n")
    argv = [REDIS_SERVER, str(config), "--sentinel"]
    ca_file = tls[0] if tls else None
    return Node(name, port, argv, directory / f"{name}.log", auth=auth, ca_file=ca_file)


@contextmanager
def sentinel_group(
    *,
    replicas: int = 1,
    sentinels: int = 3,
    down_after_ms: int = 1000,
    failover_timeout_ms: int = 3000,
    sentinel_auth: tuple[str, str] | None = None,
    tls: tuple[Path, Path] | None = None,
) -> Iterator[SentinelGroup]:
    """Start a master, ``replicas`` replicas and ``sentinels`` sentinels (quorum: a majority),
    every one TLS-only with ``tls`` = (cert, key); yield once the sentinels agree and
    replication is online; stop everything afterwards."""
    with tempfile.TemporaryDirectory(prefix="conveyor-sentinel-") as tmp:
        directory = Path(tmp)
        master = _data_node("master", free_port(), directory, tls=tls)
        nodes: list[Node] = [master]
        group = SentinelGroup(master, [], [], down_after_ms, nodes)
        try:
            master.start()
            for i in range(replicas):
                replica = _data_node(
                    f"replica{i}", free_port(), directory, "--replicaof", "127.0.0.1",
                    str(master.port), tls=tls,
                )  # fmt: skip
                nodes.append(replica)
                group.replicas.append(replica)
                replica.start()
            group.wait_replicas_synced()
            quorum = sentinels // 2 + 1
            for i in range(sentinels):
                sentinel = _sentinel_node(
                    f"sentinel{i}", free_port(), directory, master.port,
                    down_after_ms=down_after_ms, failover_timeout_ms=failover_timeout_ms,
                    quorum=quorum, auth=sentinel_auth, tls=tls,
                )  # fmt: skip
                nodes.append(sentinel)
                group.sentinels.append(sentinel)
                sentinel.start()
            group.wait_sentinels_ready()
            yield group
        finally:
            for node in reversed(nodes):
                node.stop()


def elapsed_since(start: float) -> float:
    return round(time.monotonic() - start, 3)
