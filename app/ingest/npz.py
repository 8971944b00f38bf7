"""`.npz` uploads: arrays `x`, `y` (optional `x_val`/`y_val`, `x_test`/`y_test`, `class_names`) to canonical form.

Every member is checked from the zip directory and its `.npy` header before NumPy reads it, so a forged
header or a compression bomb is refused without allocating what it claims.
"""

from __future__ import annotations

import struct
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from app.core.dataset_format import SPLITS, CanonicalDataset, Kind, shape_text
from app.core.units import human_bytes
from app.ingest.checks import (
    IngestError,
    IngestLimits,
    check_decoded_total,
    check_expansion,
    check_image_side,
    check_labels,
    check_zip_budget,
    check_zip_layout,
    first_nonfinite,
    plain_reason,
    preview,
)
from app.ingest.segmentation import from_npz_arrays

_NPY_DTYPE_KINDS = "biufUS"  # bool, ints, floats, fixed-width strings; never objects, structs or void
_INT64_MAX = np.iinfo(np.int64).max
_OBJECT_DTYPE = (
    "has dtype object (Python objects), which is refused for safety; store plain numeric arrays "
    "(labels: np.asarray(y, dtype=np.int64); names: np.asarray(names, dtype=str)) and save again"
)
LABEL_KEYS = frozenset(yk for _, _, yk in SPLITS)
_UNCOMPRESSED = (
    "save the arrays with np.savez (uncompressed) instead of np.savez_compressed; real data barely "
    "compresses, so the file stays about the same size"
)


def read_npz(
    path: Path, filename: str, limits: IngestLimits, kind: str | None = None, ignore_index: int | None = None
) -> CanonicalDataset:
    """Validate the `.npz` at `path` and convert it to the canonical form; `kind` (`signal`, `image`,
    `tabular`, `segmentation`; None: decided by x's rank, and a 3-D `y` of masks) is what the uploader says
    the samples are; `ignore_index`: segmentation masks' value for pixels that count for nothing."""
    _check_members(path, filename, limits)
    try:
        npz = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise IngestError(
            f"{filename!r} is not a readable .npz archive ({plain_reason(e)}); re-save it with np.savez"
        ) from e
    with npz:
        keys = set(npz.files)
        _check_keys(keys, filename)
        arrays = {k: _npz_array(npz, k) for _, xk, yk in SPLITS for k in (xk, yk) if k in keys}
        names = _npz_class_names(_npz_array(npz, "class_names")) if "class_names" in keys else None
    if kind == "segmentation" or (kind is None and arrays["y"].ndim == 3):
        return from_npz_arrays(arrays, names, limits, ignore_index)
    if ignore_index is not None:
        raise IngestError(
            f"ignore_index applies to segmentation masks, but y has shape {shape_text(arrays['y'].shape)}; "
            "masks are (N, H, W)"
        )
    return from_arrays(arrays, names, limits, kind)


def _check_members(path: Path, filename: str, limits: IngestLimits) -> None:
    """The archive's directory and every member's header, before any member is decompressed."""
    try:
        with zipfile.ZipFile(path) as zf:
            check_zip_budget(zf.infolist(), filename, limits)
            check_zip_layout(path, zf, filename)
            for info in zf.infolist():
                _check_npy_member(zf, info, filename, limits)
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, NotImplementedError) as e:
        raise IngestError(
            f"{filename!r} is not a readable .npz archive ({plain_reason(e)}); re-save it with np.savez"
        ) from e


def _check_keys(keys: set[str], filename: str) -> None:
    missing = [k for k in ("x", "y") if k not in keys]
    if missing:
        raise IngestError(
            f"{filename!r} has no array named {' or '.join(repr(k) for k in missing)} "
            f"(found: {preview(sorted(keys)) or 'nothing'}); save the samples as `x` and the labels "
            "as `y`, e.g. np.savez(path, x=images, y=labels). A folder-of-images archive must be "
            "uploaded as .zip"
        )
    for _, xk, yk in SPLITS[1:]:
        if (xk in keys) != (yk in keys):
            have, lack = (xk, yk) if xk in keys else (yk, xk)
            raise IngestError(f"{filename!r} has {have!r} but no {lack!r}; provide both arrays of the split or neither")


