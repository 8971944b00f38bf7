"""What every upload (datasets, weights) does the same way: stream the request body to a temporary file under a
size cap, and store the blob with its row so that a failure leaves neither behind."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import Select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.units import human_bytes
from app.errors import Conflict, DomainError, PayloadTooLarge
from app.ingest.checks import IngestError, display_name
from app.storage import Storage
from app.tables import Dataset, Weights

CHUNK = 1 << 20


def copy_capped(source: BinaryIO, target: Path, max_bytes: int, over_limit: str) -> str:
    """Copy an upload to `target` a chunk at a time, refused with a 413 as soon as it is over `max_bytes`
    (`over_limit` is the message, `{limit}` in it the limit in words); returns the sha256 of what was copied."""
    written = 0
    digest = hashlib.sha256()
    with target.open("wb") as out:
        while chunk := source.read(CHUNK):
            written += len(chunk)
            if written > max_bytes:
                raise PayloadTooLarge(over_limit.format(limit=human_bytes(max_bytes)))
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest()


def upload_name(what: str, name: str | None, filename: str, error: type[DomainError]) -> str:
    """The name an upload is stored under (`name`, else the file name), refused as `error` when unusable."""
    try:
        return display_name(what, name, filename)
    except IngestError as e:
        raise error(str(e)) from None


def sha256_of(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def delete_unless_used(
    session: Session, storage: Storage, row: Dataset | Weights, users: Select[str], noun: str, *, plural: bool
) -> None:
    """Delete an upload (its row, then its blob) that no job uses; the caller has locked the row, so a job submitted
    meanwhile either committed before `users` is read (409, naming the first five) or waits and then finds no row.
    `noun` ("dataset", "weights") and `plural` word the messages."""
    be, was, whose = ("are", "were", "those") if plural else ("is", "was", "its")
    subject = f"{noun} '{row.id}'"
    ids = list(session.scalars(users))
    if ids:
        shown = ", ".join(ids[:5]) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
        raise Conflict(
            f"{subject} {be} used by {len(ids)} job(s) ({shown}); delete {whose} jobs first "
            f"(DELETE /v1/jobs/{{id}}, or `normbench jobs rm JOB`), then the {noun}"
        )
    uri = row.storage_uri
    session.delete(row)
    try:
        session.commit()
    except IntegrityError:  # a job that refers to it committed in between (SQLite, or an unlocked path)
        session.rollback()
        raise Conflict(f"{subject} {was} just used by a new job; delete its jobs first") from None
    storage.delete(uri)


class BlobPut:
    """Puts an upload's file in storage, remembering where, so that a failed upload can take it out again."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage
        self.uri: str | None = None

    def __call__(self, key: str, path: Path) -> str:
        self.uri = self.storage.put_file(key, path)
        return self.uri


@contextmanager
def stored_with_row(session: Session, storage: Storage) -> Iterator[BlobPut]:
    """Store a blob (with the BlobPut it yields) and add its row inside the block; the row is committed at its end.
    On any failure, including the commit, the session rolls back and the stored blob is deleted."""
    put = BlobPut(storage)
    try:
        yield put
        session.commit()
    except BaseException:
        session.rollback()
        if put.uri is not None:
            storage.delete(put.uri)
        raise
