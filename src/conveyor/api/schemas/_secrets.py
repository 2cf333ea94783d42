"""Models of ``/api/secrets``: a secret's value goes in, never out."""

from __future__ import annotations

from datetime import datetime

from pydantic import ConfigDict, Field

from conveyor.api.schemas._common import ApiModel
from conveyor.store import MIN_SECRET_CHARS, SECRET_NAME_PATTERN

MAX_SECRET_CHARS = 16 * 1024
"""Characters; the store also caps the value at 16 KiB of UTF-8."""


class SecretIn(ApiModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"name": "STRIPE_KEY", "value": "sk_live_..."}]},
    )
    name: str = Field(
        pattern=SECRET_NAME_PATTERN,
        description="A letter or `_`, then letters, digits or `_` (at most 64); referenced "
        "in `http` steps as `{{ secrets.NAME }}`.",
    )
    value: str = Field(
        min_length=MIN_SECRET_CHARS,
        max_length=MAX_SECRET_CHARS,
        description="The value (4 characters to 16 KiB). Encrypted at rest; never returned.",
    )


class SecretValueIn(ApiModel):
    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{"value": "sk_live_new..."}]}
    )
    value: str = Field(
        min_length=MIN_SECRET_CHARS,
        max_length=MAX_SECRET_CHARS,
        description="The new value (4 characters to 16 KiB).",
    )


class SecretOut(ApiModel):
    name: str = Field(examples=["STRIPE_KEY"])
    created_at: datetime
    updated_at: datetime = Field(description="When the value was last set (created or rotated).")
