"""HTTP endpoints for datasets."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Response, UploadFile

from app.api.deps import OwnerDep, SessionDep, SettingsDep, StorageDep
from app.schemas.common import ERROR_RESPONSES
from app.schemas.datasets import DatasetList, DatasetOut
from app.services import datasets as service
from app.services.uploads import IncomingUpload

router = APIRouter(prefix="/v1/datasets", tags=["datasets"])
ERRORS = ERROR_RESPONSES


@router.post(
    "",
    status_code=201,
    response_model=DatasetOut,
    responses=ERRORS,
    summary="Upload a dataset",
    # One file and four short text fields; anything else in the form is refused while parsing.
    form_limits={"max_files": 1, "max_fields": 6, "max_part_size": 4096},
)
def upload_dataset(
    session: SessionDep,
    storage: StorageDep,
    settings: SettingsDep,
    owner: OwnerDep,
    response: Response,
    file: Annotated[
        UploadFile,
        File(
            description="A .npz (x, y; optional x_val/y_val, x_test/y_test), a .zip of "
            "class folders of PNG/JPEG images, or a .csv with a label column."
        ),
    ],
    name: Annotated[str | None, Form(max_length=200, description="Display name; defaults to the file name.")] = None,
    label_column: Annotated[
        str, Form(max_length=200, description="CSV and text uploads: the column (JSONL: the key) holding labels.")
    ] = "label",
    text_column: Annotated[
        str,
        Form(
            max_length=200,
            description="Text uploads (`kind=text` .csv, or .jsonl): the column (JSONL: the key) holding the texts.",
        ),
    ] = "text",
    max_length: Annotated[
        int,
        Form(
            ge=8,
            le=4096,
            description="Text uploads: tokens (UTF-8 bytes) kept per text; longer texts are cut there and the "
            "dataset's `summary` counts them.",
        ),
    ] = 256,
    kind: Annotated[
        Literal["auto", "image", "tabular", "signal", "segmentation", "text"],
        Form(
            description="What the samples are. `auto`: decided by the format and x's rank (2-D tabular, 3-/4-D "
            "images). `signal`: a .npz whose x is (N, L) or (N, C, L) 1-D signals (stored as float32 N×C×L; "
            "length at most 1,048,576, channels at most 1,024, finite values). `segmentation`: a .zip with "
            "images/ and masks/ (same names; masks are PNGs of class indices or palette PNGs) or a .npz with x "
            "(N, H, W[, C]) and y (N, H, W) masks; `auto` recognizes both. `image`/`tabular`: checked. `text`: a .csv with a text and a label column (a "
            ".jsonl upload is always text), stored as byte tokens cut at `max_length`."
        ),
    ] = "auto",
    ignore_index: Annotated[
        int | None,
        Form(
            ge=0,
            le=65535,
            description="Segmentation only: the mask value of pixels that count for nothing (e.g. 255 for "
            "object borders); stored as 255, excluded from loss and metrics.",
        ),
    ] = None,
) -> DatasetOut:
    row = service.create_dataset(
        session,
        storage,
        settings,
        IncomingUpload(owner, file.file, file.filename or "upload", name),
        label_column=label_column,
        text={"text_column": text_column, "max_length": max_length},
        kind=None if kind == "auto" else kind,
        ignore_index=ignore_index,
    )
    response.headers["Location"] = f"/v1/datasets/{row.id}"
    return DatasetOut.model_validate(row)


@router.get("", response_model=DatasetList, summary="List datasets you can use")
def list_datasets(session: SessionDep, owner: OwnerDep) -> DatasetList:
    return DatasetList(items=[DatasetOut.model_validate(d) for d in service.list_datasets(session, owner)])


@router.get("/{dataset_id}", response_model=DatasetOut, responses=ERRORS, summary="Get one dataset")
def get_dataset(dataset_id: str, session: SessionDep, owner: OwnerDep) -> DatasetOut:
    return DatasetOut.model_validate(service.get_dataset(session, owner, dataset_id))


@router.delete("/{dataset_id}", status_code=204, responses=ERRORS, summary="Delete a dataset no job uses")
def delete_dataset(dataset_id: str, session: SessionDep, storage: StorageDep, owner: OwnerDep) -> Response:
    service.delete_dataset(session, storage, owner, dataset_id)
    return Response(status_code=204)
