"""The throwaway cluster's own start-up: a port taken between being picked and the bind (by a
parallel test, an outbound connection) is picked again instead of failing the test run."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from tests.helpers import free_port
from tests.redis_cluster import _cluster
from tests.redis_cluster._cluster import ClusterNode


def test_a_bus_port_taken_before_the_bind_is_picked_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        picks = iter([busy])
        monkeypatch.setattr(_cluster, "free_port", lambda: next(picks, None) or free_port())
        node = ClusterNode(free_port(), tmp_path / "n0")
        try:
            node.start()
            assert node.running and node.client().ping()
            log = (tmp_path / "n0" / "redis.log").read_text()
            assert f"Failed listening on port {busy} (cluster)" in log  # the first try failed
        finally:
            node.stop()
