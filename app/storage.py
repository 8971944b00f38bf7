"""Blob storage for datasets and checkpoints behind one small interface: a local directory (`file://` URL or a
plain path) or an S3-compatible bucket (`s3://bucket/prefix`, through s3fs); plus the worker's local dataset cache.

Objects stream in and out through local files in bounded chunks: nothing reads a whole blob into memory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlparse

if TYPE_CHECKING:
    from app.config import Settings

log = logging.getLogger(__name__)
# Bytes of an upload in memory at once (one multipart part; S3 wants at least 5 MiB). Parts go one at a time, so
# an upload holds about twice this whatever the object's size; downloads stream in 64 KiB reads.
CHUNK_BYTES = 8 * 2**20


class Storage(Protocol):
    def put_file(self, key: str, source: Path) -> str:
        """Store the local file `source` under `key` atomically (readers see all of it or nothing); return
        the object's URI."""

    def download(self, uri: str, target: Path) -> None:
        """Write the object's bytes to the local file `target` (replaced atomically once complete)."""

    def local_path(self, uri: str) -> Path | None:
        """The object's own local file when the storage is a local directory (no copy needed), else None."""

    def delete(self, uri: str) -> None:
        """Remove the object; missing objects are ignored."""

    def exists(self, uri: str) -> bool:
        """Whether the object is there; False for a URI of another storage (the storage URL changed)."""


class LocalStorage:
    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, uri: str) -> Path:
        parsed = urlparse(uri)
        path = Path(parsed.path).resolve()
        if parsed.scheme != "file" or not path.is_relative_to(self.root):
            raise ValueError(f"{uri} is not inside storage root {self.root}")
        return path

    def put_file(self, key: str, source: Path) -> str:
        target = (self.root / key).resolve()
        if not target.is_relative_to(self.root):
            raise ValueError(f"storage key escapes the root: {key}")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{uuid.uuid4().hex}.tmp")
        try:
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        return target.as_uri()

    def download(self, uri: str, target: Path) -> None:
        _replace_from(target, lambda tmp: shutil.copyfile(self._path(uri), tmp))

    def local_path(self, uri: str) -> Path:
        return self._path(uri)

    def delete(self, uri: str) -> None:
        self._path(uri).unlink(missing_ok=True)

    def exists(self, uri: str) -> bool:
        try:
            return self._path(uri).exists()
        except ValueError:  # written under another storage root (the storage URL changed)
            return False


class S3Storage:
    """Objects under `s3://bucket/prefix/`, on AWS S3 or any S3-compatible server (MinIO, moto): `endpoint_url`
    picks the server; credentials left unset come from boto's usual chain (AWS_* variables, instance roles)."""

    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
    ) -> None:
        import s3fs  # imported here: file:// deployments never load the AWS client stack

        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"not an s3://bucket/prefix URL: {url}")
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.base = f"{self.bucket}/{self.prefix}".rstrip("/")
        client_kwargs: dict[str, Any] = {"region_name": region} if region else {}
        self.fs = s3fs.S3FileSystem(
            key=access_key_id,
            secret=secret_access_key,
            endpoint_url=endpoint_url,
            client_kwargs=client_kwargs,
            # A dead endpoint answers an API request or fails a run in seconds, not after minutes of retries.
            config_kwargs={"connect_timeout": 10, "read_timeout": 120, "retries": {"max_attempts": 3}},
            default_block_size=CHUNK_BYTES,
            max_concurrency=1,  # parallel parts would multiply the memory per transfer
            # Other processes write and delete objects: never answer `exists` from a stale listing.
            use_listings_cache=False,
        )

    def _object(self, uri: str) -> str:
        """`bucket/prefix/key` of a URI this storage wrote."""
        parsed = urlparse(uri)
        path = f"{parsed.netloc}{parsed.path}"
        if parsed.scheme != "s3" or not path.startswith(self.base + "/") or "/../" in path or path.endswith("/.."):
            raise ValueError(f"{uri} is not inside storage s3://{self.base}/")
        return path

    def put_file(self, key: str, source: Path) -> str:
        parts = [p for p in key.split("/") if p]
        if not parts or any(p in (".", "..") for p in parts):
            raise ValueError(f"invalid storage key: {key}")
        path = f"{self.base}/{'/'.join(parts)}"
        # An object becomes visible only once its (multipart) upload completes, so readers never see half of it.
        self.fs.put_file(str(source), path, chunksize=CHUNK_BYTES)
        return f"s3://{path}"

    def download(self, uri: str, target: Path) -> None:
        path = self._object(uri)
        _replace_from(target, lambda tmp: self.fs.get_file(path, str(tmp)))

    def local_path(self, uri: str) -> None:
        return None

    def delete(self, uri: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self._object(uri))

    def exists(self, uri: str) -> bool:
        try:
            path = self._object(uri)
        except ValueError:  # written under another storage (the storage URL changed)
            return False
        return bool(self.fs.exists(path))


