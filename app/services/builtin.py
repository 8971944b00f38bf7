"""Built-in datasets that are always available: scikit-learn's bundled 8×8 `digits`."""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path

import numpy as np
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.core.dataset_format import CanonicalDataset, save_canonical
from app.storage import Storage
from app.tables import Dataset

BUILTIN_DIGITS = "digits"


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
        data = path.read_bytes()
        uri = storage.put_file(f"datasets/{BUILTIN_DIGITS}.npz", path)
    if existing is not None:
        existing.storage_uri = uri
        session.commit()
        return
    session.add(
        Dataset(
            id=BUILTIN_DIGITS,
            owner=None,
            name="digits (scikit-learn 8×8 handwritten digits)",
            kind=ds.kind,
            shape=list(ds.shape),
            num_classes=ds.num_classes,
            class_names=ds.class_names,
            num_samples=ds.num_samples,
            split_sizes=ds.split_sizes,
            sha256=hashlib.sha256(data).hexdigest(),
            size_bytes=len(data),
            storage_uri=uri,
            builtin=True,
        )
    )
    try:
        session.commit()
    except IntegrityError:
        session.rollback()  # another process registered it first
