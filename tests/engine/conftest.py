from tests.store._fixtures import db_url, settings, sqlite_template, store, store_pg_url
from tests.workflows.conftest import local_server

__all__ = ["db_url", "local_server", "settings", "sqlite_template", "store", "store_pg_url"]