def _replace_from(target: Path, write: Any) -> None:
    """Call `write(tmp)` for a temporary file beside `target`, then move it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex}.part")
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def open_storage(url: str, settings: Settings | None = None) -> Storage:
    """The storage at `url`; an `s3://` one takes its endpoint and credentials from `settings`."""
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        return LocalStorage(Path(parsed.path if parsed.scheme else url))
    if parsed.scheme == "s3":
        secret = settings.s3_secret_access_key if settings else None
        return S3Storage(
            url,
            endpoint_url=settings.s3_endpoint_url if settings else None,
            region=settings.s3_region if settings else None,
            access_key_id=settings.s3_access_key_id if settings else None,
            secret_access_key=secret.get_secret_value() if secret else None,
        )
    raise ValueError(f"unsupported storage URL scheme '{parsed.scheme}' (supported: file://, s3://, a plain path)")


def settings_storage(settings: Settings) -> Storage:
    return open_storage(settings.resolved_storage_url, settings)


@contextlib.contextmanager
def local_copy(storage: Storage, uri: str) -> Iterator[Path]:
    """A local file with the object's bytes for the `with` block: its own file when the storage is local,
    else a temporary download removed afterwards."""
    own = storage.local_path(uri)
    if own is not None:
        yield own
        return
    with tempfile.TemporaryDirectory(prefix="normbench-blob-") as tmp:
        path = Path(tmp) / "blob"
        storage.download(uri, path)
        yield path


class DatasetCache:
    """Datasets a worker downloaded from remote storage, kept in a local directory by content hash (the
    dataset's sha256) and evicted least recently used first once over `max_bytes`.

    Worker processes may share the directory: downloads and evictions hold an exclusive lock on it, and an
    entry used in the last `keep_recent_seconds` is never evicted (another process may be opening it), so
    the directory can run over its limit for that long."""

    SUFFIX = ".npz"

    def __init__(self, root: Path, max_bytes: int, keep_recent_seconds: float = 60.0) -> None:
        self.root = root.resolve()
        self.max_bytes = max_bytes
        self.keep_recent_seconds = keep_recent_seconds

    @classmethod
    def for_settings(cls, settings: Settings) -> DatasetCache:
        return cls(settings.resolved_cache_dir, settings.cache_max_bytes)

    def path(self, storage: Storage, uri: str, sha256: str) -> Path:
        """A local file with the dataset's bytes: storage's own file when it is local, else the cached copy
        (downloaded and checked against `sha256` first if missing)."""
        own = storage.local_path(uri)
        if own is not None:
            return own  # already a local file; a copy would only double the disk used
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        entry = self.root / f"{sha256}{self.SUFFIX}"
        with self._locked():
            for stale in self.root.glob(".*.part"):  # downloads hold the lock: these are left by killed ones
                stale.unlink(missing_ok=True)
            if entry.exists():
                _touch(entry)
                return entry
            started = time.monotonic()
            _replace_from(entry, lambda tmp: _download_checked(storage, uri, tmp, sha256))
            log.info(
                "cached dataset %s (%d bytes) in %.1fs", sha256[:12], entry.stat().st_size, time.monotonic() - started
            )
            _touch(entry)
            self._evict(keep=entry)
        return entry

    def entries(self) -> list[Path]:
        """Cached datasets, least recently used first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.glob(f"*{self.SUFFIX}"):
            with contextlib.suppress(FileNotFoundError):
                found.append((p.stat().st_mtime_ns, p))
        return [p for _, p in sorted(found)]

    def _evict(self, keep: Path) -> None:
        entries = self.entries()
        total = sum(p.stat().st_size for p in entries)
        now = time.time()
        for p in entries:
            if total <= self.max_bytes:
                break
            stat = p.stat()
            if p == keep or now - stat.st_mtime < self.keep_recent_seconds:
                continue
            p.unlink(missing_ok=True)
            total -= stat.st_size
            log.info("evicted cached dataset %s (%d bytes)", p.name, stat.st_size)
        if total > self.max_bytes:
            log.warning(
                "dataset cache %s holds %d bytes, over NORMBENCH_CACHE_MAX_BYTES=%d (entries in use are kept)",
                self.root,
                total,
                self.max_bytes,
            )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def _touch(path: Path) -> None:
    """Mark a cache entry most recently used, with the precise clock (file times use a coarser one)."""
    now = time.time_ns()
    os.utime(path, ns=(now, now))


def _download_checked(storage: Storage, uri: str, target: Path, sha256: str) -> None:
    storage.download(uri, target)
    digest = hashlib.sha256()
    with target.open("rb") as f:
        while block := f.read(2**20):
            digest.update(block)
    if digest.hexdigest() != sha256:
        raise ValueError(f"dataset at {uri} does not match its sha256 {sha256[:12]}… (changed or corrupted in storage)")
