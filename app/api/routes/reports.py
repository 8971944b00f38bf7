"""The human-facing report of a job and its plots as SVG for embedding."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, Query
from fastapi.responses import HTMLResponse, Response

from app.api.deps import OwnerDep, SessionDep
from app.api.routes.common import BaselineQuery
from app.schemas.common import ERROR_RESPONSES
from app.services import jobs as jobs_service
from app.services import report as service
from app.services.results_cache import cache as results_cache

router = APIRouter(prefix="/v1/jobs", tags=["reports"])

SVG_MEDIA_TYPE = "image/svg+xml"
HTML_OK: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A self-contained HTML page (inline CSS and SVG, no script, nothing fetched from elsewhere).",
        "content": {"text/html": {"schema": {"type": "string"}}},
    }
}
SVG_OK: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "A standalone SVG document (no script); embed it with `<img src=…>` or open it directly.",
        "content": {SVG_MEDIA_TYPE: {"schema": {"type": "string"}}},
    }
}

INTERVAL_QUERY = Query(
    description="Error bars on the accuracy chart: `ci95`, the 95% Student-t interval of the mean over seeds "
    "(as in /results), or `std`, ±1 sample standard deviation across seeds.",
)
BAND_QUERY = Query(
    description="Band around each training curve's mean: `minmax`, the lowest and highest seed at each step, or "
    "`std`, ±1 sample standard deviation across seeds. A step with one seed has no band.",
)


Handler = TypeVar("Handler", bound=Callable[..., Response])


def svg_route(path: str, *, summary: str, description: str) -> Callable[[Handler], Handler]:
    """A GET route that answers a standalone SVG document (documented as such in OpenAPI)."""
    return router.get(
        path, response_class=Response, responses={**ERROR_RESPONSES, **SVG_OK}, summary=summary, description=description
    )


def _svg(body: str) -> Response:
    return Response(body, media_type=SVG_MEDIA_TYPE, headers=service.SECURITY_HEADERS)


@router.get(
    "/{job_id}/report",
    # `Response`, not `HTMLResponse`: FastAPI documents error models in the route's media type, and errors are JSON
    response_class=Response,
    responses={**ERROR_RESPONSES, **HTML_OK},
    summary="A report page a person can read: charts, verdicts, statistics, spec and environment",
    description="One HTML page per job, built on request from the rows in the database (the same numbers as "
    "`/results`): accuracy against log₂ batch size with one line per variant and error bars (the GroupNorm "
    "paper's Figure 1 for your data); validation-accuracy training curves per batch size with a band across "
    "seeds; the verdict sentences; accuracy by variant and batch size at a glance; the comparisons against the "
    "baseline (difference, 95% CI, p, Holm p); batch-size sensitivity; per-cell statistics; every run; the job "
    "spec; and the environment the runs reported. While runs are queued or running the page shows a progress "
    "bar and reloads itself every `refresh` seconds. Charts are inline SVG: each is an `<svg data-chart=…>` with "
    'one `<g class="series" data-series="<variant>">` per variant.',
)
def get_report(
    job_id: str,
    session: SessionDep,
    owner: OwnerDep,
    baseline: BaselineQuery = None,
    interval: Annotated[service.Interval, INTERVAL_QUERY] = "ci95",
    band: Annotated[service.Band, BAND_QUERY] = "minmax",
    refresh: Annotated[
        int,
        Query(
            ge=0,
            le=3600,
            description="Seconds between automatic reloads while the job is not finished; 0 turns reloading off. "
            "A finished job's page never reloads.",
        ),
    ] = 5,
) -> HTMLResponse:
    job = jobs_service.get_job(session, owner, job_id)
    options = service.PageOptions(baseline=baseline, interval=interval, band=band, refresh=refresh)
    # A finished job's page cannot change: rendered once (app.services.results_cache), then served from memory.
    page = results_cache.get_or_compute(
        ("report", job.id, baseline, interval, band, refresh),
        jobs_service.job_state(session, job),
        lambda: service.render_report(session, job, options).encode(),
    )
    return HTMLResponse(page, headers={**service.SECURITY_HEADERS, "Cache-Control": "no-store"})


@svg_route(
    "/{job_id}/plots/accuracy.svg",
    summary="Accuracy vs batch size as SVG, one line per variant with error bars",
    description="Mean final validation accuracy over seeds for each (variant, batch size), x axis log₂ batch "
    "size, error bars per `interval`. Hollow markers flag cells with missing seeds (diverged, failed or still "
    "running); a cross marks a cell with no result. The chart the report page shows, for embedding.",
)
def get_accuracy_plot(
    job_id: str,
    session: SessionDep,
    owner: OwnerDep,
    interval: Annotated[service.Interval, INTERVAL_QUERY] = "ci95",
) -> Response:
    job = jobs_service.get_job(session, owner, job_id)
    return _svg(service.accuracy_svg(session, job, interval))


@svg_route(
    "/{job_id}/plots/curves.svg",
    summary="Training curves as SVG: one panel per batch size, mean and seed band per variant",
    description="Small multiples of one metric against epochs, one panel per batch size with shared axes; per "
    "variant the mean across seeds as a line and the spread across seeds as a shaded band (per `band`). "
    "Accuracy metrics are drawn in percent.",
)
def get_curves_plot(
    job_id: str,
    session: SessionDep,
    owner: OwnerDep,
    metric: Annotated[
        str,
        Query(
            max_length=64,
            description="val_acc, val_loss, train_loss (per epoch), train_loss_step (every log_every_steps), lr",
        ),
    ] = "val_acc",
    band: Annotated[service.Band, BAND_QUERY] = "minmax",
) -> Response:
    job = jobs_service.get_job(session, owner, job_id)
    return _svg(service.curves_svg(session, job, metric, band))
