"""HTTP endpoints for jobs, their results and curves."""

from __future__ import annotations

from functools import partial
from typing import Annotated

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import StreamingResponse
from fastapi.security import HTTPAuthorizationCredentials
from sqlalchemy.orm import Session

from app.api.deps import BearerDep, OwnerDep, SessionDep, SettingsDep, StorageDep, resolve_owner
from app.api.rate_limit import client_key
from app.api.routes.common import BaselineQuery, csv_export_route, metrics_csv_response
from app.config import Settings
from app.db import read_with_retry, run_in_db_thread
from app.schemas.common import ERROR_RESPONSES
from app.schemas.jobs import ExtendRequest, JobList, JobOut, JobProgress, JobSpec, RunCounts
from app.schemas.results import CurveAggregate, Curves, Results
from app.schemas.runs import RunOut
from app.services import jobs as service
from app.services.curves import build_curve_aggregate, build_curves
from app.services.job_deletion import delete_job as delete_job_and_runs
from app.services.results import build_results, job_runs
from app.services.results_cache import cache as results_cache
from app.tables import Job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
ERRORS = ERROR_RESPONSES


def job_out(session: Session, job: Job) -> JobOut:
    return job_out_from(job, JobSpec.model_validate(job.spec), service.job_state(session, job))


def job_out_from(job: Job | service.JobStatusRow, spec: JobSpec, state: service.JobState) -> JobOut:
    base = f"/v1/jobs/{job.id}"
    return JobOut(
        id=job.id,
        name=job.name,
        dataset_id=job.dataset_id,
        status=state.status,  # type: ignore[arg-type]
        spec=spec,
        budget=job.budget,
        progress=JobProgress(
            runs_total=state.runs_total,
            runs_finished=state.runs_finished,
            fraction=round(state.fraction, 4),
            counts=RunCounts(**state.counts),
        ),
        created_at=job.created_at,
        started_at=state.started_at,
        finished_at=state.finished_at,
        links={
            "self": base,
            "results": f"{base}/results",
            "report": f"{base}/report",
            "curves": f"{base}/curves?metric=val_acc",
            "curves_aggregate": f"{base}/curves/aggregate?metric=val_acc",
            "export": f"{base}/export.csv",
            "runs": f"{base}/runs",
        },
    )


@router.post("", status_code=202, response_model=JobOut, responses=ERRORS, summary="Submit a comparison job")
def submit_job(
    spec: JobSpec, session: SessionDep, settings: SettingsDep, owner: OwnerDep, response: Response
) -> JobOut:
    job = service.create_job(session, settings, owner, spec)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_out(session, job)


@router.get("", response_model=JobList, responses=ERRORS, summary="List your jobs, newest first")
def list_jobs(
    session: SessionDep,
    owner: OwnerDep,
    limit: Annotated[int, Query(ge=1, le=500, description="At most this many jobs, the newest first.")] = 100,
) -> JobList:
    jobs = service.list_jobs(session, owner, limit)
    states = service.job_states(session, jobs)
    return JobList(items=[job_out_from(j, JobSpec.model_validate(j.spec), states[j.id]) for j in jobs])


@router.get("/{job_id}", response_model=JobOut, responses=ERRORS, summary="Status and progress of a job")
async def get_job(job_id: str, request: Request, settings: SettingsDep, credentials: BearerDep) -> Response:
    # Every client polls this. async + one hop to a reserved database thread (key look-up, job row, run counts
    # in one short session), and the JSON is written once: no per-dependency thread hops, no second validation.
    body = await run_in_db_thread(partial(_job_json, settings, credentials, job_id), key=client_key(request))
    return Response(body, media_type="application/json")


def _job_json(settings: Settings, credentials: HTTPAuthorizationCredentials | None, job_id: str) -> bytes:
    def read(session: Session) -> tuple[service.JobStatusRow, service.JobState]:
        return service.read_job_status(session, resolve_owner(settings, session, credentials), job_id)

    job, state = read_with_retry(settings.resolved_database_url, read)
    return job_out_from(job, JobSpec.model_validate_json(job.spec_json), state).model_dump_json().encode()


@router.delete(
    "/{job_id}",
    status_code=204,
    responses=ERRORS,
    summary="Delete a job with its runs, metric points and checkpoints",
    description="Frees the job's dataset for deletion. Unfinished runs are cancelled first; while some are still "
    "running (cancellation lands within seconds) the answer is 409 and the job is left cancelling: delete it again "
    "once they have stopped. Another owner's job is a 404.",
)
def delete_job(job_id: str, session: SessionDep, storage: StorageDep, owner: OwnerDep) -> Response:
    delete_job_and_runs(session, storage, owner, job_id)
    return Response(status_code=204)


@router.post("/{job_id}/cancel", response_model=JobOut, responses=ERRORS, summary="Cancel a job's unfinished runs")
def cancel_job(job_id: str, session: SessionDep, owner: OwnerDep) -> JobOut:
    return job_out(session, service.cancel_job(session, owner, job_id))


@router.post(
    "/{job_id}/retry",
    status_code=202,
    response_model=JobOut,
    responses=ERRORS,
    summary="Queue a finished job's failed and cancelled runs again",
    description="Failed and cancelled runs go back to the queue and resume from their last checkpoint; "
    "succeeded and diverged runs are kept. 409 while runs are still queued or running, if there is nothing to retry, "
    "or if runs failed out of memory (failure class `resource`: unchanged, they would fail again) unless "
    "`force=true` confirms.",
)
def retry_job(
    job_id: str,
    session: SessionDep,
    settings: SettingsDep,
    owner: OwnerDep,
    force: Annotated[
        bool, Query(description="Retry runs that failed out of memory too (they failed on a worker's memory).")
    ] = False,
) -> JobOut:
    return job_out(session, service.retry_job(session, settings, owner, job_id, force=force))


