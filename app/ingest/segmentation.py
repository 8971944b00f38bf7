"""Segmentation uploads: images with per-pixel class masks, from a `.zip` or a `.npz`, to canonical form.

* `.zip`: `images/<stem>.png|jpg` and `masks/<stem>.png` (the same stems; optionally inside one top folder),
  masks single-channel PNGs of class indices (`L`, 16-bit) or palette PNGs (the palette *indices* are the
  classes; colours are never mapped); an optional `classes.txt` (one class name per line) next to the folders.
* `.npz`: `x` (N, H, W[, C]) images as for image uploads and `y` (N, H, W) integer masks (optional
  `x_val`/`y_val`, `x_test`/`y_test`, `class_names`).

`ignore_index` (a form field) marks pixels that count for nothing; it is stored as `IGNORE_LABEL` (255).
Masks are checked against their image's size and the class range before anything is stored.
"""

from __future__ import annotations

import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from app.core.dataset_format import IGNORE_LABEL, MAX_SEG_CLASSES, SPLITS, CanonicalDataset, shape_text
from app.ingest.checks import (
    IngestError,
    IngestLimits,
    check_class_names,
    check_decoded_total,
    check_expansion,
    open_checked_zip,
    plain_reason,
    preview,
)
from app.ingest.image_zip import _decode_images, _entry_parts, _open_image

SEG_LAYOUT = (
    "expected images/<name>.png (or .jpg) and masks/<name>.png with the same names, optionally with "
    "classes.txt (one class name per line) beside the two folders"
)
_IMAGE_EXT = (".png", ".jpg", ".jpeg")
_MASK_MODES = ("P", "L", "1", "I", "I;16", "I;16B", "I;16L")
_STORE_AS_IS = "PNG/JPEG images barely compress, so store them as they are"
_MAX_CLASSES_TXT = 64 * 1024


def is_segmentation_zip(path: Path) -> bool:
    """Whether a zip holds `images/` and `masks/` folders (at its root or in one top folder)."""
    try:
        with zipfile.ZipFile(path) as zf:
            names = [i.filename.replace("\\", "/").strip("/").split("/") for i in zf.infolist()]
    except (zipfile.BadZipFile, OSError, EOFError):
        return False
    tops = {p[0] for p in names if len(p) >= 2} | {p[1] for p in names if len(p) >= 3}
    return {"images", "masks"} <= tops


def read_segmentation_zip(
    path: Path, filename: str, limits: IngestLimits, ignore_index: int | None = None
) -> CanonicalDataset:
    zf, infos = open_checked_zip(path, filename, limits, _STORE_AS_IS)
    with zf:
        images, masks, classes = _pairs(infos, filename, limits)
        class_names = _read_classes(zf, classes) if classes is not None else None
        x = _decode_images(zf, [(name, 0, info) for name, info in images], limits)
        y = _decode_masks(zf, masks, [name for name, _ in images], x.shape[2:], limits)
    return to_canonical(x, {"y": y}, class_names, ignore_index, names={"y": [name for name, _ in masks]})


