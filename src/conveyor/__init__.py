"""Conveyor: durable, fair, multi-tenant workflow execution on BullMQ/Redis."""

__version__ = "0.1.0"
