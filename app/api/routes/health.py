"""Liveness and readiness probes, and operator metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse
from sqlalchemy import func, select, text

from app.api.deps import SessionDep, SettingsDep
from app.core.run_states import RunStatus
from app.queue import broker_reachable
from app.tables import Dataset, Job, Run, utcnow

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Database and broker are reachable")
def readyz(session: SessionDep, settings: SettingsDep) -> JSONResponse:
    checks: dict[str, str] = {}
    try:
        session.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except Exception as e:
        checks["database"] = f"unreachable: {type(e).__name__}"
    checks["broker"] = "ok" if broker_reachable(settings) else "unreachable"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "checks": checks}, status_code=200 if ready else 503
    )


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    summary="Prometheus metrics",
    description="Counts for an operator, in the Prometheus text format: runs by status, runs whose lease "
    "expired (a lost worker the reconciler has not seen yet), queued runs never published, jobs and datasets.",
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text."}},
)
def metrics(session: SessionDep) -> PlainTextResponse:
    by_status = dict(session.execute(select(Run.status, func.count()).group_by(Run.status)).all())
    now = utcnow()
    expired = session.scalar(select(func.count()).where(Run.status == RunStatus.RUNNING, Run.lease_expires_at < now))
    unpublished = session.scalar(
        select(func.count()).where(Run.status == RunStatus.QUEUED, Run.published_at.is_(None))
    )
    lines = [
        "# HELP normbench_runs Runs by status.",
        "# TYPE normbench_runs gauge",
        *(f'normbench_runs{{status="{s}"}} {by_status.get(s, 0)}' for s in RunStatus),
        "# HELP normbench_runs_lease_expired Running runs whose lease expired.",
        "# TYPE normbench_runs_lease_expired gauge",
        f"normbench_runs_lease_expired {expired or 0}",
        "# HELP normbench_runs_unpublished Queued runs no task was published for yet.",
        "# TYPE normbench_runs_unpublished gauge",
        f"normbench_runs_unpublished {unpublished or 0}",
        "# HELP normbench_jobs Jobs.",
        "# TYPE normbench_jobs gauge",
        f"normbench_jobs {session.scalar(select(func.count()).select_from(Job)) or 0}",
        "# HELP normbench_datasets Datasets, built-in included.",
        "# TYPE normbench_datasets gauge",
        f"normbench_datasets {session.scalar(select(func.count()).select_from(Dataset)) or 0}",
    ]
    return PlainTextResponse("\n".join(lines) + "\n", media_type="text/plain; version=0.0.4")
