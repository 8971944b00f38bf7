"""Validate an uploaded dataset file and convert it to NormBench's canonical form.

Canonical form (stored as one uncompressed `.npz`, see `save_canonical`):

* images: `x` uint8 N×C×H×W; tabular: `x` float32 N×F (finite values only);
* `y` int64 labels in [0, num_classes), every class with at least 2 training samples;
* `class_names`: one name per label index;
* optional `x_val`/`y_val` and `x_test`/`y_test` with the same per-sample shape.

Accepted uploads: `.npz` (arrays `x`, `y`, ...), `.zip` (one folder of PNG/JPEG images per
class) and `.csv` (numeric columns plus a label column).

Pure module: standard library, NumPy and Pillow only, so both the API and the workers can use it.
Every user-facing problem raises `IngestError` with a message that says what is wrong and how to fix it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import re
import secrets
import stat
import struct
import warnings
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Literal

import numpy as np
from PIL import Image

ZIP_MAGIC = b"PK\x03\x04"
_EMPTY_ZIP_MAGIC = b"PK\x05\x06"
_NPY_MAGIC = b"\x93NUMPY"

ACCEPTED_FORMATS = (
    ".npz (NumPy arrays `x` and `y`), .zip (one folder of PNG/JPEG images per class), "
    ".csv (numeric feature columns plus a label column)"
)
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# Decoders Pillow may try. Its JPEG opener reports multi-picture JPEGs (written by many cameras) as
# "MPO"; their first frame is a plain JPEG, so that name is accepted too.
_IMAGE_FORMATS = ("PNG", "JPEG")
_ACCEPTED_IMAGE_FORMATS = ("PNG", "JPEG", "MPO")
_SPLITS = (("train", "x", "y"), ("val", "x_val", "y_val"), ("test", "x_test", "y_test"))
_CSV_CHUNK_CELLS = 1_000_000  # feature cells parsed as Python strings before converting a chunk to float32
_ARCHIVE_EXTENSIONS = (".zip", ".npz", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".7z", ".rar", ".zst", ".jar")
_NPY_DTYPE_KINDS = "biufUS"  # bool, ints, floats, fixed-width strings; never objects, structs or void
_INT64_MAX = np.iinfo(np.int64).max


class IngestError(ValueError):
    """The uploaded file cannot be used; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class IngestLimits:
    max_samples: int = 2_000_000
    max_zip_entries: int = 200_000
    max_uncompressed_bytes: int = 8 * 2**30
    max_image_pixels: int = 4096 * 4096
    max_csv_rows: int = 5_000_000
    max_csv_columns: int = 10_000
    max_csv_line_chars: int = 1 << 20
    # Uncompressed/compressed size of a zip entry larger than 1 MiB; PNG/JPEG are compressed already,
    # so a legitimate image archive stays near 1, a zip bomb reaches hundreds to millions.
    max_compression_ratio: float = 200.0


@dataclass
class CanonicalDataset:
    kind: Literal["image", "tabular"]
    x: np.ndarray  # uint8 N×C×H×W (image) or float32 N×F (tabular)
    y: np.ndarray  # int64 (N,)
    class_names: list[str]
    x_val: np.ndarray | None = None
    y_val: np.ndarray | None = None
    x_test: np.ndarray | None = None
    y_test: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """Per-sample shape: (C, H, W) for images, (F,) for tabular data."""
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


# --------------------------------------------------------------------------------------------- helpers


def _shape(shape: Sequence[int]) -> str:
    return str(tuple(int(d) for d in shape))


def _human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _preview(items: Iterable[object], limit: int = 20) -> str:
    items = list(items)
    text = ", ".join(repr(i) for i in items[:limit])
    if len(items) > limit:
        text += f", ... ({len(items) - limit} more)"
    return text


# ------------------------------------------------------------------------------------------ dispatch


def ingest_file(
    path: Path,
    filename: str,
    *,
    label_column: str = "label",
    limits: IngestLimits = IngestLimits(),
) -> CanonicalDataset:
    """Validate the upload at `path` (named `filename` by the user) and return its canonical form."""
    path = Path(path)
    ext = PurePosixPath(filename.replace("\\", "/")).suffix.lower()
    if ext not in (".npz", ".zip", ".csv"):
        hint = ""
        if ext == ".npy":
            hint = " A .npy file holds a single array; save images and labels together with np.savez(path, x=x, y=y)."
        raise IngestError(
            f"unsupported file type {ext or '(no extension)'!r} for {filename!r}; "
            f"accepted formats: {ACCEPTED_FORMATS}.{hint}"
        )
    if path.stat().st_size == 0:
        raise IngestError(f"{filename!r} is empty (0 bytes); upload the complete file")
    with path.open("rb") as f:
        head = f.read(8)
    _check_magic(ext, head, filename)
    if ext == ".npz":
        return _read_npz(path, filename, limits)
    if ext == ".zip":
        return _read_image_zip(path, filename, limits)
    return _read_csv(path, filename, label_column, limits)


