"""The API's one error shape and the handlers that produce it.

Every 4xx/5xx answer is ``{"success": false, "error": {"code", "message", "details"}}``:
routing 404/405, request validation (422, with the offending field), malformed JSON (400),
oversized bodies (413), Conveyor's own exceptions (mapped below) and, as a last resort, any
unexpected exception (500, logged with its traceback, details withheld from the client).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from conveyor import errors

log = logging.getLogger(__name__)

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
        return error_response(exc.status_code, exc.code, exc.message, exc.details, headers)
    status = exc.status_code
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
    details = validation_details(raw)
    if any(d["type"] == "json_invalid" for d in details):
        return error_response(400, "malformed_json", "The request body is not valid JSON.", details)
    first = details[0] if details else {"field": "body", "message": "invalid"}
    message = f"{first['field']}: {first['message']}"
    return error_response(422, "validation_error", message, details)


async def _conveyor_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, errors.ConveyorError)
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
