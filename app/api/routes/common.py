"""Query parameters and responses that several routers share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, TypeVar

from fastapi import APIRouter, Query
from fastapi.responses import StreamingResponse

from app.services.export import CSV_MEDIA_TYPE, CSV_RESPONSE, content_disposition, stream_metrics_csv

# The comparison baseline of /results and /report.
BaselineQuery = Annotated[
    str | None,
    Query(
        max_length=100,
        description="Variant label to compare every other variant with, e.g. `bn` or `gn(32)`. Default: `bn`, "
        "or the first variant when the job has no `bn`. An unknown label is a 422 listing the valid ones.",
    ),
]


Handler = TypeVar("Handler", bound=Callable[..., StreamingResponse])


def csv_export_route(router: APIRouter, path: str, summary: str) -> Callable[[Handler], Handler]:
    """A GET route answered by metrics_csv_response (documented as CSV in OpenAPI)."""
    return router.get(path, response_class=StreamingResponse, responses=CSV_RESPONSE, summary=summary)


def metrics_csv_response(
    database_url: str, filename: str, *, job_id: str | None = None, run_id: str | None = None
) -> StreamingResponse:
    """Every metric point of a job or a run as a streamed CSV download that browsers save as `filename`."""
    return StreamingResponse(
        stream_metrics_csv(database_url, job_id=job_id, run_id=run_id),
        media_type=CSV_MEDIA_TYPE,
        headers={"Content-Disposition": content_disposition(filename)},
    )