def _check_magic(ext: str, head: bytes, filename: str) -> None:
    if ext in (".npz", ".zip"):
        if head.startswith(ZIP_MAGIC):
            return
        if head.startswith(_NPY_MAGIC):
            raise IngestError(
                f"{filename!r} is a single .npy array, not a .npz archive; "
                "save images and labels together with np.savez(path, x=x, y=y)"
            )
        if head.startswith(_EMPTY_ZIP_MAGIC):
            raise IngestError(f"{filename!r} is an empty zip archive; add the dataset files and upload again")
        what = "np.savez(path, x=x, y=y)" if ext == ".npz" else "a zip tool (one folder of images per class)"
        raise IngestError(
            f"{filename!r} is not a {ext} file (it does not start with the zip signature PK\\x03\\x04); "
            f"re-create it with {what}"
        )
    # .csv
    if head.startswith(ZIP_MAGIC):
        raise IngestError(
            f"{filename!r} is a zip archive, not CSV text; upload it with a .zip (image folders) "
            "or .npz (NumPy arrays) extension"
        )
    if head.startswith(_NPY_MAGIC):
        raise IngestError(f"{filename!r} is a NumPy .npy file, not CSV text; save x and y with np.savez as .npz")


def _check_zip_budget(infos: Sequence[zipfile.ZipInfo], filename: str, limits: IngestLimits) -> None:
    if len(infos) > limits.max_zip_entries:
        raise IngestError(
            f"{filename!r} has {len(infos)} entries, more than the limit of {limits.max_zip_entries}; "
            "upload fewer files"
        )
    total = sum(info.file_size for info in infos)
    if total > limits.max_uncompressed_bytes:
        raise IngestError(
            f"{filename!r} unpacks to {_human_bytes(total)}, more than the limit of "
            f"{_human_bytes(limits.max_uncompressed_bytes)}; upload a smaller dataset"
        )
    seen: set[str] = set()
    for info in infos:
        if info.flag_bits & 0x1:
            raise IngestError(
                f"entry {info.filename!r} in {filename!r} is encrypted; re-create the archive without a password"
            )
        if info.filename in seen:
            raise IngestError(
                f"entry {info.filename!r} appears twice in {filename!r}; re-create the archive so every name is unique"
            )
        seen.add(info.filename)


def _check_zip_layout(path: Path, zf: zipfile.ZipFile, filename: str) -> None:
    """Every entry's bytes lie in their own span before the central directory.

    Overlapping entries (several directory records pointing into the same compressed stream) are how
    non-recursive zip bombs reach a huge expansion from a small file; the local headers are read
    directly, nothing is decompressed.
    """
    spans: list[tuple[int, int, str]] = []
    with path.open("rb") as f:
        for info in zf.infolist():
            f.seek(info.header_offset)
            head = f.read(30)
            if len(head) < 30 or not head.startswith(ZIP_MAGIC):
                raise IngestError(
                    f"entry {info.filename!r} in {filename!r} has no local header where the directory says; "
                    "the archive is corrupt or crafted, re-create it"
                )
            name_len, extra_len = struct.unpack("<HH", head[26:30])
            start = info.header_offset
            spans.append((start, start + 30 + name_len + extra_len + info.compress_size, info.filename))
    spans.sort()
    for (_, end, name), (start, _, other) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise IngestError(
                f"entries {name!r} and {other!r} in {filename!r} overlap (share compressed bytes), a zip-bomb "
                "construction; re-create the archive with a normal zip tool"
            )
    central_directory = getattr(zf, "start_dir", None)
    if spans and central_directory is not None and spans[-1][1] > central_directory:
        raise IngestError(
            f"entry {spans[-1][2]!r} in {filename!r} runs into the zip directory; the archive is corrupt or "
            "crafted, re-create it"
        )


def _check_zip_ratio(infos: Sequence[zipfile.ZipInfo], filename: str, limits: IngestLimits) -> None:
    for info in infos:
        if info.file_size <= 2**20:
            continue
        ratio = info.file_size / max(info.compress_size, 1)
        if ratio > limits.max_compression_ratio:
            raise IngestError(
                f"entry {info.filename!r} in {filename!r} expands {ratio:.0f}× ({_human_bytes(info.compress_size)} "
                f"to {_human_bytes(info.file_size)}), more than the limit of {limits.max_compression_ratio:.0f}× "
                "(a zip bomb?); PNG/JPEG images barely compress, so store them as they are"
            )


# ----------------------------------------------------------------------------------------------- npz


def _read_npz(path: Path, filename: str, limits: IngestLimits) -> CanonicalDataset:
    try:
        with zipfile.ZipFile(path) as zf:
            _check_zip_budget(zf.infolist(), filename, limits)
            _check_zip_layout(path, zf, filename)
            for info in zf.infolist():
                _check_npy_member(zf, info, filename, limits)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError) as e:
        raise IngestError(f"{filename!r} is not a readable .npz archive ({e}); re-save it with np.savez") from e
    try:
        npz = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise IngestError(f"{filename!r} is not a readable .npz archive ({e}); re-save it with np.savez") from e
    with npz:
        keys = set(npz.files)
        missing = [k for k in ("x", "y") if k not in keys]
        if missing:
            raise IngestError(
                f"{filename!r} has no array named {' or '.join(repr(k) for k in missing)} "
                f"(found: {_preview(sorted(keys)) or 'nothing'}); save the samples as `x` and the labels "
                "as `y`, e.g. np.savez(path, x=images, y=labels). A folder-of-images archive must be "
                "uploaded as .zip"
            )
        for _, xk, yk in _SPLITS[1:]:
            if (xk in keys) != (yk in keys):
                have, lack = (xk, yk) if xk in keys else (yk, xk)
                raise IngestError(
                    f"{filename!r} has {have!r} but no {lack!r}; provide both arrays of the split or neither"
                )
        arrays = {k: _npz_array(npz, k) for _, xk, yk in _SPLITS for k in (xk, yk) if k in keys}
        names = _npz_class_names(_npz_array(npz, "class_names")) if "class_names" in keys else None
    return _from_arrays(arrays, names, limits)


