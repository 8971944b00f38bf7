"""Shapes shared by every resource."""

from __future__ import annotations

from pydantic import BaseModel, Field


class ErrorBody(BaseModel):
    error: str = Field(description="Machine-readable kind, e.g. `not_found`, `invalid_spec`.")
    detail: str = Field(description="What went wrong and what to do about it.")
