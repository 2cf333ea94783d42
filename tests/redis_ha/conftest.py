"""The API fixtures (a migrated session database, its environment) for the Sentinel tests."""

from __future__ import annotations

from tests.api.conftest import api_env, migrated_pg

__all__ = ["api_env", "migrated_pg"]