def _check_npy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, filename: str, limits: IngestLimits) -> None:
    """Read one member's .npy header (a few hundred bytes) and refuse it before NumPy allocates anything.

    NumPy allocates the whole array the header declares before it reads the data, so a forged header
    claiming terabytes must be caught here: the declared size must fit in the member's (capped)
    uncompressed size, and its dtype must be plain numbers or strings.
    """
    if info.is_dir():
        return
    if not info.filename.endswith(".npy"):
        raise IngestError(
            f"{filename!r} contains {info.filename!r}, which is not a NumPy array (.npy member); a .npz must hold "
            "only arrays, save it with np.savez(path, x=x, y=y)"
        )
    key = info.filename[: -len(".npy")]
    with zf.open(info) as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f"unsupported .npy format version {version[0]}.{version[1]}")
        except (ValueError, SyntaxError, TypeError, struct.error) as e:
            raise IngestError(
                f"array {key!r} has an unreadable .npy header ({e}); re-save the file with np.savez"
            ) from e
        header_len = f.tell()
    if dtype.hasobject or dtype.kind == "O":
        raise IngestError(
            f"array {key!r} has dtype object (Python objects), which is refused for safety; store plain "
            "numeric arrays (labels: np.asarray(y, dtype=np.int64); names: np.asarray(names, dtype=str)) "
            "and save again"
        )
    if dtype.names is not None or dtype.subdtype is not None or dtype.kind not in _NPY_DTYPE_KINDS:
        raise IngestError(f"array {key!r} has dtype {dtype}; store a plain numeric array (ints or floats)")
    if any(int(d) < 0 for d in shape):
        raise IngestError(f"array {key!r} declares the negative shape {shape}; re-save the file with np.savez")
    count = 1
    for d in shape:
        count *= int(d)
    declared = count * dtype.itemsize
    available = info.file_size - header_len
    if declared > available:
        raise IngestError(
            f"array {key!r} declares shape {_shape(shape)} of {dtype} = {_human_bytes(declared)}, but its member "
            f"holds only {_human_bytes(max(available, 0))}; the file is truncated or its header is forged, "
            "re-save it with np.savez"
        )
    if declared > limits.max_uncompressed_bytes:
        raise IngestError(
            f"array {key!r} is {_human_bytes(declared)} uncompressed, more than the limit of "
            f"{_human_bytes(limits.max_uncompressed_bytes)}; upload a smaller dataset"
        )


def _npz_array(npz: np.lib.npyio.NpzFile, key: str) -> np.ndarray:
    try:
        arr = npz[key]
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise IngestError(
                f"array {key!r} has dtype object (Python objects), which is refused for safety; store plain "
                "numeric arrays (labels: np.asarray(y, dtype=np.int64); names: np.asarray(names, dtype=str)) "
                "and save again"
            ) from e
        raise IngestError(f"array {key!r} cannot be read ({e}); re-save the file with np.savez") from e
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise IngestError(f"array {key!r} cannot be read ({e}); re-save the file with np.savez") from e
    if not isinstance(arr, np.ndarray):
        raise IngestError(f"member {key!r} is not a NumPy array; create the file with np.savez(path, x=x, y=y)")
    if arr.dtype.hasobject or arr.dtype.names is not None:
        raise IngestError(f"array {key!r} has a structured/object dtype {arr.dtype}; store a plain numeric array")
    return arr


def _npz_class_names(arr: np.ndarray) -> list[str]:
    if arr.dtype.kind not in "US" or arr.ndim != 1:
        raise IngestError(
            f"class_names must be a 1-D array of strings (got dtype {arr.dtype}, shape {_shape(arr.shape)}); "
            "save it as np.asarray(names, dtype=str)"
        )
    names = [s.decode("utf-8", "replace") if isinstance(s, bytes) else str(s) for s in arr.tolist()]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise IngestError(f"class_names contains {dup!r} more than once; give every class a distinct name")
    return names


def _from_arrays(
    arrays: dict[str, np.ndarray], class_names: list[str] | None, limits: IngestLimits
) -> CanonicalDataset:
    x = arrays["x"]
    if x.ndim == 2:
        kind: Literal["image", "tabular"] = "tabular"
    elif x.ndim in (3, 4):
        kind = "image"
    else:
        raise IngestError(
            f"x has shape {_shape(x.shape)} ({x.ndim}-D); use (N, F) for tabular features, (N, H, W) for "
            "grayscale images, or (N, H, W, C) / (N, C, H, W) with C in 1, 3, 4 for images"
        )
    present = [(s, xk, yk) for s, xk, yk in _SPLITS if xk in arrays]
    total = 0
    for split, xk, yk in present:
        xs, ys = arrays[xk], arrays[yk]
        if xs.shape[1:] != x.shape[1:] or xs.ndim != x.ndim:
            raise IngestError(
                f"{xk} has shape {_shape(xs.shape)} but x has shape {_shape(x.shape)}; every split needs "
                f"the same per-sample shape {_shape(x.shape[1:])}"
            )
        if len(xs) == 0:
            fix = "add samples" if split == "train" else f"remove the empty {split} split or fill it"
            raise IngestError(f"{xk} has no samples; {fix}")
        if 0 in xs.shape:
            raise IngestError(
                f"{xk} has shape {_shape(xs.shape)} with a zero-sized dimension; samples must be non-empty"
            )
        arrays[yk] = _labels_to_int64(ys, yk, xk, xs.shape)
        total += len(xs)
    if total > limits.max_samples:
        raise IngestError(
            f"the dataset has {total} samples over all splits, more than the limit of {limits.max_samples}; "
            "upload a subset"
        )
    if kind == "tabular":
        xs_out = {xk: _tabular_to_float32(arrays[xk], xk) for _, xk, _ in present}
    else:
        xs_out = _images_to_uint8({xk: arrays[xk] for _, xk, _ in present}, limits)
    y_out = {yk: arrays[yk] for _, _, yk in present}
    names = _check_labels(y_out["y"], {yk: y_out[yk] for _, _, yk in present[1:]}, class_names)
    return CanonicalDataset(
        kind=kind,
        x=xs_out["x"],
        y=y_out["y"],
        class_names=names,
        x_val=xs_out.get("x_val"),
        y_val=y_out.get("y_val"),
        x_test=xs_out.get("x_test"),
        y_test=y_out.get("y_test"),
    )


