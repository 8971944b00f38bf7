"""Dataset rules: upload → validate → canonical `.npz` in storage → row; list, get, delete."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.core.dataset_format import CanonicalDataset, save_canonical
from app.errors import Conflict, InvalidDataset, NotFound
from app.ingest import IngestError, IngestLimits, ingest_file
from app.services.uploads import (
    IncomingUpload,
    StoredBlob,
    UploadRules,
    delete_unless_used,
    receive_upload,
    sha256_of,
    upload_name,
)
from app.storage import Storage
from app.tables import Dataset, Job

OVER_UPLOAD_LIMIT = (
    "the uploaded file is over the limit of {limit} (NORMBENCH_MAX_UPLOAD_BYTES); upload a smaller file or a subset "
    "of the data"
)
UPLOAD_RULES = UploadRules(
    counted_as="datasets",
    stored_as="this dataset",
    max_bytes=lambda settings: settings.max_upload_bytes,
    over_limit=OVER_UPLOAD_LIMIT,
)
ACCEPTED_SUFFIXES = (".npz", ".zip", ".csv", ".jsonl")


def ingest_limits(settings: Settings) -> IngestLimits:
    """The parsers' limits from the settings; four keep their names, two are named for zip files in the settings."""
    same = ("max_zip_entries", "max_image_pixels", "max_image_side", "max_csv_rows")
    return IngestLimits(
        max_uncompressed_bytes=settings.max_decompressed_bytes,
        max_compression_ratio=settings.max_zip_compression_ratio,
        **{name: getattr(settings, name) for name in same},
    )


def create_dataset(
    session: Session,
    storage: Storage,
    settings: Settings,
    upload: IncomingUpload,
    *,
    label_column: str,
    kind: str | None = None,
    text: dict[str, Any] | None = None,
    ignore_index: int | None = None,
) -> Dataset:
    """Validate one upload and store it in canonical form (nothing is left behind on any failure)."""
    suffix = Path(upload.filename).suffix.lower()
    if suffix not in ACCEPTED_SUFFIXES:
        raise InvalidDataset(
            f"file {upload.filename[:200]!r} has an unsupported type; upload a .npz (arrays x, y), a .zip of "
            "class folders of PNG/JPEG images, a .csv with a label column, or texts as .jsonl (or .csv with kind=text)"
        )
    display_name = upload_name("dataset", upload.name, upload.filename, InvalidDataset)
    with receive_upload(session, storage, settings, upload, UPLOAD_RULES, suffix) as received:
        try:
            canonical = ingest_file(
                received.raw,
                upload.filename,
                label_column=label_column,
                limits=ingest_limits(settings),
                **(text or {}),
                kind=kind,
                ignore_index=ignore_index,
            )
        except IngestError as e:
            raise InvalidDataset(str(e)) from None
        stored = received.raw.with_name("canonical.npz")
        save_canonical(canonical, stored)
        received.raw.unlink()
        blob = received.store(stored, f"datasets/{received.id}.npz", sha256_of(stored))
        row = dataset_row(received.id, upload.owner, display_name, canonical, blob)
        session.add(row)
    return row


def dataset_row(
    dataset_id: str,
    owner: str | None,
    name: str,
    canonical: CanonicalDataset,
    blob: StoredBlob,
    *,
    builtin: bool = False,
) -> Dataset:
    """The row of a dataset stored in canonical form: what the canonical file says of it, and where it lies."""
    return Dataset(
        id=dataset_id,
        owner=owner,
        name=name,
        kind=canonical.kind,
        shape=list(canonical.shape),
        num_classes=canonical.num_classes,
        class_names=canonical.class_names,
        num_samples=canonical.num_samples,
        split_sizes=canonical.split_sizes,
        summary=canonical.summary,
        sha256=blob.sha256,
        size_bytes=blob.size,
        storage_uri=blob.uri,
        builtin=builtin,
    )


def visible_to(owner: str):  # type: ignore[no-untyped-def]
    return or_(Dataset.owner == owner, Dataset.owner.is_(None))


def list_datasets(session: Session, owner: str) -> list[Dataset]:
    stmt = select(Dataset).where(visible_to(owner)).order_by(Dataset.created_at.desc())
    return list(session.scalars(stmt))


def _find(session: Session, owner: str, dataset_id: str, lock: Literal["share", "update"] | None = None) -> Dataset:
    stmt = select(Dataset).where(Dataset.id == dataset_id, visible_to(owner))
    if lock is not None:
        stmt = stmt.with_for_update(read=lock == "share")  # held until commit (Postgres; SQLite serialises writers)
    row = session.scalars(stmt).first()
    if row is None:
        raise NotFound(f"dataset '{dataset_id}' not found; GET /v1/datasets lists the ones you can use")
    return row


def get_dataset(session: Session, owner: str, dataset_id: str, *, for_use: bool = False) -> Dataset:
    """One dataset the owner can see, or 404. `for_use`: a job is about to refer to it, so hold a shared row
    lock until commit: a concurrent delete waits for the job, then sees it and refuses; a job submitted
    while a delete holds the row waits for it, then finds no dataset."""
    return _find(session, owner, dataset_id, "share" if for_use else None)


def delete_dataset(session: Session, storage: Storage, owner: str, dataset_id: str) -> None:
    """Delete a dataset no job uses. The row is locked first, so a job submitted meanwhile either commits
    before the check (and the delete is refused) or waits and then finds no dataset."""
    row = _find(session, owner, dataset_id, "update")
    if row.builtin:
        raise Conflict(f"dataset '{dataset_id}' is built in and cannot be deleted")
    users = select(Job.id).where(Job.dataset_id == dataset_id).order_by(Job.created_at)
    delete_unless_used(session, storage, row, users, "dataset", plural=False)
