"""HTTP endpoints for single runs."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from app.api.deps import OwnerDep, SessionDep, SettingsDep
from app.api.routes.common import csv_export_route, metrics_csv_response
from app.schemas.common import ERROR_RESPONSES
from app.schemas.runs import RunMetrics, RunOut
from app.services import runs as service

router = APIRouter(prefix="/v1/runs", tags=["runs"])
ERRORS = ERROR_RESPONSES


@router.get("/{run_id}", response_model=RunOut, responses=ERRORS, summary="One run")
def get_run(run_id: str, session: SessionDep, owner: OwnerDep) -> RunOut:
    return RunOut.model_validate(service.get_run(session, owner, run_id), from_attributes=True)


@router.get("/{run_id}/metrics", response_model=RunMetrics, responses=ERRORS, summary="Every metric point of a run")
def get_run_metrics(run_id: str, session: SessionDep, owner: OwnerDep) -> RunMetrics:
    return service.run_metrics(session, service.get_run(session, owner, run_id))


@csv_export_route(router, "/{run_id}/export.csv", "Every metric point of a run as streamed long-format CSV")
def export_run_csv(run_id: str, session: SessionDep, settings: SettingsDep, owner: OwnerDep) -> StreamingResponse:
    run = service.get_run(session, owner, run_id)
    return metrics_csv_response(settings.resolved_database_url, f"normbench-run-{run.id}.csv", run_id=run.id)