def _labels_to_int64(y: np.ndarray, key: str, x_key: str, x_shape: Sequence[int]) -> np.ndarray:
    if y.ndim != 1:
        hint = "pass a 1-D array of class indices"
        if y.ndim == 2 and y.shape[1] == 1:
            hint = f"flatten it with {key}.reshape(-1)"
        elif y.ndim == 2:
            hint = f"if the labels are one-hot, convert them with {key}.argmax(axis=1)"
        raise IngestError(f"{key} has shape {_shape(y.shape)} but labels must be 1-D; {hint}")
    if len(y) != x_shape[0]:
        raise IngestError(
            f"{x_key} has shape {_shape(x_shape)} but {key} has shape {_shape(y.shape)}; they need the same "
            "number of samples (first dimension), one label per sample"
        )
    if y.dtype.kind == "u":
        if y.size and int(y.max()) > _INT64_MAX:
            raise IngestError(f"{key} contains label {int(y.max())}, too large; labels must be 0..num_classes-1")
        return y.astype(np.int64)
    if y.dtype.kind == "i":
        out = y.astype(np.int64)
    elif y.dtype.kind == "f":
        if not np.isfinite(y).all():
            raise IngestError(f"{key} contains NaN or infinite values; every sample needs an integer class label")
        if not np.array_equal(y, np.floor(y)) or (y.size and float(np.abs(y).max()) > 2**53):
            raise IngestError(
                f"{key} has non-integer float labels (dtype {y.dtype}); labels must be class indices 0..K-1"
            )
        out = y.astype(np.int64)
    else:
        raise IngestError(
            f"{key} has dtype {y.dtype} but labels must be integers 0..K-1; map string labels to indices and "
            "store the names as a `class_names` string array"
        )
    if out.size and int(out.min()) < 0:
        raise IngestError(f"{key} contains the negative label {int(out.min())}; labels must be 0..K-1, so remap them")
    return out


def _check_labels(y: np.ndarray, splits: dict[str, np.ndarray], class_names: list[str] | None) -> list[str]:
    """Validate int64 training labels (+ split labels); return the class names."""
    top = int(y.max())
    if class_names is not None:
        k = len(class_names)
        if top >= k:
            raise IngestError(
                f"y contains label {top} but class_names has only {k} name(s) (labels 0..{k - 1}); "
                "add the missing names or fix the labels"
            )
    else:
        k = top + 1
    uniq, counts = np.unique(y, return_counts=True)

    def name(c: int) -> str:
        return f"class {c} ({class_names[c]!r})" if class_names is not None else f"class {c}"

    if len(uniq) < 2:
        raise IngestError(
            f"the training labels contain only one class ({name(int(uniq[0]))}); classification needs at "
            "least 2 classes"
        )
    # Smallest class in 0..k-1 that is absent (uniq is sorted, non-negative) or has fewer than 2 samples.
    gaps = np.nonzero(uniq != np.arange(len(uniq)))[0]
    first_missing = int(gaps[0]) if len(gaps) else (len(uniq) if len(uniq) < k else None)
    small = np.nonzero(counts < 2)[0]
    first_small = int(uniq[small[0]]) if len(small) else None
    candidates = [c for c in (first_missing, first_small) if c is not None]
    if candidates:
        bad = min(candidates)
        have = 0 if bad == first_missing else 1
        raise IngestError(
            f"{name(bad)} has {have} training sample(s); every class 0..{k - 1} needs at least 2. "
            "Add samples of it, or renumber the labels so they are contiguous"
        )
    for key, ys in splits.items():
        if ys.size and int(ys.max()) >= k:
            raise IngestError(
                f"{key} contains label {int(ys.max())} but the training labels define only {k} classes "
                f"(0..{k - 1}); every split must use the training classes"
            )
    return class_names if class_names is not None else [str(i) for i in range(k)]


def _tabular_to_float32(a: np.ndarray, key: str) -> np.ndarray:
    if a.dtype.kind not in "biuf":
        raise IngestError(f"{key} has dtype {a.dtype}; tabular features must be numbers (int or float)")
    if a.dtype.kind == "f":
        bad = ~np.isfinite(a)
        if bad.any():
            r, c = (int(i) for i in np.argwhere(bad)[0])
            raise IngestError(
                f"{key} contains NaN or infinite values (first at row {r}, column {c}); fill in or drop "
                "missing values before uploading"
            )
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(a, dtype=np.float32)
    bad = ~np.isfinite(out)
    if bad.any():
        r, c = (int(i) for i in np.argwhere(bad)[0])
        raise IngestError(f"{key} has a value too large for float32 at row {r}, column {c}; scale the features down")
    return out