@router.post(
    "/{job_id}/extend",
    status_code=202,
    response_model=JobOut,
    responses=ERRORS,
    summary="Add seeds to a job",
    description="One more run per variant and batch size for each new seed, on the job's budget and contract; "
    "the new runs are queued at once and train in packs of their own, and the job's spec lists the new seeds. "
    'Body: `{"seeds": [3, 4]}` (new seeds) or `{"add_seeds": 2}` (the smallest unused ones). For an '
    "`inconclusive` comparison the results suggest how many seeds would detect δ. 422 for a seed the job already "
    "has or a job that would exceed the run or sample limits; 409 for a cancelled job (retry it first); "
    "404 for another owner's job.",
)
def extend_job(
    job_id: str, body: ExtendRequest, session: SessionDep, settings: SettingsDep, owner: OwnerDep, response: Response
) -> JobOut:
    job = service.extend_job(session, settings, owner, job_id, body)
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return job_out(session, job)


@router.get("/{job_id}/runs", response_model=list[RunOut], responses=ERRORS, summary="The runs of a job")
def list_runs(job_id: str, session: SessionDep, owner: OwnerDep) -> list[RunOut]:
    job = service.get_job(session, owner, job_id)
    return [RunOut.model_validate(r, from_attributes=True) for r in job_runs(session, job)]


METRIC_QUERY = Query(
    max_length=64,
    description="val_acc, val_loss, train_loss (per epoch), train_loss_step (every log_every_steps), lr",
)
MAX_POINTS_DESCRIPTION = (
    "Downsample each series to at most this many points, keeping its shape: the first and last point and the "
    "minimum and maximum of every bucket in between, so peaks, dips and the extremes survive. "
    "0 (or `full=true`) returns full resolution."
)


@router.get(
    "/{job_id}/results",
    response_model=Results,
    responses=ERRORS,
    summary="Final metrics, per-cell summaries, comparisons against a baseline and verdicts",
)
def get_results(
    job_id: str,
    session: SessionDep,
    owner: OwnerDep,
    baseline: BaselineQuery = None,
) -> Response:
    job = service.get_job(session, owner, job_id)
    state = service.job_state(session, job)
    # A finished job's results cannot change: computed (and serialized) once, then served from memory.
    body = results_cache.get_or_compute(
        ("results", job.id, baseline),
        state,
        lambda: build_results(session, job, state.status, baseline=baseline).model_dump_json(by_alias=True).encode(),
    )
    return Response(body, media_type="application/json")


@router.get("/{job_id}/curves", response_model=Curves, responses=ERRORS, summary="One metric series per run")
def get_curves(
    job_id: str,
    session: SessionDep,
    owner: OwnerDep,
    metric: Annotated[str, METRIC_QUERY] = "val_acc",
    max_points: Annotated[int | None, Query(ge=0, le=100000, description=MAX_POINTS_DESCRIPTION)] = 500,
    full: Annotated[
        bool, Query(description="Full resolution: ignore `max_points` and return every point of the window.")
    ] = False,
    offset: Annotated[
        int,
        Query(
            ge=0,
            description="Paging for long series: skip this many points at the start of each series (step order). "
            "Each series reports `next_offset` for the next page.",
        ),
    ] = 0,
    limit: Annotated[
        int | None,
        Query(
            ge=1,
            le=1_000_000,
            description="Paging for long series: take at most this many points of each series after `offset`, "
            "before downsampling (use with `full=true` to read a series page by page at full resolution).",
        ),
    ] = None,
    run_id: Annotated[str | None, Query(max_length=64, description="Only this run's series.")] = None,
) -> Curves:
    job = service.get_job(session, owner, job_id)
    return build_curves(session, job, metric, None if full else max_points, offset=offset, limit=limit, run_id=run_id)


@router.get(
    "/{job_id}/curves/aggregate",
    response_model=CurveAggregate,
    responses=ERRORS,
    summary="One metric per (variant, batch size) across seeds: mean, ±1 std band, min and max",
)
def get_curve_aggregate(
    job_id: str,
    session: SessionDep,
    owner: OwnerDep,
    metric: Annotated[str, METRIC_QUERY] = "val_acc",
    max_points: Annotated[
        int | None,
        Query(
            ge=0,
            le=100000,
            description="Downsample each cell's curve to at most this many steps (chosen on the mean with the same "
            "shape-keeping rule as /curves); 0 or `full=true` for every step.",
        ),
    ] = 500,
    full: Annotated[bool, Query(description="Every step: ignore `max_points`.")] = False,
) -> CurveAggregate:
    job = service.get_job(session, owner, job_id)
    return build_curve_aggregate(session, job, metric, None if full else max_points)


@csv_export_route(router, "/{job_id}/export.csv", "Every metric point of the job as streamed long-format CSV")
def export_job_csv(job_id: str, session: SessionDep, settings: SettingsDep, owner: OwnerDep) -> StreamingResponse:
    job = service.get_job(session, owner, job_id)
    return metrics_csv_response(settings.resolved_database_url, f"normbench-job-{job.id}.csv", job_id=job.id)
