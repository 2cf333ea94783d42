"""The tracing tests use the API tier's migrated database and the worker tier's settings."""

from tests.api.conftest import api_env, migrated_pg
from tests.worker.conftest import worker_db, wsettings

__all__ = ["api_env", "migrated_pg", "worker_db", "wsettings"]
