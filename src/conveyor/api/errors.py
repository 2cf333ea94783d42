"""The API's one error shape and the handlers that produce it.

Every 4xx/5xx answer is ``{"success": false, "error": {"code", "message", "details"}}``:
routing 404/405, request validation (422, with the offending field), malformed JSON (400),
oversized bodies (413), Conveyor's own exceptions (mapped below) and, as a last resort, any
unexpected exception (500, logged with its traceback, details withheld from the client).

Two request problems have one code on every route, whoever detects them:

* a body that cannot be parsed (bad syntax, bytes that are not UTF-8, nesting too deep) is
  400 ``malformed_json`` with ``details = [{"line", "column", "message"}]`` (1-based; the
  column counts characters; ``{"message"}`` alone where the parser gives no position) —
  whether FastAPI, a route (webhooks), the fast lane or the body middleware finds it;
* an unknown top-level field of a body is 422 ``validation_error`` with a detail of type
  ``extra_forbidden`` (FastAPI's answer for its request models), also for the workflow
  definition, which the store validates.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic_core import PydanticKnownError
from starlette.exceptions import HTTPException as StarletteHTTPException

from conveyor import errors

log = logging.getLogger(__name__)

MALFORMED_JSON = "malformed_json"
"""The code of every body that cannot be parsed as JSON (400)."""
NOT_JSON = "The request body is not valid JSON."
VALIDATION_ERROR = "validation_error"
"""The code of request validation errors (422), unknown top-level body fields included."""
_EXTRA_FORBIDDEN: Final = "extra_forbidden"
_EXTRA_MESSAGE = PydanticKnownError(_EXTRA_FORBIDDEN).message()

_STATUS_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    500: "internal_error",
    503: "unavailable",
}

_MESSAGES: dict[int, str] = {
    400: "The request is malformed.",
    401: "Authentication is required.",
    404: "Not found.",
    405: "Method not allowed.",
    413: "The request body is too large.",
    415: "Unsupported media type.",
    500: "Internal server error.",
}

#: Conveyor exception → (HTTP status, error code). Most specific first.
_CONVEYOR_ERRORS: Sequence[tuple[type[errors.ConveyorError], int, str]] = (
    (errors.NotFound, 404, "not_found"),
    (errors.CursorInvalid, 400, "invalid_cursor"),
    (errors.ScheduleInvalid, 422, "schedule_invalid"),
    (errors.InputInvalid, 422, "input_invalid"),
    (errors.InvalidValue, 422, "invalid_value"),
    (errors.Conflict, 409, "conflict"),
    (errors.WorkflowInvalid, 422, "workflow_invalid"),
    (errors.PayloadInvalid, 422, "validation_error"),
    (errors.QueueUnavailable, 503, "queue_unavailable"),
    (errors.QueueNotReady, 503, "queue_unavailable"),
    (errors.DatabaseUnavailable, 503, "database_unavailable"),
    (errors.SecretsUnavailable, 503, "secrets_unavailable"),
)


class ApiError(StarletteHTTPException):
    """An HTTP error with an explicit code, message and details (rendered in the one shape)."""

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        details: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(status_code=status_code, detail=message, headers=dict(headers or {}))
        self.code = code
        self.message = message
        self.details = details


def error_body(code: str, message: str, details: Any = None) -> dict[str, Any]:
    return {
        "success": False,
        "error": {"code": code, "message": message, "details": {} if details is None else details},
    }


def error_response(
    status_code: int,
    code: str,
    message: str,
    details: Any = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(code, message, details), status_code=status_code, headers=dict(headers or {})
    )


def text_position(text: str | bytes, offset: int) -> tuple[int, int]:
    """The 1-based line and column (in characters) of ``offset`` in ``text``; ``bytes`` are
    read as UTF-8 the way :func:`json.loads` reads them (encoded surrogates included;
    undecodable bytes, which it would refuse, count as one character each)."""
    if isinstance(text, bytes):
        raw = text[:offset]
        try:
            prefix = raw.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            prefix = raw.decode("utf-8", "replace")
    else:
        prefix = text[:offset]
    line_start = prefix.rfind("\n") + 1
    return prefix.count("\n") + 1, len(prefix) - line_start + 1


def parse_error_details(exc: BaseException | None) -> list[dict[str, Any]] | None:
    """``[{"line", "column", "message"}]`` for an exception of :func:`json.loads`, ``None``
    if ``exc`` is not one.

    The parser gives no position for a number of more than 4,300 digits (a ``ValueError`` of
    ``int()``) or, should it ever get that far past the depth limit of the body middleware,
    for a ``RecursionError``: their detail is ``{"message"}`` alone.
    """
    if isinstance(exc, json.JSONDecodeError):
        return [{"line": exc.lineno, "column": exc.colno, "message": exc.msg}]
    if isinstance(exc, UnicodeDecodeError):
        prefix = exc.object[: exc.start].decode(exc.encoding, "replace")
        line, column = text_position(prefix, len(prefix))
        message = f"Not valid {exc.encoding.upper()}: {exc.reason}"
        return [{"line": line, "column": column, "message": message}]
    if isinstance(exc, ValueError):
        # "Exceeds the limit (4300 digits) ...: value has 5000 digits; use sys.set_int_..."
        return [{"message": str(exc).partition(";")[0] or NOT_JSON}]
    if isinstance(exc, RecursionError):
        return [{"message": "Arrays and objects are nested too deeply."}]
    return None


def _field(loc: Sequence[int | str]) -> str:
    parts = [str(p) for p in loc]
    if parts and parts[0] == "body":
        parts = parts[1:]
    return ".".join(parts) or "body"


def validation_details(raw: Sequence[Any]) -> list[dict[str, Any]]:
    """Pydantic/FastAPI errors as ``[{"field", "location", "message", "type"}]``."""
    out: list[dict[str, Any]] = []
    for err in raw:
        loc = tuple(err.get("loc", ()))
        out.append(
            {
                "field": _field(loc),
                "location": str(loc[0]) if loc else "body",
                "message": str(err.get("msg", "invalid")),
                "type": str(err.get("type", "value_error")),
            }
        )
    return out


async def _http_exception(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = getattr(exc, "headers", None)
    if isinstance(exc, ApiError):
        details = exc.details
        if details is None and exc.code == MALFORMED_JSON:  # e.g. the webhooks' own parse
            details = parse_error_details(exc.__cause__)
        return error_response(exc.status_code, exc.code, exc.message, details, headers)
    status = exc.status_code
    if status == 400 and (details := parse_error_details(exc.__cause__)) is not None:
        # FastAPI's "There was an error parsing the body": not UTF-8, a number too long.
        return error_response(400, MALFORMED_JSON, NOT_JSON, details, headers)
    code = _STATUS_CODES.get(status, "error")
    detail = exc.detail if isinstance(exc.detail, str) else None
    message = _MESSAGES.get(status) if detail is None or detail == _reason(status) else detail
    return error_response(status, code, message or detail or "Error.", None, headers)


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return ""


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    raw = list(exc.errors())
    invalid = [err for err in raw if err.get("type") == "json_invalid"]
    if invalid:
        return error_response(400, MALFORMED_JSON, NOT_JSON, _json_invalid_details(invalid, exc))
    details = validation_details(raw)
    return _validation_response(details)


def _validation_response(details: list[dict[str, Any]]) -> JSONResponse:
    first = details[0] if details else {"field": "body", "message": "invalid"}
    message = f"{first['field']}: {first['message']}"
    return error_response(422, VALIDATION_ERROR, message, details)


def _json_invalid_details(raw: list[Any], exc: RequestValidationError) -> list[dict[str, Any]]:
    """FastAPI's ``json_invalid`` errors (``loc = ("body", offset)``, the text in ``body``)
    with a line and column instead of the offset."""
    out: list[dict[str, Any]] = []
    for err in raw:
        loc = tuple(err.get("loc", ()))
        offset = loc[1] if len(loc) > 1 and isinstance(loc[1], int) else 0
        text = exc.body if isinstance(exc.body, str | bytes) else ""
        line, column = text_position(text, offset)
        message = str((err.get("ctx") or {}).get("error") or err.get("msg", "invalid JSON"))
        out.append({"line": line, "column": column, "message": message})
    return out


def _unknown_top_level_fields(exc: errors.WorkflowInvalid) -> list[dict[str, Any]]:
    """The unknown top-level fields of a workflow definition, as validation details."""
    problems = exc.details if isinstance(exc.details, list) else []
    return [
        {"field": p["field"], "location": "body", "message": p["message"], "type": _EXTRA_FORBIDDEN}
        for p in problems
        if isinstance(p, dict)
        and p.get("step") is None
        and p.get("index") is None
        and p.get("field")
        and p.get("message") == _EXTRA_MESSAGE
    ]


async def _conveyor_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.ConveyorError)
    if isinstance(exc, errors.WorkflowInvalid) and (extra := _unknown_top_level_fields(exc)):
        return _validation_response(extra)
    for kind, status, code in _CONVEYOR_ERRORS:
        if isinstance(exc, kind):
            headers = {"Retry-After": "5"} if status == 503 else None
            return error_response(status, code, exc.message, exc.details or None, headers)
    return await _unexpected(request, exc)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.error(
        "api.unhandled_error",
        extra={"path": request.url.path, "method": request.method, "error": repr(exc)},
        exc_info=(type(exc), exc, exc.__traceback__),
    )
    return error_response(500, "internal_error", "Internal server error.")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(errors.ConveyorError, _conveyor_error)
    app.add_exception_handler(Exception, _unexpected)
