"""What every upload (datasets, weights) does the same way: check the owner's quota, stream the request body to a
temporary file under a size cap, and store the blob with its row so that a failure leaves neither behind."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import Select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.config import Settings
from app.core.units import human_bytes
from app.errors import Conflict, DomainError, PayloadTooLarge
from app.ingest.checks import IngestError, display_name
from app.services import quotas
from app.storage import Storage
from app.tables import Dataset, Weights, new_id

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


@dataclass(frozen=True)
class IncomingUpload:
    """One upload as the route received it: whose it is, its body, the client's file name and the name asked for."""

    owner: str
    source: BinaryIO
    filename: str
    name: str | None


@dataclass(frozen=True)
class UploadRules:
    """How one kind of upload counts against the owner's storage quota and how large its file may be."""

    counted_as: str  # what the owner has too much of, in the early quota answer ("datasets")
    stored_as: str  # what is being stored, in the exact quota answer ("this dataset")
    max_bytes: Callable[[Settings], int]
    over_limit: str  # the 413's message; `{limit}` in it is the limit in words


@dataclass(frozen=True)
class StoredBlob:
    """A file in storage, as its row records it."""

    uri: str
    sha256: str
    size: int


@dataclass(frozen=True)
class ReceivedUpload:
    """An upload copied to `raw` in a temporary folder, for the block of receive_upload to check and then `store`."""

    id: str
    raw: Path
    raw_sha256: str
    owner: str
    rules: UploadRules
    session: Session
    settings: Settings
    put: BlobPut

    def store(self, path: Path, key: str, sha256: str) -> StoredBlob:
        """Put `path` (the upload, or what it was converted to) in storage under `key`, if the owner's quota has room."""
        size = path.stat().st_size
        # takes the owner's quota lock, held until the row commits
        quotas.check_dataset_bytes(self.session, self.settings, self.owner, size, self.rules.stored_as)
        return StoredBlob(uri=self.put(key, path), sha256=sha256, size=size)


@contextmanager
def receive_upload(
    session: Session, storage: Storage, settings: Settings, upload: IncomingUpload, rules: UploadRules, suffix: str
) -> Iterator[ReceivedUpload]:
    """Receive one upload: refused early when the owner's quota is used up, then copied under the size cap to a
    temporary file named `upload{suffix}`. The block checks it, stores it and adds its row, which is committed at
    the end; nothing is left behind on any failure (the temporary folder goes with the block, a stored blob is
    deleted if the row cannot be committed). The owner's quota lock, taken by `store`, is held until the commit."""
    quotas.refuse_when_full(session, settings, upload.owner, rules.counted_as)
    session.rollback()  # end the read transaction; the exact quota check takes the lock in a fresh one
    upload_id = new_id()
    with stored_with_row(session, storage) as put, tempfile.TemporaryDirectory(prefix="normbench-upload-") as tmp:
        raw = Path(tmp) / f"upload{suffix}"
        digest = copy_capped(upload.source, raw, rules.max_bytes(settings), rules.over_limit)
        yield ReceivedUpload(upload_id, raw, digest, upload.owner, rules, session, settings, put)
