"""`.zip` uploads: one folder of PNG/JPEG images per class (optionally inside one top folder) to canonical form.

Nothing is extracted to disk; entries are checked from the zip directory, and each image's decoded size
is counted from its header before its pixels are decoded.
"""

from __future__ import annotations

import io
import re
import stat
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from app.core.dataset_format import CanonicalDataset
from app.ingest.checks import (
    IngestError,
    IngestLimits,
    check_class_count,
    check_class_names,
    check_decoded_total,
    check_expansion,
    check_image_side,
    check_labels,
    open_checked_zip,
    plain_reason,
    preview,
)

_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
# Decoders Pillow may try. Its JPEG opener reports multi-picture JPEGs (written by many cameras) as
# "MPO"; their first frame is a plain JPEG, so that name is accepted too.
_IMAGE_FORMATS = ("PNG", "JPEG")
_ACCEPTED_IMAGE_FORMATS = ("PNG", "JPEG", "MPO")
_ARCHIVE_EXTENSIONS = (".zip", ".npz", ".tar", ".tgz", ".gz", ".bz2", ".xz", ".7z", ".rar", ".zst", ".jar")
_LAYOUT = "expected one folder per class, e.g. cats/1.png and dogs/1.png (optionally inside one top folder)"
_STORE_AS_IS = "PNG/JPEG images barely compress, so store them as they are"
_GRAY_MODES = ("L", "1", "LA", "La")  # plus every 16/32-bit integer mode ("I", "I;16", ...)

Entry = tuple[str, int, zipfile.ZipInfo]  # (name in the archive, label, directory entry)


def read_image_zip(path: Path, filename: str, limits: IngestLimits) -> CanonicalDataset:
    """Validate the zip of class folders at `path` and convert it to the canonical form."""
    zf, infos = open_checked_zip(path, filename, limits, _STORE_AS_IS)
    with zf:
        class_names, entries = _class_entries(infos, filename, limits)
        x = _decode_images(zf, entries, limits)
    y = np.array([label for _, label, _ in entries], dtype=np.int64)
    names = check_labels(y, {}, class_names)
    return CanonicalDataset(kind="image", x=x, y=y, class_names=names)


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


def _image_files(infos: Sequence[zipfile.ZipInfo], filename: str) -> list[tuple[list[str], zipfile.ZipInfo]]:
    """(path components, entry) of every image; folders and macOS/hidden files are skipped, anything else refused."""
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
    if not files:
        raise IngestError(f"{filename!r} contains no PNG/JPEG images; {_LAYOUT}")
    return files


def _class_entries(
    infos: Sequence[zipfile.ZipInfo], filename: str, limits: IngestLimits
) -> tuple[list[str], list[Entry]]:
    """Class names (sorted folder names) and the images in label order, checked before any is decoded."""
    files = _image_files(infos, filename)
    firsts = {parts[0] for parts, _ in files}
    if len(firsts) == 1 and all(len(parts) >= 3 for parts, _ in files):
        files = [(parts[1:], info) for parts, info in files]
    by_class: dict[str, list[tuple[str, zipfile.ZipInfo]]] = {}
    for parts, info in files:
        if len(parts) != 2:
            where = "is not inside a class folder" if len(parts) < 2 else "is nested too deeply"
            raise IngestError(f"image {info.filename!r} {where}; {_LAYOUT}")
        by_class.setdefault(parts[0], []).append((info.filename, info))
    class_names = sorted(by_class)
    if len(class_names) < 2:
        raise IngestError(
            f"found {len(class_names)} class folder ({preview(class_names)}); classification needs "
            f"at least 2 class folders; {_LAYOUT}"
        )
    check_class_count(len(class_names), f"{filename!r} has class folders for")
    check_class_names(class_names)
    for cls in class_names:
        if len(by_class[cls]) < 2:
            raise IngestError(f"class folder {cls!r} has only {len(by_class[cls])} image; every class needs at least 2")
    entries = [
        (name, label, info)
        for label, cls in enumerate(class_names)
        for name, info in sorted(by_class[cls], key=lambda t: t[0])
    ]
    if len(entries) > limits.max_samples:
        raise IngestError(
            f"{filename!r} has {len(entries)} images, more than the limit of {limits.max_samples}; upload a subset"
        )
    return class_names, entries


