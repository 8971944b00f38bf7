"""HTTP endpoints for single runs."""

from __future__ import annotations

from collections import defaultdict

from fastapi import APIRouter
from sqlalchemy import select

from app.api.deps import OwnerDep, SessionDep
from app.errors import NotFound
from app.schemas.common import ERROR_RESPONSES
from app.schemas.runs import MetricPointOut, RunMetrics, RunOut
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
