"""HTTP endpoints for uploaded pretrained weights."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, File, Form, Query, Response, UploadFile

from app.api.deps import OwnerDep, SessionDep, SettingsDep, StorageDep
from app.core.arch_manifests import manifest_archs
from app.schemas.common import ERROR_RESPONSES
from app.schemas.weights import WeightsList, WeightsOut
from app.services import weights as service
from app.services.uploads import IncomingUpload

router = APIRouter(prefix="/v1/weights", tags=["weights"])
ERRORS = ERROR_RESPONSES


@router.post(
    "",
    status_code=201,
    response_model=WeightsOut,
    responses=ERRORS,
    summary="Upload pretrained weights (safetensors)",
    description="A state dict saved with `safetensors.torch.save_file(model.state_dict(), path)` for one "
    "torchvision architecture. Pickles (`torch.save`, .pt/.pth/.bin) are refused. The file is checked against "
    "the architecture's parameter names and shapes; the 422 lists what does not match. The last classifier "
    "layer may have any number of classes; BatchNorm running statistics are optional (a GroupNorm-trained "
    "network has none).",
    # One file and two short text fields; anything else in the form is refused while parsing.
    form_limits={"max_files": 1, "max_fields": 2, "max_part_size": 4096},
)
def upload_weights(
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    owner: OwnerDep,
    response: Response,
    file: Annotated[UploadFile, File(description="A .safetensors state dict.")],
    arch: Annotated[str, Form(max_length=64, description=f"Architecture: one of {', '.join(manifest_archs())}.")],
    name: Annotated[str | None, Form(max_length=200, description="Display name; defaults to the file name.")] = None,
) -> WeightsOut:
    upload = IncomingUpload(owner, file.file, file.filename or "weights.safetensors", name)
    row = service.create_weights(session, storage, settings, upload, arch)
    response.headers["Location"] = f"/v1/weights/{row.id}"
    return WeightsOut.model_validate(row)


@router.get("", response_model=WeightsList, responses=ERRORS, summary="List your weights, newest first")
def list_weights(
    session: SessionDep,
    owner: OwnerDep,
    limit: Annotated[int, Query(ge=1, le=200, description="Page size.")] = 50,
    offset: Annotated[int, Query(ge=0, le=10**9, description="Weights to skip (a page's `next_offset`).")] = 0,
) -> WeightsList:
    rows, total = service.list_weights(session, owner, limit=limit, offset=offset)
    return WeightsList(
        items=[WeightsOut.model_validate(w) for w in rows],
        total=total,
        next_offset=offset + len(rows) if offset + len(rows) < total else None,
    )


@router.get("/{weights_id}", response_model=WeightsOut, responses=ERRORS, summary="Get one upload of weights")
def get_weights(weights_id: str, session: SessionDep, owner: OwnerDep) -> WeightsOut:
    return WeightsOut.model_validate(service.get_weights(session, owner, weights_id))


@router.delete("/{weights_id}", status_code=204, responses=ERRORS, summary="Delete weights no job uses")
def delete_weights(weights_id: str, session: SessionDep, storage: StorageDep, owner: OwnerDep) -> Response:
    service.delete_weights(session, storage, owner, weights_id)
    return Response(status_code=204)