def _images_to_uint8(arrays: dict[str, np.ndarray], limits: IngestLimits) -> dict[str, np.ndarray]:
    """Convert image arrays (all of one layout) to uint8 NCHW; float scale is decided over all splits."""
    x = arrays["x"]
    if x.ndim == 3:
        layout = "NHW"
        h, w = x.shape[1], x.shape[2]
    elif x.shape[-1] in (1, 3, 4):
        layout = "NHWC"
        h, w = x.shape[1], x.shape[2]
    elif x.shape[1] in (1, 3, 4):
        layout = "NCHW"
        h, w = x.shape[2], x.shape[3]
    else:
        raise IngestError(
            f"x has shape {_shape(x.shape)}: 4-D images must be (N, H, W, C) or (N, C, H, W) with C = 1 "
            "(grayscale), 3 (RGB) or 4 (RGBA); for grayscale you can also pass (N, H, W)"
        )
    if h * w > limits.max_image_pixels:
        raise IngestError(
            f"images are {w}×{h} = {h * w} pixels, more than the limit of {limits.max_image_pixels}; downscale them"
        )
    for key, a in arrays.items():
        if a.dtype.kind not in "uif":
            raise IngestError(f"{key} has dtype {a.dtype}; image pixels must be uint8, integers 0..255 or floats")
    floats = {k: a for k, a in arrays.items() if a.dtype.kind == "f"}
    scale = 1.0
    if floats:
        for key, a in floats.items():
            if not np.isfinite(a).all():
                raise IngestError(f"{key} contains NaN or infinite pixel values; replace them before uploading")
        lo = min(float(a.min()) for a in floats.values())
        hi = max(float(a.max()) for a in floats.values())
        if lo >= 0.0 and hi <= 1.0:
            scale = 255.0
        elif not (lo >= 0.0 and hi <= 255.0):
            raise IngestError(
                f"float images must be in [0,1] or [0,255], but the values range over [{lo:g}, {hi:g}]; "
                "undo any normalization (mean/std) before uploading"
            )
    out: dict[str, np.ndarray] = {}
    for key, a in arrays.items():
        if a.dtype.kind == "f":
            a = np.clip(np.rint(a * scale), 0, 255).astype(np.uint8)
        elif a.dtype != np.uint8:
            lo, hi = int(a.min()), int(a.max())
            if lo < 0 or hi > 255:
                raise IngestError(
                    f"{key} has integer pixel values in [{lo}, {hi}] but they must lie in [0, 255]; "
                    "rescale them to 8-bit"
                )
            a = a.astype(np.uint8)
        if layout == "NHW":
            a = a[:, None, :, :]
        elif layout == "NHWC":
            a = a.transpose(0, 3, 1, 2)
        out[key] = np.ascontiguousarray(a)
    return out


# ----------------------------------------------------------------------------------------------- zip


def _entry_parts(info: zipfile.ZipInfo, filename: str) -> list[str]:
    """Path components of a zip entry after the safety checks (never extracted, but refused anyway)."""
    name = info.filename.replace("\\", "/")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise IngestError(
            f"entry {info.filename!r} in {filename!r} has an absolute path; re-create the archive with "
            "relative paths (class_folder/image.png)"
        )
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise IngestError(
            f"entry {info.filename!r} in {filename!r} contains '..'; re-create the archive with plain "
            "relative paths (class_folder/image.png)"
        )
    if stat.S_ISLNK(info.external_attr >> 16):
        raise IngestError(
            f"entry {info.filename!r} in {filename!r} is a symbolic link; store the image files themselves"
        )
    return parts


def _read_image_zip(path: Path, filename: str, limits: IngestLimits) -> CanonicalDataset:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise IngestError(f"{filename!r} is not a readable zip archive ({e}); re-create it") from e
    with zf:
        infos = zf.infolist()
        _check_zip_budget(infos, filename, limits)
        _check_zip_layout(path, zf, filename)
        _check_zip_ratio(infos, filename, limits)
        files: list[tuple[list[str], zipfile.ZipInfo]] = []
        for info in infos:
            parts = _entry_parts(info, filename)
            if info.is_dir() or not parts:
                continue
            if any(p == "__MACOSX" or p.startswith(".") for p in parts):
                continue
            if parts[-1].lower().endswith(_ARCHIVE_EXTENSIONS):
                raise IngestError(
                    f"entry {info.filename!r} in {filename!r} is an archive inside the archive; nested archives "
                    "are refused, unpack it and put its images in the class folders"
                )
            if not parts[-1].lower().endswith(_IMAGE_EXTENSIONS):
                raise IngestError(
                    f"entry {info.filename!r} is not a PNG/JPEG image (allowed extensions: "
                    f"{', '.join(_IMAGE_EXTENSIONS)}); remove it from the archive"
                )
            files.append((parts, info))
        layout = "expected one folder per class, e.g. cats/1.png and dogs/1.png (optionally inside one top folder)"
        if not files:
            raise IngestError(f"{filename!r} contains no PNG/JPEG images; {layout}")
        firsts = {parts[0] for parts, _ in files}
        if len(firsts) == 1 and all(len(parts) >= 3 for parts, _ in files):
            files = [(parts[1:], info) for parts, info in files]
        by_class: dict[str, list[tuple[str, zipfile.ZipInfo]]] = {}
        for parts, info in files:
            if len(parts) != 2:
                where = "is not inside a class folder" if len(parts) < 2 else "is nested too deeply"
                raise IngestError(f"image {info.filename!r} {where}; {layout}")
            by_class.setdefault(parts[0], []).append((info.filename, info))
        class_names = sorted(by_class)
        if len(class_names) < 2:
            raise IngestError(
                f"found {len(class_names)} class folder ({_preview(class_names)}); classification needs "
                f"at least 2 class folders; {layout}"
            )
        for cls in class_names:
            if len(by_class[cls]) < 2:
                raise IngestError(
                    f"class folder {cls!r} has only {len(by_class[cls])} image; every class needs at least 2"
                )
        entries = [
            (name, label, info)
            for label, cls in enumerate(class_names)
            for name, info in sorted(by_class[cls], key=lambda t: t[0])
        ]
        if len(entries) > limits.max_samples:
            raise IngestError(
                f"{filename!r} has {len(entries)} images, more than the limit of {limits.max_samples}; upload a subset"
            )
        x = _decode_images(zf, entries, limits)
    y = np.array([label for _, label, _ in entries], dtype=np.int64)
    names = _check_labels(y, {}, class_names)
    return CanonicalDataset(kind="image", x=x, y=y, class_names=names)


