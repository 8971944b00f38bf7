"""The canonical stored dataset: one uncompressed `.npz` that the API writes and the workers read.

* text: `x` uint16 N×L byte tokens (`TEXT_PAD` after each text's end);
* images: `x` uint8 N×C×H×W; tabular: `x` float32 N×F; 1-D signals: `x` float32 N×C×L (channels, length);
* `y` int64 labels in [0, num_classes); `class_names`: one name per label index; `kind`: "image", "tabular",
  "signal" or "segmentation";
* segmentation: `x` uint8 N×C×H×W images and `y` uint8 N×H×W masks of class indices in [0, num_classes), with
  `IGNORE_LABEL` (255) on pixels that count for nothing (the upload's `ignore_index`, remapped);
* optional `x_val`/`y_val` and `x_test`/`y_test` with the same per-sample shape.

NumPy only, so the torch-free API and the workers share it; the upload parsers live in `app.ingest`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import numpy as np

Kind = Literal["image", "tabular", "signal", "segmentation", "text"]
KINDS: tuple[Kind, ...] = ("image", "tabular", "signal", "segmentation", "text")
# Segmentation masks are stored as uint8: this value marks ignored pixels, so at most 255 classes.
IGNORE_LABEL = 255
MAX_SEG_CLASSES = 255
# Text (byte-level tokens, app.ingest.text_table): UTF-8 byte b is token b + 1; TEXT_PAD fills after a text's end.
TEXT_PAD = 0
TEXT_VOCAB = 257
# (split, samples key, labels key); "train" is the only split every dataset has.
SPLITS = (("train", "x", "y"), ("val", "x_val", "y_val"), ("test", "x_test", "y_test"))


class DatasetFormatError(ValueError):
    """A stored dataset file, or an array about to be stored, is not in the canonical form."""


@dataclass
class CanonicalDataset:
    kind: Kind
    x: np.ndarray  # uint8 N×C×H×W (image), float32 N×F (tabular) or float32 N×C×L (signal)
    y: np.ndarray  # int64 (N,); segmentation: uint8 (N, H, W) masks
    class_names: list[str]
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None
    # What the upload's conversion did, for the dataset's row (text: tokenization and truncation); not stored here.
    summary: dict[str, object] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Per-sample shape: (C, H, W) for images and segmentation, (F,) for tabular data, (C, L) for signals."""
        return tuple(int(d) for d in self.x.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def num_samples(self) -> int:
        return int(len(self.x))

    @property
    def split_sizes(self) -> dict[str, int]:
        sizes = {"train": int(len(self.x))}
        if self.x_val is not None:
            sizes["val"] = int(len(self.x_val))
        if self.x_test is not None:
            sizes["test"] = int(len(self.x_test))
        return sizes


def shape_text(shape: Sequence[int]) -> str:
    """`(6, 4, 4)`: a shape as people write it, whatever integer type NumPy handed over."""
    return str(tuple(int(d) for d in shape))


# Per kind: the dtype and rank of `x`, and its layout as the error names it.
_CANONICAL_X: dict[Kind, tuple[type[np.generic], int, str]] = {
    "image": (np.uint8, 4, "N×C×H×W"),
    "tabular": (np.float32, 2, "N×F"),
    "text": (np.uint16, 2, f"N×L token ids below {TEXT_VOCAB}"),
    "signal": (np.float32, 3, "N×C×L"),
    "segmentation": (np.uint8, 4, "N×C×H×W"),
}


def check_canonical(ds: CanonicalDataset) -> None:
    """Raise `DatasetFormatError` unless every array has the canonical dtype, rank and label range."""
    if ds.kind not in _CANONICAL_X:
        raise DatasetFormatError(f"canonical kind must be one of {', '.join(KINDS)}, got {ds.kind!r}")
    dtype, ndim, layout = _CANONICAL_X[ds.kind]
    fits = ds.x.dtype == dtype and ds.x.ndim == ndim
    if fits and ds.kind == "text":  # token ids index the embedding
        fits = not ds.x.size or int(ds.x.max()) < TEXT_VOCAB
    if not fits:
        raise DatasetFormatError(
            f"canonical {ds.kind} x must be {np.dtype(dtype).name} {layout}, got {ds.x.dtype} {shape_text(ds.x.shape)}"
        )
    if ds.kind == "segmentation" and len(ds.class_names) > MAX_SEG_CLASSES:
        raise DatasetFormatError(f"canonical segmentation holds at most {MAX_SEG_CLASSES} classes")
    for split, xk, yk in SPLITS:
        _check_split(ds, split, xk, yk)


def _check_split(ds: CanonicalDataset, split: str, xk: str, yk: str) -> None:
    xs, ys = getattr(ds, xk), getattr(ds, yk)
    if (xs is None) != (ys is None):
        raise DatasetFormatError(f"canonical {split} split needs both {xk} and {yk}")
    if xs is None:
        return
    if xs.dtype != ds.x.dtype or xs.shape[1:] != ds.x.shape[1:]:
        raise DatasetFormatError(
            f"canonical {xk} is {xs.dtype} {shape_text(xs.shape)} but x is {ds.x.dtype} {shape_text(ds.x.shape)}"
        )
    k = len(ds.class_names)
    if ds.kind == "segmentation":
        want = (len(xs), *xs.shape[2:])
        if ys.dtype != np.uint8 or ys.shape != want:
            raise DatasetFormatError(
                f"canonical {yk} must be uint8 masks of shape {shape_text(want)}, got {ys.dtype} {shape_text(ys.shape)}"
            )
        if ys.size and int(ys[ys != IGNORE_LABEL].max(initial=0)) >= k:
            raise DatasetFormatError(f"canonical {yk} has classes outside 0..{k - 1} (and {IGNORE_LABEL}: ignored)")
        return
    if ys.dtype != np.int64 or ys.ndim != 1 or len(ys) != len(xs):
        raise DatasetFormatError(
            f"canonical {yk} must be int64 of shape ({len(xs)},), got {ys.dtype} {shape_text(ys.shape)}"
        )
    if ys.size and (int(ys.min()) < 0 or int(ys.max()) >= k):
        raise DatasetFormatError(f"canonical {yk} has labels outside 0..{k - 1}")


def save_canonical(ds: CanonicalDataset, path: Path) -> None:
    """Write `ds` as an uncompressed `.npz` at `path`, atomically (temp file in the same folder + rename)."""
    path = Path(path)
    check_canonical(ds)
    arrays: dict[str, np.ndarray] = {
        "x": ds.x,
        "y": ds.y,
        "class_names": np.asarray(list(ds.class_names), dtype=str),
        "kind": np.asarray(ds.kind, dtype=str),
    }
    for _, xk, yk in SPLITS[1:]:
        if getattr(ds, xk) is not None:
            arrays[xk] = getattr(ds, xk)
            arrays[yk] = getattr(ds, yk)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    try:
        with tmp.open("xb") as f:
            np.savez(f, **arrays)  # type: ignore[arg-type]  # numpy stubs mistype **kwds
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def load_canonical(path: Path) -> CanonicalDataset:
    """Read a file written by `save_canonical`; `DatasetFormatError` if it is not one."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            missing = [k for k in ("x", "y", "class_names", "kind") if k not in keys]
            if missing:
                raise DatasetFormatError(f"{str(path)!r} is not a canonical dataset (missing {missing}); re-ingest it")
            data = {k: npz[k] for k in keys}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, DatasetFormatError):
            raise
        raise DatasetFormatError(f"{str(path)!r} is not a readable canonical dataset ({e}); re-ingest it") from e
    kind = str(data["kind"].item())
    if kind not in KINDS:
        raise DatasetFormatError(f"canonical kind must be one of {', '.join(KINDS)}, got {kind!r}")
    ds = CanonicalDataset(
        kind=cast(Kind, kind),
        x=data["x"],
        y=data["y"],
        class_names=[str(s) for s in data["class_names"].tolist()],
        x_val=data.get("x_val"),
        y_val=data.get("y_val"),
        x_test=data.get("x_test"),
        y_test=data.get("y_test"),
    )
    check_canonical(ds)
    return ds
