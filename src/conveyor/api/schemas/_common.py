"""Envelope, pagination and error models shared by every route (camelCase on the wire)."""

from __future__ import annotations

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

T = TypeVar("T")


class ApiModel(BaseModel):
    """Base of every API model: camelCase aliases, snake_case attributes."""

    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


class Envelope(ApiModel, Generic[T]):
    """A successful answer."""

    success: Literal[True] = True
    data: T


class Page(ApiModel, Generic[T]):
    """One page of a list; pass ``nextCursor`` as ``cursor`` to get the next page."""

    items: list[T]
    next_cursor: str | None = Field(
        None, description="Opaque cursor of the next page; null on the last page."
    )


class ErrorBody(ApiModel):
    code: str = Field(description="Stable machine-readable error code.", examples=["not_found"])
    message: str = Field(description="What went wrong, for a person.", examples=["Not found."])
    details: Any = Field(
        default_factory=dict,
        description="Structured context: the invalid fields of a validation error, limits, ...",
    )


class ErrorResponse(ApiModel):
    """The one error shape of every 4xx/5xx answer."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "success": False,
                    "error": {
                        "code": "validation_error",
                        "message": "steps.0.id: Field required",
                        "details": [
                            {
                                "field": "steps.0.id",
                                "location": "body",
                                "message": "Field required",
                                "type": "missing",
                            }
                        ],
                    },
                }
            ]
        }
    )
    success: Literal[False] = False
    error: ErrorBody


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` entries documenting the error shape for ``statuses``."""
    text = {
        400: "Malformed request (e.g. a body that is not JSON).",
        401: "Missing or invalid bearer token.",
        404: "Not found (or owned by another tenant).",
        409: "The change conflicts with the current state.",
        413: "The request body exceeds the configured limit.",
        422: "Validation failed; `details` lists each invalid field.",
        503: "A dependency (Redis or the database) is unavailable; retry later.",
    }
    return {s: {"model": ErrorResponse, "description": text.get(s, "Error.")} for s in statuses}
