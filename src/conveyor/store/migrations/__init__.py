"""Alembic migrations of Conveyor's schema (run by ``conveyor migrate``)."""
