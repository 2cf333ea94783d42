"""Conveyor's exception tree.

Every error Conveyor raises on purpose derives from :class:`ConveyorError`; third-party
errors (redis, SQLAlchemy, aiohttp, httpx) are translated where they enter with
``raise ... from exc``.

    ConveyorError
    ├── ConfigError              a setting is malformed (the CLI exits 2)
    ├── QueueError
    │   ├── QueueUnavailable     Redis unreachable, refused credentials, timed out (retry later)
    │   ├── QueueNotReady        reachable but unusable for BullMQ (version too old, ...)
    │   └── PayloadInvalid       a job payload does not match its queue's model (never retry)
    ├── StoreError
    │   ├── DatabaseUnavailable  the database cannot be reached (retry later)
    │   ├── SchemaOutOfDate      migrations are pending: run ``conveyor migrate``
    │   ├── NotFound             absent, or owned by another tenant (the API answers 404)
    │   ├── Conflict             a uniqueness or state rule forbids the change
    │   └── LeaseLost            another runner owns the execution now (fencing)
    ├── WorkflowInvalid          a workflow definition does not validate
    ├── InputInvalid             a trigger's input does not match the workflow's input schema
    ├── ScheduleInvalid          a schedule's cron expression or time zone is invalid
    ├── CronInvalid              a cron expression or time zone is invalid (the parser's error)
    ├── CursorInvalid            a pagination cursor is malformed
    ├── InvalidValue             a value cannot be stored (too long, out of range, NUL)
    ├── SecretsUnavailable       secrets cannot be encrypted or decrypted (SECRETS_KEY)
    └── StepError
        ├── RetryableStepError   the step may succeed if tried again (5xx, timeout)
        └── PermanentStepError   trying again cannot help (4xx, bad expression, SSRF refusal)
"""

from __future__ import annotations

from typing import Any


class ConveyorError(Exception):
    """Conveyor failed."""

    def __init__(self, message: str | None = None, details: Any = None, **fields: Any) -> None:
        self.message = message or (self.__doc__ or type(self).__name__).strip()
        self.details: Any = details if details is not None else fields
        super().__init__(self.message)


class ConfigError(ConveyorError):
    """A setting is malformed."""


class QueueError(ConveyorError):
    """The queue failed."""


class QueueUnavailable(QueueError):
    """Redis is unreachable or refused the connection."""


class QueueNotReady(QueueError):
    """Redis answers but cannot be used by BullMQ."""


class PayloadInvalid(QueueError):
    """A job payload does not match its queue's model."""


class StoreError(ConveyorError):
    """The database failed."""


class DatabaseUnavailable(StoreError):
    """The database cannot be reached."""


class SchemaOutOfDate(StoreError):
    """The database schema is not up to date: run `conveyor migrate`."""


class NotFound(StoreError):
    """Not found."""


class Conflict(StoreError):
    """The change conflicts with the current state."""


class LeaseLost(StoreError):
    """Another runner owns this execution now."""


class WorkflowInvalid(ConveyorError):
    """The workflow definition is invalid."""


class InputInvalid(ConveyorError):
    """The trigger input does not match the workflow's input schema."""


class ScheduleInvalid(ConveyorError):
    """The schedule is invalid (cron expression or time zone)."""


class CronInvalid(ConveyorError):
    """The cron expression or time zone is invalid."""


class CursorInvalid(ConveyorError):
    """The pagination cursor is malformed."""


class InvalidValue(ConveyorError):
    """A value cannot be stored (too long, out of range, or contains a NUL character)."""


class SecretsUnavailable(ConveyorError):
    """Secrets cannot be encrypted or decrypted: SECRETS_KEY is unset or lacks the key."""


class StepError(ConveyorError):
    """A step failed.

    ``kind`` says what failed, for retry policies (``retry_on``): ``timeout``, ``connection``
    (network, DNS, a database the step needed), ``status`` (an HTTP status: ``details
    ["status"]``); ``None`` for anything else (a refusal, a bad template, a custom runner's).
    It is not part of the recorded error.
    """

    kind: str | None = None

    def __init__(
        self,
        message: str | None = None,
        details: Any = None,
        *,
        kind: str | None = None,
        **fields: Any,
    ) -> None:
        super().__init__(message, details, **fields)
        if kind is not None:
            self.kind = kind


class RetryableStepError(StepError):
    """A step failed and may succeed if tried again."""


class PermanentStepError(StepError):
    """A step failed and trying again cannot help."""
