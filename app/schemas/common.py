"""Shapes shared by every resource."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, Field


def _as_utc(value: datetime) -> datetime:
    # Naive values are UTC (every timestamp is written so); aware ones are converted.
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# Every datetime the API returns: timezone-aware UTC, written as ISO 8601 with `Z`.
UtcTimestamp = Annotated[datetime, AfterValidator(_as_utc)]

# Fields several resources share, with one meaning and one description.
JobId = Annotated[str, Field(description="Job id.")]
SubmittedAt = Annotated[UtcTimestamp, Field(description="Submission time.")]
UploadName = Annotated[str, Field(description="Name given at upload (defaults to the file name).")]


class ErrorBody(BaseModel):
    error: str = Field(description="Machine-readable kind, e.g. `not_found`, `invalid_spec`.")
    detail: str = Field(description="What went wrong and what to do about it.")


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {code: {"model": ErrorBody} for code in (404, 409, 413, 422)}
