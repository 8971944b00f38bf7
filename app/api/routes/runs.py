"""HTTP endpoints for single runs."""

from __future__ import annotations

from collections import defaultdict

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from app.api.deps import OwnerDep, SessionDep, SettingsDep
from app.errors import NotFound
from app.schemas.common import ERROR_RESPONSES
from app.schemas.runs import MetricPointOut, RunMetrics, RunOut
from app.services.export import CSV_MEDIA_TYPE, CSV_RESPONSE, content_disposition, stream_metrics_csv
from app.tables import MetricPoint, Run

router = APIRouter(prefix="/v1/runs", tags=["runs"])
ERRORS = ERROR_RESPONSES


def _get_run(session: SessionDep, owner: str, run_id: str) -> Run:
    run = session.scalars(select(Run).where(Run.id == run_id, Run.owner == owner)).first()
    if run is None:
        raise NotFound(f"run '{run_id}' not found; GET /v1/jobs/{{job_id}}/runs lists a job's runs")
    return run


@router.get("/{run_id}", response_model=RunOut, responses=ERRORS, summary="One run")
def get_run(run_id: str, session: SessionDep, owner: OwnerDep) -> RunOut:
    return RunOut.model_validate(_get_run(session, owner, run_id), from_attributes=True)


@router.get("/{run_id}/metrics", response_model=RunMetrics, responses=ERRORS, summary="Every metric point of a run")
def get_run_metrics(run_id: str, session: SessionDep, owner: OwnerDep) -> RunMetrics:
    run = _get_run(session, owner, run_id)
    stmt = select(MetricPoint).where(MetricPoint.run_id == run.id).order_by(MetricPoint.name, MetricPoint.step)
    metrics: dict[str, list[MetricPointOut]] = defaultdict(list)
    for p in session.scalars(stmt):
        metrics[p.name].append(MetricPointOut(step=p.step, epoch=p.epoch, value=p.value))
    return RunMetrics(run_id=run.id, metrics=dict(metrics))


@router.get(
    "/{run_id}/export.csv",
    response_class=StreamingResponse,
    responses=CSV_RESPONSE,
    summary="Every metric point of a run as streamed long-format CSV",
)
def export_run_csv(run_id: str, session: SessionDep, settings: SettingsDep, owner: OwnerDep) -> StreamingResponse:
    run = _get_run(session, owner, run_id)
    return StreamingResponse(
        stream_metrics_csv(settings.resolved_database_url, run_id=run.id),
        media_type=CSV_MEDIA_TYPE,
        headers={"Content-Disposition": content_disposition(f"normbench-run-{run.id}.csv")},
    )
