"""Liveness and readiness probes, and operator metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse

from app.api.deps import BearerDep, SessionDep, SettingsDep
from app.schemas.common import ErrorBody
from app.services import health as service

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Database and broker are reachable")
def readyz(session: SessionDep, settings: SettingsDep) -> JSONResponse:
    checks = service.readiness_checks(session, settings)
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "not_ready", "checks": checks}, status_code=200 if ready else 503
    )


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    summary="Prometheus metrics",
    description="Counts for an operator, in the Prometheus text format: runs by status, runs whose lease "
    "expired (a lost worker the reconciler has not seen yet), queued runs never published, jobs and datasets. "
    "The counts span every owner, so with API keys on they need `Authorization: Bearer <NORMBENCH_ADMIN_TOKEN>` "
    "unless NORMBENCH_METRICS_PUBLIC=true; with keys off (loopback only) they are public unless it is false.",
    responses={
        200: {"content": {"text/plain": {"schema": {"type": "string"}}}, "description": "Prometheus text."},
        401: {"model": ErrorBody, "description": "Metrics are not public and the admin token is missing or wrong."},
        404: {"model": ErrorBody, "description": "Metrics are not public and no admin token is configured."},
    },
)
def metrics(session: SessionDep, settings: SettingsDep, credentials: BearerDep) -> PlainTextResponse:
    service.check_metrics_access(settings, credentials.credentials if credentials else None)
    return PlainTextResponse(service.prometheus_metrics(session), media_type=service.PROMETHEUS_MEDIA_TYPE)