def _decode_images(
    zf: zipfile.ZipFile, entries: Sequence[tuple[str, int, zipfile.ZipInfo]], limits: IngestLimits
) -> np.ndarray:
    n = len(entries)
    gray: np.ndarray | None = None  # (N, 1, H, W) while every image so far is grayscale
    color: np.ndarray | None = None  # (N, 3, H, W) once a colour image was seen
    ref: tuple[int, int, str] | None = None  # (width, height, entry) of the first image
    Image.MAX_IMAGE_PIXELS = limits.max_image_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        for i, (name, _, info) in enumerate(entries):
            im = _open_image(zf, info, name, limits)
            w, h = im.size
            if ref is None:
                ref = (w, h, name)
            elif (w, h) != ref[:2]:
                raise IngestError(
                    f"image {name!r} is {w}×{h} but {ref[2]!r} is {ref[0]}×{ref[1]}; all images must have "
                    "the same size, so resize them before uploading"
                )
            arr, is_gray = _image_pixels(im, name)
            if gray is None and color is None:
                if is_gray:
                    gray = _allocate(n, 1, h, w, limits)
                else:
                    color = _allocate(n, 3, h, w, limits)
            if color is None and not is_gray:
                color = _allocate(n, 3, h, w, limits)
                color[:i] = gray[:i]  # type: ignore[index]  # replicate earlier grayscale images
                gray = None
            if color is not None:
                color[i] = arr if is_gray else arr.transpose(2, 0, 1)
            else:
                gray[i, 0] = arr  # type: ignore[index]
    out = color if color is not None else gray
    assert out is not None
    return out


def _allocate(n: int, c: int, h: int, w: int, limits: IngestLimits) -> np.ndarray:
    need = n * c * h * w
    if need > limits.max_uncompressed_bytes:
        raise IngestError(
            f"{n} images of {w}×{h} with {c} channel(s) need {_human_bytes(need)} decoded, more than the "
            f"limit of {_human_bytes(limits.max_uncompressed_bytes)}; downscale the images or upload fewer"
        )
    return np.empty((n, c, h, w), dtype=np.uint8)


def _open_image(zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, limits: IngestLimits) -> Image.Image:
    try:
        with zf.open(info) as f:
            data = f.read(info.file_size + 1)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError, RuntimeError) as e:
        raise IngestError(f"entry {name!r} cannot be read from the zip ({e}); re-create the archive") from e
    if len(data) != info.file_size:
        raise IngestError(f"entry {name!r} is corrupt (size does not match the zip directory); re-create the archive")
    try:
        im = Image.open(io.BytesIO(data), formats=list(_IMAGE_FORMATS))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise IngestError(
            f"image {name!r} has more than {limits.max_image_pixels} pixels; downscale it before uploading"
        ) from e
    except Image.UnidentifiedImageError as e:
        raise IngestError(
            f"image {name!r} is not a PNG or JPEG file (or is corrupt); convert it to PNG/JPEG or remove it"
        ) from e
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - any decoder failure on untrusted bytes is the upload's fault
        raise IngestError(f"image {name!r} is not a valid PNG/JPEG file ({e}); re-export or remove it") from e
    if im.format not in _ACCEPTED_IMAGE_FORMATS:
        raise IngestError(f"image {name!r} is {im.format}, not PNG/JPEG; convert it to PNG or JPEG")
    w, h = im.size
    if w * h > limits.max_image_pixels:
        raise IngestError(
            f"image {name!r} is {w}×{h} = {w * h} pixels, more than the limit of {limits.max_image_pixels}; "
            "downscale it before uploading"
        )
    if w == 0 or h == 0:
        raise IngestError(f"image {name!r} is empty ({w}×{h}); remove it")
    return im