def _pairs(
    infos: Sequence[zipfile.ZipInfo], filename: str, limits: IngestLimits
) -> tuple[list[tuple[str, zipfile.ZipInfo]], list[tuple[str, zipfile.ZipInfo]], zipfile.ZipInfo | None]:
    """(image entries, mask entries) in stem order, paired by stem, and classes.txt if present."""
    files = []
    for info in infos:
        parts = _entry_parts(info, filename)
        if info.is_dir() or not parts or any(p == "__MACOSX" or p.startswith(".") for p in parts):
            continue
        files.append((parts, info))
    firsts = {parts[0] for parts, _ in files}
    if len(firsts) == 1 and firsts.isdisjoint({"images", "masks", "classes.txt"}):
        files = [(parts[1:], info) for parts, info in files]
    found: dict[str, dict[str, tuple[str, zipfile.ZipInfo]]] = {"images": {}, "masks": {}}
    classes = None
    for parts, info in files:
        if parts == ["classes.txt"]:
            classes = info
            continue
        if len(parts) != 2 or parts[0] not in found:
            raise IngestError(f"entry {info.filename!r} in {filename!r} is not where it belongs; {SEG_LAYOUT}")
        stem, ext = PurePosixPath(parts[1]).stem, PurePosixPath(parts[1]).suffix.lower()
        if parts[0] == "masks" and ext != ".png":
            raise IngestError(
                f"mask {info.filename!r} is not a PNG; masks must be lossless PNGs of class indices (a JPEG would "
                "blur the class boundaries), so re-save it as PNG"
            )
        if ext not in _IMAGE_EXT:
            raise IngestError(f"entry {info.filename!r} is not a PNG/JPEG image; remove it from the archive")
        if stem in found[parts[0]]:
            raise IngestError(
                f"{parts[0]}/ holds two files named {stem!r} ({found[parts[0]][stem][0]!r} and {info.filename!r}); "
                "keep one"
            )
        found[parts[0]][stem] = (info.filename, info)
    imgs, msks = found["images"], found["masks"]
    if not imgs:
        raise IngestError(f"{filename!r} has no images in images/; {SEG_LAYOUT}")
    for a, b, what in ((imgs, msks, "has no mask in masks/"), (msks, imgs, "has no image in images/")):
        lone = sorted(set(a) - set(b))
        if lone:
            side = "image" if a is imgs else "mask"
            raise IngestError(
                f"{side} {a[lone[0]][0]!r} {what} with the same name ({len(lone)} unpaired: {preview(lone, 5)}); "
                "every image needs a mask named like it"
            )
    if len(imgs) < 2:
        raise IngestError(f"{filename!r} has {len(imgs)} image; a dataset needs at least 2")
    if len(imgs) > limits.max_samples:
        raise IngestError(
            f"{filename!r} has {len(imgs)} images, more than the limit of {limits.max_samples}; upload a subset"
        )
    stems = sorted(imgs)
    return [imgs[s] for s in stems], [msks[s] for s in stems], classes


def _read_classes(zf: zipfile.ZipFile, info: zipfile.ZipInfo) -> list[str]:
    if info.file_size > _MAX_CLASSES_TXT:
        raise IngestError(f"classes.txt is {info.file_size} bytes, more than {_MAX_CLASSES_TXT}; one name per line")
    try:
        text = zf.read(info).decode("utf-8")
    except UnicodeDecodeError as e:
        raise IngestError("classes.txt is not UTF-8 text; save it as UTF-8, one class name per line") from e
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(set(names)) != len(names):
        raise IngestError("classes.txt names a class more than once; give every class a distinct name")
    return names


def _decode_masks(
    zf: zipfile.ZipFile,
    masks: Sequence[tuple[str, zipfile.ZipInfo]],
    image_names: Sequence[str],
    size: tuple[int, ...],
    limits: IngestLimits,
) -> np.ndarray:
    """Every mask as class indices, (N, H, W) int32; each checked against its image's size before decoding."""
    h, w = int(size[0]), int(size[1])
    check_decoded_total(f"{len(masks)} masks of {w}×{h} need", 4 * len(masks) * h * w, limits, "upload fewer")
    out = np.empty((len(masks), h, w), dtype=np.int32)
    Image.MAX_IMAGE_PIXELS = limits.max_image_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        for i, ((name, info), image) in enumerate(zip(masks, image_names, strict=True)):
            im = _open_image(zf, info, name, limits)
            if im.format != "PNG":
                raise IngestError(f"mask {name!r} is {im.format}, not PNG; masks must be lossless PNGs")
            if im.size != (w, h):
                raise IngestError(
                    f"mask {name!r} is {im.size[0]}×{im.size[1]} but its image {image!r} is {w}×{h}; "
                    "a mask must have its image's size"
                )
            if im.mode not in _MASK_MODES:
                raise IngestError(
                    f"mask {name!r} has {im.mode} pixels; masks must be single-channel PNGs of class indices "
                    "(mode L or 16-bit) or palette PNGs (colours are not mapped to classes: save the class index "
                    "per pixel)"
                )
            check_expansion(f"mask {name!r}", info.file_size, w * h, limits, _STORE_AS_IS)
            try:
                out[i] = np.asarray(im, dtype=np.int64 if im.mode.startswith("I") else np.uint8)
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
                raise IngestError(f"mask {name!r} is too large to decode; downscale it") from e
            except MemoryError:
                raise
            except Exception as e:  # noqa: BLE001 - truncated/corrupt data from an untrusted upload
                raise IngestError(f"mask {name!r} cannot be decoded ({plain_reason(e)}); re-export it") from e
    return out


# ---------------------------------------------------------------------------------- .npz arrays


