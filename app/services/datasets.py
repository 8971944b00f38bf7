"""Dataset rules: upload → validate → canonical `.npz` in storage → row; list, get, delete."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Literal

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.core.dataset_format import save_canonical
from app.errors import Conflict, InvalidDataset, NotFound
from app.ingest import IngestError, IngestLimits, ingest_file
from app.services import quotas
from app.services.uploads import copy_capped, delete_unless_used, sha256_of, stored_with_row, upload_name
from app.storage import Storage
from app.tables import Dataset, Job, new_id

OVER_UPLOAD_LIMIT = (
    "the uploaded file is over the limit of {limit} (NORMBENCH_MAX_UPLOAD_BYTES); upload a smaller file or a subset "
    "of the data"
)
ACCEPTED_SUFFIXES = (".npz", ".zip", ".csv", ".jsonl")


def ingest_limits(settings: Settings) -> IngestLimits:
    return IngestLimits(
        max_uncompressed_bytes=settings.max_decompressed_bytes,
        max_compression_ratio=settings.max_zip_compression_ratio,
        max_zip_entries=settings.max_zip_entries,
        max_image_pixels=settings.max_image_pixels,
        max_image_side=settings.max_image_side,
        max_csv_rows=settings.max_csv_rows,
    )


def create_dataset(
    session: Session,
    storage: Storage,
    settings: Settings,
    *,
    owner: str,
    source: BinaryIO,
    filename: str,
    name: str | None,
    label_column: str,
    kind: str | None = None,
    text: dict[str, Any] | None = None,
    ignore_index: int | None = None,
) -> Dataset:
    """Validate and store one upload. Nothing is left behind on any failure: the temporary folder goes
    with the `with` block, and the stored blob is deleted if the row cannot be committed."""
    suffix = Path(filename).suffix.lower()
    if suffix not in ACCEPTED_SUFFIXES:
        raise InvalidDataset(
            f"file {filename[:200]!r} has an unsupported type; upload a .npz (arrays x, y), a .zip of "
            "class folders of PNG/JPEG images, a .csv with a label column, or texts as .jsonl (or .csv with kind=text)"
        )
    display_name = upload_name("dataset", name, filename, InvalidDataset)
    quotas.refuse_when_full(session, settings, owner, "datasets")
    session.rollback()  # end the read transaction; the quota check below takes the lock in a fresh one
    dataset_id = new_id()
    with stored_with_row(session, storage) as put:
        with tempfile.TemporaryDirectory(prefix="normbench-upload-") as tmp:
            raw = Path(tmp) / f"upload{suffix}"
            copy_capped(source, raw, settings.max_upload_bytes, OVER_UPLOAD_LIMIT)
            try:
                canonical = ingest_file(
                    raw,
                    filename,
                    label_column=label_column,
                    limits=ingest_limits(settings),
                    **(text or {}),
                    kind=kind,
                    ignore_index=ignore_index,
                )
            except IngestError as e:
                raise InvalidDataset(str(e)) from None
            stored = Path(tmp) / "canonical.npz"
            save_canonical(canonical, stored)
            raw.unlink()
            digest = sha256_of(stored)
            size = stored.stat().st_size
            quotas.check_dataset_bytes(session, settings, owner, size)  # holds the owner's lock until commit
            uri = put(f"datasets/{dataset_id}.npz", stored)
        row = Dataset(
            id=dataset_id,
            owner=owner,
            name=display_name,
            kind=canonical.kind,
            shape=list(canonical.shape),
            num_classes=canonical.num_classes,
            class_names=canonical.class_names,
            num_samples=canonical.num_samples,
            split_sizes=canonical.split_sizes,
            summary=canonical.summary,
            sha256=digest,
            size_bytes=size,
            storage_uri=uri,
            builtin=False,
        )
        session.add(row)
    return row


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