def _check_npy_member(zf: zipfile.ZipFile, info: zipfile.ZipInfo, filename: str, limits: IngestLimits) -> None:
    """Refuse one member from its directory entry and `.npy` header (a few hundred bytes) alone.

    NumPy allocates the whole array the header declares before it reads the data, so a forged header
    claiming terabytes must be caught here: the declared size must fit in the member's (capped)
    uncompressed size, and its dtype must be plain numbers or strings. The member's expansion is read
    from the directory, so a compression bomb is refused before a byte of it is inflated.
    """
    if info.is_dir():
        return
    if not info.filename.endswith(".npy"):
        raise IngestError(
            f"{filename!r} contains {info.filename!r}, which is not a NumPy array (.npy member); a .npz must hold "
            "only arrays, save it with np.savez(path, x=x, y=y)"
        )
    key = info.filename[: -len(".npy")]
    # Labels and masks are legitimately very compressible (sorted labels, mostly-background masks expand
    # 400-700x): they are exempt from the ratio guard; their size is still bounded by the decoded total below.
    if key not in LABEL_KEYS:
        check_expansion(f"array {key!r} in {filename!r}", info.compress_size, info.file_size, limits, _UNCOMPRESSED)
    shape, dtype, header_len = _read_npy_header(zf, info, key)
    if dtype.hasobject or dtype.kind == "O":
        raise IngestError(f"array {key!r} {_OBJECT_DTYPE}")
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
            f"array {key!r} declares shape {shape_text(shape)} of {dtype} = {human_bytes(declared)}, but its member "
            f"holds only {human_bytes(max(available, 0))}; the file is truncated or its header is forged, "
            "re-save it with np.savez"
        )
    check_decoded_total(f"array {key!r} is", declared, limits, "upload a smaller dataset")


