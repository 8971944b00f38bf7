"""HTTP endpoints for jobs, their results and curves."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response
from sqlalchemy.orm import Session

from app.api.deps import OwnerDep, SessionDep, SettingsDep
from app.schemas.common import ERROR_RESPONSES
from app.schemas.jobs import JobList, JobOut, JobProgress, JobSpec, RunCounts
from app.schemas.results import Curves, Results
from app.schemas.runs import RunOut
from app.services import jobs as service
from app.services.results import build_curves, build_results, job_runs
from app.tables import Job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
ERRORS = ERROR_RESPONSES


def job_out(session: Session, job: Job) -> JobOut:
    state = service.job_state(session, job)
    base = f"/v1/jobs/{job.id}"
    return JobOut(
        id=job.id,
        name=job.name,
        dataset_id=job.dataset_id,
        status=state.status,  # type: ignore[arg-type]
        spec=JobSpec.model_validate(job.spec),
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
            "curves": f"{base}/curves?metric=val_acc",
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


@router.get("", response_model=JobList, summary="List your jobs")
def list_jobs(session: SessionDep, owner: OwnerDep) -> JobList:
    return JobList(items=[job_out(session, j) for j in service.list_jobs(session, owner)])


@router.get("/{job_id}", response_model=JobOut, responses=ERRORS, summary="Status and progress of a job")
def get_job(job_id: str, session: SessionDep, owner: OwnerDep) -> JobOut:
    return job_out(session, service.get_job(session, owner, job_id))


@router.post("/{job_id}/cancel", response_model=JobOut, responses=ERRORS, summary="Cancel a job's unfinished runs")
def cancel_job(job_id: str, session: SessionDep, owner: OwnerDep) -> JobOut:
    return job_out(session, service.cancel_job(session, owner, job_id))


@router.get("/{job_id}/runs", response_model=list[RunOut], responses=ERRORS, summary="The runs of a job")
def list_runs(job_id: str, session: SessionDep, owner: OwnerDep) -> list[RunOut]:
    job = service.get_job(session, owner, job_id)
    return [RunOut.model_validate(r, from_attributes=True) for r in job_runs(session, job)]


@router.get(
    "/{job_id}/results", response_model=Results, responses=ERRORS, summary="Final metrics and per-cell summaries"
)
def get_results(job_id: str, session: SessionDep, owner: OwnerDep) -> Results:
    job = service.get_job(session, owner, job_id)
    return build_results(session, job, service.job_state(session, job).status)


@router.get("/{job_id}/curves", response_model=Curves, responses=ERRORS, summary="One metric series per run")
def get_curves(
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
    max_points: Annotated[
        int | None,
        Query(
            ge=1, le=100000, description="Downsample each series to at most this many points; omit for full resolution"
        ),
    ] = 500,
) -> Curves:
    return build_curves(session, service.get_job(session, owner, job_id), metric, max_points)
