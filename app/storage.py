"""Blob storage for datasets and checkpoints behind one small interface.

Only a local directory (`file://` URL or plain path) exists today; an S3-compatible store
implements the same four methods and is chosen by URL scheme in `open_storage`.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Protocol
from urllib.parse import urlparse


class Storage(Protocol):
    def put_file(self, key: str, source: Path) -> str:
        """Store `source` under `key` atomically; return the object's URI."""

    def fetch(self, uri: str) -> Path:
        """A local path holding the object's bytes (downloaded first if remote)."""

    def delete(self, uri: str) -> None:
        """Remove the object; missing objects are ignored."""

    def exists(self, uri: str) -> bool: ...


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
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
        return target.as_uri()

    def fetch(self, uri: str) -> Path:
        return self._path(uri)

    def delete(self, uri: str) -> None:
        self._path(uri).unlink(missing_ok=True)

    def exists(self, uri: str) -> bool:
        try:
            return self._path(uri).exists()
        except ValueError:  # written under another storage root (the storage URL changed)
            return False


def open_storage(url: str) -> Storage:
    parsed = urlparse(url)
    if parsed.scheme in ("", "file"):
        return LocalStorage(Path(parsed.path if parsed.scheme else url))
    raise ValueError(f"unsupported storage URL scheme '{parsed.scheme}' (supported: file://, a plain path)")
