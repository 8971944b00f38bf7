"""Gathers one router per resource."""

from typing import Any

from fastapi import APIRouter

from app.api.routes import datasets, events, health, jobs, keys, probes, reports, runs, weights
from app.schemas.common import ErrorBody

UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "Missing, malformed, unknown or revoked API key."}
}
OVER_QUOTA: dict[int | str, dict[str, Any]] = {
    429: {"model": ErrorBody, "description": "Over a per-owner quota; the message names the limit."}
}

api_router = APIRouter()
api_router.include_router(health.router)
api_router.include_router(datasets.router, responses={**UNAUTHORIZED, **OVER_QUOTA})
api_router.include_router(weights.router, responses={**UNAUTHORIZED, **OVER_QUOTA})
api_router.include_router(jobs.router, responses={**UNAUTHORIZED, **OVER_QUOTA})
api_router.include_router(probes.router, responses={**UNAUTHORIZED, **OVER_QUOTA})
api_router.include_router(events.router, responses=UNAUTHORIZED)
api_router.include_router(reports.router, responses=UNAUTHORIZED)
api_router.include_router(runs.router, responses=UNAUTHORIZED)
api_router.include_router(keys.router, responses=UNAUTHORIZED)
