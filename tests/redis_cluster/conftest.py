"""The garbage of killed cluster masters collected in the test that killed them."""

from __future__ import annotations

import pytest

from tests.helpers import collect_connections_to_killed_servers

__all__ = ["collect_connections_to_killed_servers"]


@pytest.fixture(autouse=True)
def _collected(collect_connections_to_killed_servers: None) -> None:
    """Every test here: see :func:`tests.helpers.collect_connections_to_killed_servers`."""