def _image_pixels(im: Image.Image, name: str) -> tuple[np.ndarray, bool]:
    """Decode to (H, W) uint8 for grayscale images or (H, W, 3) uint8 for everything else."""
    try:
        im.load()
        mode = im.mode
        if mode == "L":
            return np.asarray(im, dtype=np.uint8), True
        if mode in ("1", "LA", "La"):
            return np.asarray(im.convert("L"), dtype=np.uint8), True
        if mode.startswith("I"):  # 16-bit grayscale PNG ("I;16", "I")
            wide = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
            return ((wide * 255 + 32767) // 65535).astype(np.uint8), True
        if mode != "RGB":
            im = im.convert("RGB")
        return np.asarray(im, dtype=np.uint8), False
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise IngestError(f"image {name!r} is too large to decode; downscale it before uploading") from e
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated/corrupt data from an untrusted upload
        raise IngestError(f"image {name!r} is broken and cannot be decoded ({e}); re-export or remove it") from e


# ----------------------------------------------------------------------------------------------- csv


def _read_csv(path: Path, filename: str, label_column: str, limits: IngestLimits) -> CanonicalDataset:
    size = path.stat().st_size
    if size > limits.max_uncompressed_bytes:
        raise IngestError(
            f"{filename!r} is {_human_bytes(size)}, more than the limit of "
            f"{_human_bytes(limits.max_uncompressed_bytes)}; upload a smaller file"
        )
    with path.open("rb") as f:
        if b"\x00" in f.read(65_536):
            raise IngestError(f"{filename!r} is not text (it contains NUL bytes); upload a UTF-8 CSV file")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            x, labels = _parse_csv(f, filename, label_column, limits)
    except UnicodeDecodeError as e:
        raise IngestError(f"{filename!r} is not UTF-8 text ({e}); save it as a UTF-8 encoded CSV") from e
    y, class_names = _csv_labels(labels)
    names = _check_labels(y, {}, class_names)
    return CanonicalDataset(kind="tabular", x=x, y=y, class_names=names)


def _bounded_lines(f: IO[str], filename: str, limit: int) -> Iterator[str]:
    """Lines of `f`, refusing any longer than `limit` characters before it is read whole."""
    number = 0
    while line := f.readline(limit + 1):
        number += 1
        if len(line) > limit and not line.endswith("\n"):
            raise IngestError(
                f"line {number} of {filename!r} is longer than {limit} characters, the limit; "
                "a CSV row should hold one sample's features (check the line endings)"
            )
        yield line


def _parse_csv(f: IO[str], filename: str, label_column: str, limits: IngestLimits) -> tuple[np.ndarray, list[str]]:
    reader = csv.reader(_bounded_lines(f, filename, limits.max_csv_line_chars))
    try:
        header: list[str] | None = None
        for row in reader:
            if any(cell.strip() for cell in row):
                header = [cell.strip() for cell in row]
                break
        if header is None:
            raise IngestError(
                f"{filename!r} has no rows; the first row must be a header naming the columns, "
                f"including the label column {label_column!r}"
            )
        for i, col in enumerate(header):
            if not col:
                raise IngestError(
                    f"column {i + 1} of the header has no name; name every column (a pandas index "
                    "column can be dropped by saving with index=False)"
                )
        if len(header) > limits.max_csv_columns:
            raise IngestError(
                f"{filename!r} has {len(header)} columns, more than the limit of {limits.max_csv_columns}; "
                "upload fewer features"
            )
        dups = sorted({c for c in header if header.count(c) > 1})
        if dups:
            raise IngestError(f"the header repeats the column name(s) {_preview(dups)}; column names must be unique")
        if label_column not in header:
            hint = ""
            if len(header) == 1 and (";" in header[0] or "\t" in header[0]):
                hint = " The file looks like it uses ';' or tabs as separators; save it with commas."
            raise IngestError(
                f"label column {label_column!r} not found; the columns present are {_preview(header)}. "
                f"Rename the label column to {label_column!r} or pick one of these as the label column.{hint}"
            )
        li = header.index(label_column)
        feat_idx = [i for i in range(len(header)) if i != li]
        feat_names = [header[i] for i in feat_idx]
        if not feat_idx:
            raise IngestError(f"{filename!r} has only the label column; add numeric feature columns")
        chunks: list[np.ndarray] = []
        labels: list[str] = []
        rows: list[list[str]] = []
        lines: list[int] = []
        ncols = len(header)
        chunk_rows = max(1, _CSV_CHUNK_CELLS // ncols)
        max_rows = min(limits.max_csv_rows, limits.max_samples)
        by_bytes = limits.max_uncompressed_bytes // (4 * len(feat_idx))  # rows of float32 features
        for row in reader:
            if not any(cell.strip() for cell in row):
                continue  # blank line
            if len(labels) >= max_rows:
                raise IngestError(f"{filename!r} has more than {max_rows} data rows, the limit; upload a subset")
            if len(labels) >= by_bytes:
                raise IngestError(
                    f"{filename!r} has more than {by_bytes} rows of {len(feat_idx)} features, more than the limit "
                    f"of {_human_bytes(limits.max_uncompressed_bytes)} as float32; upload a subset"
                )
            line = reader.line_num
            if len(row) != ncols:
                raise IngestError(
                    f"row {line} has {len(row)} field(s) but the header has {ncols} columns; make every row "
                    "match the header (quote values that contain commas)"
                )
            label = row[li].strip()
            if not label:
                raise IngestError(f"row {line} has an empty label (column {label_column!r}); give every row a label")
            labels.append(label)
            rows.append([row[i] for i in feat_idx])
            lines.append(line)
            if len(rows) >= chunk_rows:
                chunks.append(_csv_chunk(rows, lines, feat_names, label_column))
                rows, lines = [], []
    except csv.Error as e:
        raise IngestError(f"{filename!r} is not valid CSV near line {reader.line_num} ({e}); fix the quoting") from e
    if rows:
        chunks.append(_csv_chunk(rows, lines, feat_names, label_column))
    if not labels:
        raise IngestError(f"{filename!r} has a header but no data rows; add at least 2 samples per class")
    return np.concatenate(chunks), labels


def _csv_chunk(rows: list[list[str]], lines: list[int], feat_names: list[str], label_column: str) -> np.ndarray:
    """Parse feature cells to float32; errors name the row (header = row 1) and the column."""
    try:
        values = np.array(rows, dtype=np.float64)
    except ValueError:
        values = np.empty((len(rows), len(feat_names)), dtype=np.float64)
        for r, row in enumerate(rows):
            for c, cell in enumerate(row):
                try:
                    values[r, c] = float(cell)
                except ValueError:
                    what = "is empty" if not cell.strip() else f"has the non-numeric value {cell!r}"
                    raise IngestError(
                        f"row {lines[r]}, column {feat_names[c]!r} {what}; every column except the label "
                        f"column {label_column!r} must hold numbers (fill in missing values, encode "
                        "categories as numbers)"
                    ) from None
    bad = ~np.isfinite(values)
    if bad.any():
        r, c = (int(i) for i in np.argwhere(bad)[0])
        raise IngestError(
            f"row {lines[r]}, column {feat_names[c]!r} holds {rows[r][c].strip()!r}; NaN and infinite values "
            "are not allowed, fill in or drop missing values"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        out = values.astype(np.float32)
    bad = ~np.isfinite(out)
    if bad.any():
        r, c = (int(i) for i in np.argwhere(bad)[0])
        raise IngestError(
            f"row {lines[r]}, column {feat_names[c]!r} holds {rows[r][c].strip()!r}, too large for float32; "
            "scale the feature down"
        )
    return out


def _csv_labels(labels: list[str]) -> tuple[np.ndarray, list[str]]:
    """Integer labels 0..K-1 (all present) are used as is; anything else is mapped via sorted unique values.

    Integer labels that are not exactly 0..K-1 (e.g. 1-based) are sorted numerically and renumbered; their
    original values become the class names, so nothing is lost.
    """
    ints = _as_ints(labels)
    if ints is not None:
        uniq_ints = sorted(set(ints))
        if uniq_ints == list(range(len(uniq_ints))):
            return np.array(ints, dtype=np.int64), [str(v) for v in uniq_ints]
        index = {v: i for i, v in enumerate(uniq_ints)}
        return np.array([index[v] for v in ints], dtype=np.int64), [str(v) for v in uniq_ints]
    uniq = sorted(set(labels))
    lookup = {v: i for i, v in enumerate(uniq)}
    return np.array([lookup[v] for v in labels], dtype=np.int64), uniq


def _as_ints(labels: list[str]) -> list[int] | None:
    out: list[int] = []
    for s in labels:
        try:
            out.append(int(s))
            continue
        except ValueError:
            pass
        try:
            f = float(s)
        except ValueError:
            return None
        if not f.is_integer():
            return None
        out.append(int(f))
    return out


# ---------------------------------------------------------------------------------------- save / load


def _check_canonical(ds: CanonicalDataset) -> None:
    if ds.kind == "image":
        if ds.x.dtype != np.uint8 or ds.x.ndim != 4:
            raise IngestError(f"canonical image x must be uint8 N×C×H×W, got {ds.x.dtype} {_shape(ds.x.shape)}")
    elif ds.kind == "tabular":
        if ds.x.dtype != np.float32 or ds.x.ndim != 2:
            raise IngestError(f"canonical tabular x must be float32 N×F, got {ds.x.dtype} {_shape(ds.x.shape)}")
    else:
        raise IngestError(f"canonical kind must be 'image' or 'tabular', got {ds.kind!r}")
    k = len(ds.class_names)
    for split, xk, yk in _SPLITS:
        xs, ys = getattr(ds, xk), getattr(ds, yk)
        if (xs is None) != (ys is None):
            raise IngestError(f"canonical {split} split needs both {xk} and {yk}")
        if xs is None:
            continue
        if xs.dtype != ds.x.dtype or xs.shape[1:] != ds.x.shape[1:]:
            raise IngestError(
                f"canonical {xk} is {xs.dtype} {_shape(xs.shape)} but x is {ds.x.dtype} {_shape(ds.x.shape)}"
            )
        if ys.dtype != np.int64 or ys.ndim != 1 or len(ys) != len(xs):
            raise IngestError(f"canonical {yk} must be int64 of shape ({len(xs)},), got {ys.dtype} {_shape(ys.shape)}")
        if ys.size and (int(ys.min()) < 0 or int(ys.max()) >= k):
            raise IngestError(f"canonical {yk} has labels outside 0..{k - 1}")


def save_canonical(ds: CanonicalDataset, path: Path) -> None:
    """Write `ds` as an uncompressed `.npz` at `path`, atomically (temp file in the same folder + rename)."""
    path = Path(path)
    _check_canonical(ds)
    arrays: dict[str, np.ndarray] = {
        "x": ds.x,
        "y": ds.y,
        "class_names": np.asarray(list(ds.class_names), dtype=str),
        "kind": np.asarray(ds.kind, dtype=str),
    }
    for _, xk, yk in _SPLITS[1:]:
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
    """Read a file written by `save_canonical`."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            missing = [k for k in ("x", "y", "class_names", "kind") if k not in keys]
            if missing:
                raise IngestError(f"{str(path)!r} is not a canonical dataset (missing {missing}); re-ingest it")
            data = {k: npz[k] for k in keys}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        if isinstance(e, IngestError):
            raise
        raise IngestError(f"{str(path)!r} is not a readable canonical dataset ({e}); re-ingest it") from e
    ds = CanonicalDataset(
        kind=str(data["kind"].item()),  # type: ignore[arg-type]
        x=data["x"],
        y=data["y"],
        class_names=[str(s) for s in data["class_names"].tolist()],
        x_val=data.get("x_val"),
        y_val=data.get("y_val"),
        x_test=data.get("x_test"),
        y_test=data.get("y_test"),
    )
    _check_canonical(ds)
    return ds
