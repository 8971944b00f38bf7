"""Weights rules: upload → safetensors check against the architecture's manifest → storage → row; list, get,
delete; and the check a job that starts from weights makes at submit."""

from __future__ import annotations

from typing import Literal

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from app.config import Settings
from app.core.arch_manifests import manifest
from app.errors import DomainError, InvalidSpec, NotFound
from app.ingest.safetensors_check import WeightsFileError, check_weights_file
from app.services.uploads import IncomingUpload, UploadRules, delete_unless_used, receive_upload, upload_name
from app.storage import Storage
from app.tables import Job, Weights


class InvalidWeights(DomainError):
    status_code = 422
    kind = "invalid_weights"


UPLOAD_RULES = UploadRules(
    counted_as="datasets and weights",
    stored_as="these weights",
    max_bytes=lambda settings: settings.max_weights_bytes,
    over_limit="the weights file is over the limit of {limit} (NORMBENCH_MAX_WEIGHTS_BYTES)",
)


def check_arch(arch: str) -> str:
    try:
        manifest(arch)
    except ValueError as e:
        raise InvalidWeights(f"arch: {e}") from None
    return arch


def create_weights(
    session: Session, storage: Storage, settings: Settings, upload: IncomingUpload, arch: str
) -> Weights:
    """Check one upload against the architecture's manifest and store it (nothing is left behind on any failure)."""
    m = manifest(check_arch(arch))
    display_name = upload_name("weights", upload.name, upload.filename, InvalidWeights)
    with receive_upload(session, storage, settings, upload, UPLOAD_RULES, ".safetensors") as received:
        try:
            summary = check_weights_file(received.raw, m)
        except WeightsFileError as e:
            raise InvalidWeights(str(e)) from None
        blob = received.store(received.raw, f"weights/{received.id}.safetensors", received.raw_sha256)
        row = Weights(
            id=received.id,
            owner=upload.owner,
            name=display_name,
            arch=arch,
            sha256=blob.sha256,
            size_bytes=blob.size,
            storage_uri=blob.uri,
            tensor_count=summary.tensor_count,
            parameter_count=summary.parameter_count,
            dtypes=summary.dtypes,
            has_bn_stats=summary.has_bn_stats,
            has_gn_weights=summary.has_gn_weights,
            head_classes=summary.head_classes,
        )
        session.add(row)
    return row


def list_weights(session: Session, owner: str, *, limit: int, offset: int) -> tuple[list[Weights], int]:
    """One page of the owner's weights, newest first, and how many they have in all."""
    stmt = (
        select(Weights)
        .where(Weights.owner == owner)
        .order_by(Weights.created_at.desc(), Weights.id)
        .limit(limit)
        .offset(offset)
    )
    total = session.scalar(select(func.count()).select_from(Weights).where(Weights.owner == owner))
    return list(session.scalars(stmt)), int(total or 0)


def _find(session: Session, owner: str, weights_id: str, lock: Literal["share", "update"] | None = None) -> Weights:
    stmt = select(Weights).where(Weights.id == weights_id, Weights.owner == owner)
    if lock is not None:
        stmt = stmt.with_for_update(read=lock == "share")  # held until commit (Postgres; SQLite serialises writers)
    row = session.scalars(stmt).first()
    if row is None:  # another owner's weights are as absent as weights that never existed
        raise NotFound(f"weights '{weights_id}' not found; GET /v1/weights lists yours")
    return row


def get_weights(session: Session, owner: str, weights_id: str) -> Weights:
    return _find(session, owner, weights_id)


def weights_for_job(session: Session, owner: str, weights_id: str, arch: str) -> Weights:
    """The weights a job about to be inserted starts from: the caller's, for the job's architecture (422
    otherwise). The row stays share-locked until the job commits, so a concurrent delete cannot race it."""
    try:
        row = _find(session, owner, weights_id, "share")
    except NotFound as e:
        raise InvalidSpec(f"init.weights_id: {e.detail}") from None
    if row.arch != arch:
        raise InvalidSpec(
            f"init.weights_id: weights '{weights_id}' are for {row.arch}, the job's model.arch is {arch}; "
            f"set model.arch to {row.arch} or upload weights for {arch}"
        )
    return row


def delete_weights(session: Session, storage: Storage, owner: str, weights_id: str) -> None:
    """Delete weights no job uses (the row is locked first, as for datasets)."""
    row = _find(session, owner, weights_id, "update")
    users = select(Job.id).where(Job.weights_id == weights_id).order_by(Job.created_at)
    delete_unless_used(session, storage, row, users, "weights", plural=True)
