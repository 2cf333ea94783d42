"""Which database errors are a statement's rows' fault (:func:`is_row_error`): a batch on a
day's partitions refused for those keeps the partition map; one refused for the tables it
names (undefined, a row outside their bounds, anything unknown) drops it for a while."""

from __future__ import annotations

import asyncpg  # type: ignore[import-untyped]
import pytest

from conveyor.errors import ConveyorError, StoreError
from conveyor.store._errors import is_row_error, translate_errors


def _translated(exc: BaseException) -> BaseException:
    """``exc`` as the store raises it (translated, the driver's error as its cause)."""
    try:
        with translate_errors():
            raise exc
    except BaseException as translated:  # whatever translate_errors made of it
        return translated
    raise AssertionError("translate_errors let the error through")


@pytest.mark.parametrize(
    ("error", "rows"),
    [
        (asyncpg.exceptions.DeadlockDetectedError("deadlock detected"), True),
        (asyncpg.exceptions.SerializationError("could not serialize"), True),
        (asyncpg.exceptions.QueryCanceledError("canceling statement due to timeout"), True),
        (asyncpg.exceptions.UniqueViolationError("duplicate key"), True),
        (asyncpg.exceptions.InvalidTextRepresentationError("invalid input"), True),
        (asyncpg.exceptions.RaiseError("refused by a trigger"), True),
        (asyncpg.exceptions.UndefinedTableError("relation does not exist"), False),
        (asyncpg.exceptions.CheckViolationError("violates partition constraint"), False),
        (asyncpg.exceptions.ObjectNotInPrerequisiteStateError("being detached"), False),
        (asyncpg.exceptions.InternalServerError("unexpected"), False),
    ],
)
def test_a_rows_fault_is_told_from_the_tables_fault(error: Exception, rows: bool) -> None:
    translated = _translated(error)
    assert isinstance(translated, ConveyorError)
    assert is_row_error(translated) is rows
    assert is_row_error(error) is rows


def test_an_error_without_a_sqlstate_is_not_the_rows_fault() -> None:
    assert is_row_error(StoreError("database error: something")) is False
    assert is_row_error(RuntimeError("not from the database")) is False


def test_a_refused_argument_is_named_never_quoted() -> None:
    """asyncpg's refusal of an argument quotes its value — in a batch, other requests' (other
    tenants') values: the message keeps the argument's number and the reason only."""
    refused = asyncpg.exceptions.DataError(
        'invalid input for query argument $6: [\'{"card":"4111-0000"}\', \'"\\ud800"\'] '
        "('utf-8' codec can't encode character '\\ud800' in position 1: surrogates not allowed)"
    )
    message = str(_translated(refused))
    assert "4111" not in message
    assert message == (
        "value cannot be stored: invalid input for query argument $6 ('utf-8' codec can't "
        "encode character '\\ud800' in position 1: surrogates not allowed)"
    )
