"""HTTP endpoints for affordable-batch probes."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Response

from app.api.deps import OwnerDep, SessionDep, SettingsDep
from app.schemas.common import ERROR_RESPONSES
from app.schemas.probes import ProbeList, ProbeOut, ProbeRequest
from app.services import probes as service
from app.tables import Probe

router = APIRouter(prefix="/v1/probes", tags=["probes"])


def probe_out(probe: Probe) -> ProbeOut:
    return ProbeOut(
        id=probe.id,
        status=probe.status,  # type: ignore[arg-type]
        dataset_id=probe.dataset_id,
        spec=ProbeRequest.model_validate(probe.spec),
        result=probe.result,  # type: ignore[arg-type]
        error=probe.error,
        created_at=probe.created_at,
        started_at=probe.started_at,
        finished_at=probe.finished_at,
        links={"self": f"/v1/probes/{probe.id}"},
    )


@router.post(
    "",
    status_code=202,
    response_model=ProbeOut,
    responses=ERROR_RESPONSES,
    summary="Measure the batch sizes a network affords on a worker",
    description="A worker trains each variant for a few steps at batch sizes 2, 4, 8, … on its own device and "
    "measures peak memory (GPU: torch.cuda.max_memory_allocated; CPU: traced tensor bytes against the configured "
    'worker budget) and step time. Poll GET /v1/probes/{id}; a job then takes `batch_sizes: "auto"`.',
)
def submit_probe(
    request: ProbeRequest, session: SessionDep, settings: SettingsDep, owner: OwnerDep, response: Response
) -> ProbeOut:
    probe = service.create_probe(session, settings, owner, request)
    response.headers["Location"] = f"/v1/probes/{probe.id}"
    return probe_out(probe)


ProbeListLimit = Annotated[int, Query(ge=1, le=200, description="How many to list, the newest first.")]


@router.get("", response_model=ProbeList, responses=ERROR_RESPONSES, summary="List your probes, newest first")
def list_probes(session: SessionDep, owner: OwnerDep, limit: ProbeListLimit = 50) -> ProbeList:
    return ProbeList(items=[probe_out(p) for p in service.list_probes(session, owner, limit)])


@router.get("/{probe_id}", response_model=ProbeOut, responses=ERROR_RESPONSES, summary="Get one probe")
def get_probe(probe_id: str, session: SessionDep, owner: OwnerDep) -> ProbeOut:
    return probe_out(service.get_probe(session, owner, probe_id))
