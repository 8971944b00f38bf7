"""Built-in datasets that are always available: scikit-learn's bundled 8×8 `digits`."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.dataset_format import CanonicalDataset, save_canonical
from app.services.datasets import dataset_row
from app.services.uploads import StoredBlob, sha256_of
from app.storage import Storage
from app.tables import Dataset

BUILTIN_DIGITS = "digits"
DIGITS_NAME = "digits (scikit-learn 8×8 handwritten digits)"


def digits_dataset() -> CanonicalDataset:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # Pixel values are 0..16; scale to the canonical uint8 range.
    images = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    return CanonicalDataset(
        kind="image",
        x=images,
        y=bunch.target.astype(np.int64),
        class_names=[str(c) for c in bunch.target_names],
    )


def ensure_builtin_datasets(session: Session, storage: Storage) -> None:
    """Register `digits` once (idempotent; safe when several API processes start together)."""
    existing = session.get(Dataset, BUILTIN_DIGITS)
    if existing is not None and storage.exists(existing.storage_uri):
        return
    ds = digits_dataset()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "digits.npz"
        save_canonical(ds, path)
        uri = storage.put_file(f"datasets/{BUILTIN_DIGITS}.npz", path)
        blob = StoredBlob(uri=uri, sha256=sha256_of(path), size=path.stat().st_size)
    if existing is not None:
        existing.storage_uri = uri
        session.commit()
        return
    session.add(dataset_row(BUILTIN_DIGITS, None, DIGITS_NAME, ds, blob, builtin=True))
    try:
        session.commit()
    except IntegrityError:
        session.rollback()  # another process registered it first