def _read_npy_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, key: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape, dtype, header length) of one member, reading only its header."""
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
                f"array {key!r} has an unreadable .npy header ({_header_problem(e)}); re-save the file with np.savez"
            ) from e
        return shape, dtype, f.tell()


def _header_problem(e: BaseException) -> str:
    """NumPy parses the header with `ast.literal_eval`, whose errors name syntax-tree objects: say what it means."""
    text = str(e)
    if "malformed node" in text or " at 0x" in text or isinstance(e, SyntaxError):
        return (
            "it is not the plain dictionary of 'descr', 'fortran_order' and 'shape' that np.save writes; "
            "the file was forged or corrupted"
        )
    return plain_reason(e)


def _npz_array(npz: np.lib.npyio.NpzFile, key: str) -> np.ndarray:
    try:
        arr = npz[key]
    except ValueError as e:
        if "pickle" in str(e).lower() or "object" in str(e).lower():
            raise IngestError(f"array {key!r} {_OBJECT_DTYPE}") from e
        raise IngestError(f"array {key!r} cannot be read ({plain_reason(e)}); re-save the file with np.savez") from e
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as e:
        raise IngestError(f"array {key!r} cannot be read ({plain_reason(e)}); re-save the file with np.savez") from e
    if not isinstance(arr, np.ndarray):
        raise IngestError(f"member {key!r} is not a NumPy array; create the file with np.savez(path, x=x, y=y)")
    if arr.dtype.hasobject or arr.dtype.names is not None:
        raise IngestError(f"array {key!r} has a structured/object dtype {arr.dtype}; store a plain numeric array")
    return arr


def _npz_class_names(arr: np.ndarray) -> list[str]:
    if arr.dtype.kind not in "US" or arr.ndim != 1:
        raise IngestError(
            f"class_names must be a 1-D array of strings (got dtype {arr.dtype}, shape {shape_text(arr.shape)}); "
            "save it as np.asarray(names, dtype=str)"
        )
    names = [s.decode("utf-8", "replace") if isinstance(s, bytes) else str(s) for s in arr.tolist()]
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise IngestError(f"class_names contains {name!r} more than once; give every class a distinct name")
        seen.add(name)
    return names


# ------------------------------------------------------------------------------ arrays → canonical


def from_arrays(
    arrays: dict[str, np.ndarray], class_names: list[str] | None, limits: IngestLimits, kind: str | None = None
) -> CanonicalDataset:
    """Canonical form of user arrays keyed like `SPLITS` (`x`, `y`, `x_val`, ...); `kind` as in `read_npz`."""
    x = arrays["x"]
    kind = _stated_kind(x, kind)
    present = [(s, xk, yk) for s, xk, yk in SPLITS if xk in arrays]
    total = 0
    for split, xk, yk in present:
        _check_split_shape(split, xk, arrays[xk], x)
        arrays[yk] = _labels_to_int64(arrays[yk], yk, xk, arrays[xk].shape)
        total += len(arrays[xk])
    if total > limits.max_samples:
        raise IngestError(
            f"the dataset has {total} samples over all splits, more than the limit of {limits.max_samples}; "
            "upload a subset"
        )
    if kind == "signal":
        xs_out = _signals_to_float32({xk: arrays[xk] for _, xk, _ in present}, limits)
    elif kind == "tabular":
        cells = sum(int(arrays[xk].size) for _, xk, _ in present)
        check_decoded_total("as float32 the features take", 4 * cells, limits, "upload fewer samples or features")
        xs_out = {xk: _tabular_to_float32(arrays[xk], xk) for _, xk, _ in present}
    else:
        xs_out = _images_to_uint8({xk: arrays[xk] for _, xk, _ in present}, limits)
    y_out = {yk: arrays[yk] for _, _, yk in present}
    names = check_labels(y_out["y"], {yk: y_out[yk] for _, _, yk in present[1:]}, class_names)
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


def _stated_kind(x: np.ndarray, stated: str | None) -> Kind:
    """The kind the uploader stated (checked against x's rank), or the one x's rank implies."""
    if stated == "signal":
        if x.ndim not in (2, 3):
            raise IngestError(
                f"x has shape {shape_text(x.shape)} ({x.ndim}-D), but a signal dataset (kind=signal) needs x of shape "
                "(N, L) for one channel or (N, C, L) for C channels of length L"
            )
        return "signal"
    kind = _kind_of(x)
    if stated not in (None, kind):
        raise IngestError(
            f"x has shape {shape_text(x.shape)}, which is {kind} data, not {stated}: use (N, F) for tabular "
            "features, (N, H, W[, C]) for images, or kind=signal with (N, L) / (N, C, L) for 1-D signals"
        )
    return kind


def _kind_of(x: np.ndarray) -> Kind:
    if x.ndim == 2:
        return "tabular"
    if x.ndim in (3, 4):
        return "image"
    raise IngestError(
        f"x has shape {shape_text(x.shape)} ({x.ndim}-D); use (N, F) for tabular features, (N, H, W) for "
        "grayscale images, or (N, H, W, C) / (N, C, H, W) with C in 1, 3, 4 for images"
    )


def _check_split_shape(split: str, xk: str, xs: np.ndarray, x: np.ndarray) -> None:
    if xs.shape[1:] != x.shape[1:] or xs.ndim != x.ndim:
        raise IngestError(
            f"{xk} has shape {shape_text(xs.shape)} but x has shape {shape_text(x.shape)}; every split needs "
            f"the same per-sample shape {shape_text(x.shape[1:])}"
        )
    if len(xs) == 0:
        fix = "add samples" if split == "train" else f"remove the empty {split} split or fill it"
        raise IngestError(f"{xk} has no samples; {fix}")
    if 0 in xs.shape:
        raise IngestError(
            f"{xk} has shape {shape_text(xs.shape)} with a zero-sized dimension; samples must be non-empty"
        )


def _labels_to_int64(y: np.ndarray, key: str, x_key: str, x_shape: Sequence[int]) -> np.ndarray:
    if y.ndim != 1:
        hint = "pass a 1-D array of class indices"
        if y.ndim == 2 and y.shape[1] == 1:
            hint = f"flatten it with {key}.reshape(-1)"
        elif y.ndim == 2:
            hint = f"if the labels are one-hot, convert them with {key}.argmax(axis=1)"
        raise IngestError(f"{key} has shape {shape_text(y.shape)} but labels must be 1-D; {hint}")
    if len(y) != x_shape[0]:
        raise IngestError(
            f"{x_key} has shape {shape_text(x_shape)} but {key} has shape {shape_text(y.shape)}; they need the same "
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


def _tabular_to_float32(a: np.ndarray, key: str) -> np.ndarray:
    if a.dtype.kind not in "biuf":
        raise IngestError(f"{key} has dtype {a.dtype}; tabular features must be numbers (int or float)")
    if a.dtype.kind == "f" and (at := first_nonfinite(a)) is not None:
        r, c = at
        raise IngestError(
            f"{key} contains NaN or infinite values (first at row {r}, column {c}); fill in or drop "
            "missing values before uploading"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        out = np.ascontiguousarray(a, dtype=np.float32)
    if (at := first_nonfinite(out)) is not None:
        r, c = at
        raise IngestError(f"{key} has a value too large for float32 at row {r}, column {c}; scale the features down")
    return out


def _signals_to_float32(arrays: dict[str, np.ndarray], limits: IngestLimits) -> dict[str, np.ndarray]:
    """Signal arrays (N, L) or (N, C, L) as float32 N×C×L: numbers only, finite, within the length and channel
    limits (IngestLimits.max_signal_length, max_signal_channels)."""
    x = arrays["x"]
    channels, length = (1, x.shape[1]) if x.ndim == 2 else (x.shape[1], x.shape[2])
    if length > limits.max_signal_length:
        raise IngestError(
            f"signals have length {length}, more than the limit of {limits.max_signal_length} values per channel; "
            "downsample or cut them into windows"
        )
    if channels > limits.max_signal_channels:
        raise IngestError(
            f"signals have {channels} channels, more than the limit of {limits.max_signal_channels}; for (N, L, C) "
            "data transpose it to (N, C, L) with x.transpose(0, 2, 1)"
        )
    cells = sum(int(a.size) for a in arrays.values())
    check_decoded_total("as float32 the signals take", 4 * cells, limits, "upload fewer or shorter signals")
    out: dict[str, np.ndarray] = {}
    for key, a in arrays.items():
        if a.dtype.kind not in "biuf":
            raise IngestError(f"{key} has dtype {a.dtype}; signal values must be numbers (int or float)")
        with np.errstate(over="ignore", invalid="ignore"):
            f = np.ascontiguousarray(a, dtype=np.float32)
        if (at := first_nonfinite(f)) is not None:
            what = (
                "NaN or infinite values"
                if a.dtype.kind == "f" and not np.isfinite(a[at])
                else "a value too large for float32"
            )
            where = f"sample {at[0]}, " + (
                f"channel {at[1]}, position {at[2]}" if len(at) == 3 else f"position {at[1]}"
            )
            raise IngestError(
                f"{key} contains {what} (first at {where}); fill in or drop those samples before uploading"
            )
        out[key] = f if f.ndim == 3 else f[:, None, :]
    return out


def _image_layout(x: np.ndarray) -> tuple[str, int, int]:
    """("NHW" | "NHWC" | "NCHW", height, width) of the training images."""
    if x.ndim == 3:
        return "NHW", x.shape[1], x.shape[2]
    if x.shape[-1] in (1, 3, 4):
        return "NHWC", x.shape[1], x.shape[2]
    if x.shape[1] in (1, 3, 4):
        return "NCHW", x.shape[2], x.shape[3]
    raise IngestError(
        f"x has shape {shape_text(x.shape)}: 4-D images must be (N, H, W, C) or (N, C, H, W) with C = 1 "
        "(grayscale), 3 (RGB) or 4 (RGBA); for grayscale you can also pass (N, H, W)"
    )


def _float_image_scale(arrays: dict[str, np.ndarray]) -> float:
    """255 for floats in [0, 1], 1 for floats in [0, 255], decided over all splits together."""
    floats = {k: a for k, a in arrays.items() if a.dtype.kind == "f"}
    if not floats:
        return 1.0
    for key, a in floats.items():
        if not np.isfinite(a).all():
            raise IngestError(f"{key} contains NaN or infinite pixel values; replace them before uploading")
    lo = min(float(a.min()) for a in floats.values())
    hi = max(float(a.max()) for a in floats.values())
    if lo >= 0.0 and hi <= 1.0:
        return 255.0
    if lo >= 0.0 and hi <= 255.0:
        return 1.0
    raise IngestError(
        f"float images must be in [0,1] or [0,255], but the values range over [{lo:g}, {hi:g}]; "
        "undo any normalization (mean/std) before uploading, or, for 1-D signals of shape (N, C, L), upload "
        "with kind=signal"
    )


def _images_to_uint8(arrays: dict[str, np.ndarray], limits: IngestLimits) -> dict[str, np.ndarray]:
    """Convert image arrays (all of one layout) to uint8 NCHW; float scale is decided over all splits."""
    layout, h, w = _image_layout(arrays["x"])
    if h * w > limits.max_image_pixels:
        raise IngestError(
            f"images are {w}×{h} = {h * w} pixels, more than the limit of {limits.max_image_pixels}; downscale them"
        )
    check_image_side("the images", w, h, limits)
    for key, a in arrays.items():
        if a.dtype.kind not in "uif":
            raise IngestError(f"{key} has dtype {a.dtype}; image pixels must be uint8, integers 0..255 or floats")
    scale = _float_image_scale(arrays)
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
