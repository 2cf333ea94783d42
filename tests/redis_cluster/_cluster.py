"""A throwaway Redis Cluster: three masters and three replicas on free ports.

Each node is a ``redis-server --cluster-enabled yes`` with its ``nodes.conf`` in a temporary
directory, joined by ``redis-cli --cluster create --cluster-replicas 1``; every process is
stopped by PID at the end, also when the block fails. Nothing is shared with the machine's
Redis.
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from redis.cluster import RedisCluster
from redis.crc import key_slot

from tests.helpers import REDIS_SERVER, free_port, port_open, wait_for

NODE_TIMEOUT_MS = 1000
"""``cluster-node-timeout``: a master unreachable this long is failed over by its replica."""


@dataclass
class ClusterNode:
    port: int
    dir: Path
    bus_port: int = 0
    """The cluster bus (node-to-node) port; by default Redis takes ``port + 10000``."""
    proc: subprocess.Popen[bytes] | None = None
    started: bool = False
    """Started once already (then its client port is known to the cluster: kept)."""

    def start(self) -> None:
        """Start the node; a port another process took between being picked free and the
        bind (the bus port, picked anew each start, or the client port before the node's first
        start) is picked again, up to five times."""
        for attempt in range(5):
            log_path = self.dir / "redis.log"
            self.dir.mkdir(parents=True, exist_ok=True)
            offset = log_path.stat().st_size if log_path.exists() else 0
            self._spawn(self.bus_port or free_port())
            try:
                wait_for(self._up, timeout=10)
                self.started = True
                return
            except RuntimeError:
                text = log_path.read_text()[offset:]
                taken = "Address already in use" in text
                if not taken or attempt == 4:
                    raise
                if "(cluster)" in text and not self.bus_port:
                    continue
                if not self.started:  # nothing knows the client port yet
                    self.port = free_port()
                    continue
                raise

    def _spawn(self, bus_port: int) -> None:
        with open(self.dir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(
                [
                    REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                    "--dir", str(self.dir), "--cluster-enabled", "yes",
                    "--cluster-config-file", str(self.dir / "nodes.conf"),
                    "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
                    "--cluster-port", str(bus_port),
                    "--appendonly", "yes", "--save", "", "--maxmemory-policy", "noeviction",
                ],
                stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip

    def _up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited: {(self.dir / 'redis.log').read_text()}")
        return port_open(self.port)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: a lost machine (no shutdown, no last write)."""
        if self.running:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.running:
            assert self.proc is not None
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_timeout=2, decode_responses=True)


@dataclass
class Cluster:
    nodes: list[ClusterNode]

    @property
    def setting(self) -> str:
        """``QUEUE_REDIS_CLUSTER_NODES``: two of the nodes (the rest is discovered)."""
        return ",".join(f"127.0.0.1:{n.port}" for n in self.nodes[:2])

    def env(self) -> dict[str, str]:
        return {
            "QUEUE_REDIS_CLUSTER_NODES": self.setting,
            # Deliberately wrong: with cluster nodes the direct address must be ignored.
            "QUEUE_REDIS_PORT": str(free_port()),
        }

    def client(self) -> RedisCluster:
        live = next(n for n in self.nodes if n.running)
        return RedisCluster(host="127.0.0.1", port=live.port, decode_responses=True)

    def state_ok(self) -> bool:
        for node in self.nodes:
            if not node.running:
                continue
            try:
                if cluster_state(node.client()) != "ok":
                    return False
            except redis.RedisError:
                return False
        return True

    def master_of(self, key: str) -> ClusterNode:
        """The live node serving ``key``'s slot as master (per the first live node)."""
        slot = key_slot(key.encode())
        for node in self.nodes:
            if not node.running:
                continue
            for start, end, master, *_ in _slots(node.client()):
                if int(start) <= slot <= int(end):
                    port = int(master[1])
                    return next(n for n in self.nodes if n.port == port)
        raise AssertionError(f"no master serves slot {slot}")

    def masters(self) -> list[ClusterNode]:
        ports = set()
        for node in self.nodes:
            if node.running:
                for _start, _end, master, *_ in _slots(node.client()):
                    ports.add(int(master[1]))
                break
        return [n for n in self.nodes if n.port in ports]


@contextmanager
def redis_cluster() -> Iterator[Cluster]:
    """Start six nodes, create a cluster of three masters with one replica each, wait until
    every node says ``cluster_state:ok``; stop every node by PID at the end."""
    with tempfile.TemporaryDirectory(prefix="conveyor-cluster-") as tmp:
        nodes = [ClusterNode(free_port(), Path(tmp) / f"n{i}") for i in range(6)]
        try:
            for node in nodes:
                node.start()
            subprocess.run(
                ["redis-cli", "--cluster", "create",
                 *(f"127.0.0.1:{n.port}" for n in nodes),
                 "--cluster-replicas", "1", "--cluster-yes"],
                check=True, capture_output=True, timeout=60,
            )  # fmt: skip
            cluster = Cluster(nodes)
            wait_for(cluster.state_ok, timeout=30, interval=0.2)
            # Every replica attached and synced, so a failover has something to promote.
            wait_for(lambda: _replicas_synced(nodes), timeout=30, interval=0.2)
            yield cluster
        finally:
            for node in nodes:
                node.stop()


def _slots(client: redis.Redis) -> list[Any]:
    """``CLUSTER SLOTS``: ``[start, end, [host, port, id], replicas…]`` per range."""
    execute: Any = client.execute_command
    return list(execute("CLUSTER SLOTS"))


def cluster_state(client: redis.Redis) -> str | None:
    """``cluster_state`` of ``CLUSTER INFO`` as ``client``'s node sees it."""
    execute: Any = client.execute_command
    raw = execute("CLUSTER INFO")
    info = (
        raw
        if isinstance(raw, dict)
        else dict(line.split(":", 1) for line in str(raw).splitlines() if ":" in line)
    )
    state = info.get("cluster_state")
    return None if state is None else str(state).strip()


def _replicas_synced(nodes: list[ClusterNode]) -> bool:
    synced = 0
    for node in nodes:
        info = node.client().info("replication")
        if info.get("role") == "slave" and info.get("master_link_status") == "up":
            synced += 1
    return synced == 3


def wait_failover(cluster: Cluster, timeout: float = 30.0) -> float:
    """After a master is killed: seconds until the cluster serves every slot again."""
    start = time.monotonic()
    wait_for(cluster.state_ok, timeout=timeout, interval=0.1)
    return time.monotonic() - start