def from_npz_arrays(
    arrays: dict[str, np.ndarray], class_names: list[str] | None, limits: IngestLimits, ignore_index: int | None
) -> CanonicalDataset:
    """Canonical form of `x`/`y` (+ splits) where `y` holds (N, H, W) masks."""
    from app.ingest.npz import _check_split_shape, _images_to_uint8

    present = [(xk, yk) for _, xk, yk in SPLITS if xk in arrays]
    for split, xk, _ in (s for s in SPLITS if s[1] in arrays):
        _check_split_shape(split, xk, arrays[xk], arrays["x"])
    total = sum(len(arrays[xk]) for xk, _ in present)
    if total > limits.max_samples:
        raise IngestError(f"the dataset has {total} samples, more than the limit of {limits.max_samples}")
    xs = _images_to_uint8({xk: arrays[xk] for xk, _ in present}, limits)
    h, w = xs["x"].shape[2:]
    ys: dict[str, np.ndarray] = {}
    for xk, yk in present:
        y = arrays[yk]
        want = (len(xs[xk]), h, w)
        if y.ndim != 3 or tuple(y.shape) != want:
            raise IngestError(
                f"{yk} has shape {shape_text(y.shape)} but {xk} holds {want[0]} images of {w}×{h}; masks must be "
                f"(N, H, W) = {shape_text(want)}, one class index per pixel"
            )
        if y.dtype.kind not in "iu":
            raise IngestError(f"{yk} has dtype {y.dtype}; masks must hold integer class indices")
        ys[yk] = y
    return to_canonical(xs["x"], ys, class_names, ignore_index, x_val=xs.get("x_val"), x_test=xs.get("x_test"))


# ------------------------------------------------------------------------------------ masks → canonical


def _where(yk: str, index: int, names: dict[str, list[str]] | None) -> str:
    if names is not None and yk in names:
        return f"mask {names[yk][index]!r}"
    return f"{yk}[{index}]"


def to_canonical(
    x: np.ndarray,
    ys: dict[str, np.ndarray],
    class_names: list[str] | None,
    ignore_index: int | None,
    *,
    names: dict[str, list[str]] | None = None,
    x_val: np.ndarray | None = None,
    x_test: np.ndarray | None = None,
) -> CanonicalDataset:
    """Check masks' classes (every value in 0..K-1 or `ignore_index`), remap ignored pixels to IGNORE_LABEL
    and return the canonical dataset; K is len(class_names), else the largest class in any mask + 1."""
    if class_names is not None:
        check_class_names(class_names)
        if len(class_names) > MAX_SEG_CLASSES:
            raise IngestError(
                f"class_names has {len(class_names)} names; segmentation allows at most {MAX_SEG_CLASSES} classes"
            )
    k = len(class_names) if class_names is not None else None
    top = -1
    for yk, y in ys.items():
        valid = y != ignore_index if ignore_index is not None else np.ones(y.shape, dtype=bool)
        bad = valid & ((y < 0) | (y >= (k if k is not None else MAX_SEG_CLASSES)))
        if bad.any():
            i, r, c = (int(v) for v in np.argwhere(bad)[0])
            value = int(y[i, r, c])
            limit = f"0..{k - 1} (class_names has {k})" if k is not None else f"0..{MAX_SEG_CLASSES - 1}"
            hint = "" if ignore_index is not None else "; if it marks pixels to ignore, pass ignore_index"
            raise IngestError(f"{_where(yk, i, names)} has class {value} at row {r}, column {c}, outside {limit}{hint}")
        if valid.any():
            top = max(top, int(y[valid].max()))
    k = k if k is not None else top + 1
    train = ys["y"]
    present = np.unique(train[train != ignore_index] if ignore_index is not None else train)
    if len(present) < 2:
        raise IngestError(
            f"the training masks contain {len(present)} class(es) ({preview(present.tolist(), 5)}); "
            "segmentation needs at least 2 classes"
        )
    out = {}
    for yk, y in ys.items():
        m = y.astype(np.uint8) if k <= MAX_SEG_CLASSES else y  # every kept value is < k <= 255
        if ignore_index is not None:
            m = np.where(y == ignore_index, IGNORE_LABEL, m).astype(np.uint8)
        out[yk] = np.ascontiguousarray(m, dtype=np.uint8)
    return CanonicalDataset(
        kind="segmentation",
        x=x,
        y=out["y"],
        class_names=class_names if class_names is not None else [str(i) for i in range(k)],
        x_val=x_val,
        y_val=out.get("y_val"),
        x_test=x_test,
        y_test=out.get("y_test"),
    )
