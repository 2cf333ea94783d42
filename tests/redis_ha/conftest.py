"""The API fixtures (a migrated session database, its environment) for the Sentinel tests; the
garbage of killed masters collected in the test that killed them."""

from __future__ import annotations

import pytest

from tests.api.conftest import api_env, migrated_pg
from tests.helpers import collect_connections_to_killed_servers

__all__ = ["api_env", "collect_connections_to_killed_servers", "migrated_pg"]


@pytest.fixture(autouse=True)
def _collected(collect_connections_to_killed_servers: None) -> None:
    """Every test here: see :func:`tests.helpers.collect_connections_to_killed_servers`."""
