from tests.store._fixtures import db_url, pg, settings, sqlite_template, store, store_pg_url

__all__ = ["db_url", "pg", "settings", "sqlite_template", "store", "store_pg_url"]