@dataclass
class _Canvas:
    """The canonical (N, C, H, W) uint8 array being filled: grayscale until the first colour image."""

    n: int
    h: int
    w: int
    limits: IngestLimits
    pixels: np.ndarray | None = None

    def make_room(self, i: int, gray: bool) -> None:
        """Before image `i` is decoded: allocate (or widen to colour) the array, within the decoded-size limit."""
        channels = 1 if gray else 3
        if self.pixels is not None and self.pixels.shape[1] >= channels:
            return
        check_decoded_total(
            f"{self.n} images of {self.w}×{self.h} with {channels} channel(s) need",
            self.n * channels * self.h * self.w,
            self.limits,
            "downscale the images or upload fewer",
        )
        wider = np.empty((self.n, channels, self.h, self.w), dtype=np.uint8)
        if self.pixels is not None:
            wider[:i] = self.pixels[:i]  # replicate earlier grayscale images into every channel
        self.pixels = wider

    def put(self, i: int, arr: np.ndarray, gray: bool) -> None:
        assert self.pixels is not None
        if gray:
            self.pixels[i] = arr  # broadcasts over the channels
        else:
            self.pixels[i] = arr.transpose(2, 0, 1)


def _decode_images(zf: zipfile.ZipFile, entries: Sequence[Entry], limits: IngestLimits) -> np.ndarray:
    """Decode every image into one (N, C, H, W) uint8 array; each image's size is checked from its header first."""
    canvas: _Canvas | None = None
    ref = ""  # the first image, which every other must match in size
    Image.MAX_IMAGE_PIXELS = limits.max_image_pixels
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        for i, (name, _, info) in enumerate(entries):
            im = _open_image(zf, info, name, limits)
            w, h = im.size
            if canvas is None:
                canvas, ref = _Canvas(len(entries), h, w, limits), name
            elif (w, h) != (canvas.w, canvas.h):
                raise IngestError(
                    f"image {name!r} is {w}×{h} but {ref!r} is {canvas.w}×{canvas.h}; all images must have "
                    "the same size, so resize them before uploading"
                )
            gray = im.mode in _GRAY_MODES or im.mode.startswith("I")
            # Its decoded pixels against its own file size: a small PNG of one flat colour is a pixel bomb.
            check_expansion(f"image {name!r}", info.file_size, w * h * (1 if gray else 3), limits, _STORE_AS_IS)
            check_image_side(f"image {name!r}", w, h, limits)
            canvas.make_room(i, gray)
            canvas.put(i, _image_pixels(im, name), gray)
    assert canvas is not None and canvas.pixels is not None
    return canvas.pixels


def _open_image(zf: zipfile.ZipFile, info: zipfile.ZipInfo, name: str, limits: IngestLimits) -> Image.Image:
    """The image's header (size, mode, format) checked; its pixels are not decoded yet."""
    try:
        with zf.open(info) as f:
            data = f.read(info.file_size + 1)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, NotImplementedError, RuntimeError) as e:
        raise IngestError(
            f"entry {name!r} cannot be read from the zip ({plain_reason(e)}); re-create the archive"
        ) from e
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
        raise IngestError(
            f"image {name!r} is not a valid PNG/JPEG file ({plain_reason(e)}); re-export or remove it"
        ) from e
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


def _image_pixels(im: Image.Image, name: str) -> np.ndarray:
    """Decode to (H, W) uint8 for grayscale images or (H, W, 3) uint8 for everything else."""
    try:
        im.load()
        mode = im.mode
        if mode == "L":
            return np.asarray(im, dtype=np.uint8)
        if mode in ("1", "LA", "La"):
            return np.asarray(im.convert("L"), dtype=np.uint8)
        if mode.startswith("I"):  # 16-bit grayscale PNG ("I;16", "I")
            wide = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
            return ((wide * 255 + 32767) // 65535).astype(np.uint8)
        if mode != "RGB":
            im = im.convert("RGB")
        return np.asarray(im, dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise IngestError(f"image {name!r} is too large to decode; downscale it before uploading") from e
    except MemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - truncated/corrupt data from an untrusted upload
        raise IngestError(
            f"image {name!r} is broken and cannot be decoded ({plain_reason(e)}); re-export or remove it"
        ) from e
