"""Checks every upload format shares: limits, file signatures, zip directories, bombs, names and labels.

Everything here reads sizes, headers and names only; nothing is decompressed or decoded, so a hostile
file is refused before it costs memory.
"""

from __future__ import annotations

import re
import struct
import unicodedata
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from app.core.catalogue import MAX_CLASSES
from app.core.units import human_bytes

ZIP_MAGIC = b"PK\x03\x04"
EMPTY_ZIP_MAGIC = b"PK\x05\x06"
NPY_MAGIC = b"\x93NUMPY"
ACCEPTED_FORMATS = (
    ".npz (NumPy arrays `x` and `y`), .zip (one folder of PNG/JPEG images per class), "
    ".csv (numeric feature columns plus a label column), .jsonl or .csv with kind=text (a text and a label column)"
)
MAX_NAME_CHARS = 200  # the longest dataset or class name (the datasets.name column holds 200)
# Sizes up to this expand freely: the ratio guard is for what could cost memory, not for tiny entries.
RATIO_EXEMPT_BYTES = 2**20
# C0 and C1 controls (NUL included), DEL, and the bidirectional embeddings, overrides and isolates that can
# make a name display as something other than what it is ("gpj.exe" shown as "exe.jpg").
_FORBIDDEN_IN_NAMES = re.compile("[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
_OBJECT_REPR = re.compile(r"<[^<>]* at 0x[0-9A-Fa-f]+>")  # "<ast.Call object at 0x7fbd7b32d900>"


class IngestError(ValueError):
    """The uploaded file cannot be used; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class IngestLimits:
    max_samples: int = 2_000_000
    max_zip_entries: int = 200_000
    max_uncompressed_bytes: int = 8 * 2**30
    max_image_pixels: int = 4096 * 4096
    # Pixels on an image's longer side: images are stored at their own resolution, up to this.
    max_image_side: int = 1024
    max_csv_rows: int = 5_000_000
    max_csv_columns: int = 10_000
    max_csv_line_chars: int = 1 << 20
    # Text uploads (app.ingest.text_table): bytes of one line, read at most this many at a time.
    max_text_line_bytes: int = 1 << 20
    # 1-D signals (kind=signal): values per channel and channels per sample.
    max_signal_length: int = 1 << 20
    max_signal_channels: int = 1024
    # Decompressed/compressed size of anything over 1 MiB (zip entry, npz member, decoded image). Images
    # and real data barely compress, so a legitimate upload stays far below; a bomb reaches hundreds to millions.
    max_compression_ratio: float = 200.0


# ------------------------------------------------------------------------------------------ messages


def preview(items: Iterable[object], limit: int = 20) -> str:
    """`'a', 'b', ... (3 more)`: the first few items of a list, for a message."""
    items = list(items)
    text = ", ".join(repr(i) for i in items[:limit])
    if len(items) > limit:
        text += f", ... ({len(items) - limit} more)"
    return text


def plain_reason(e: BaseException, limit: int = 200) -> str:
    """A library's error text fit to show a person: no object addresses, never longer than `limit`."""
    text = _OBJECT_REPR.sub("an expression", str(e)) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _clip(name: str, limit: int = 40) -> str:
    return name if len(name) <= limit else name[:limit] + "…"


# ------------------------------------------------------------------------------------------- names


def check_name(value: str, what: str) -> None:
    """A dataset or class name is short and holds no control or bidirectional-override character."""
    if len(value) > MAX_NAME_CHARS:
        raise IngestError(
            f"{what} {_clip(value)!r} is {len(value)} characters long, more than the limit of {MAX_NAME_CHARS}; "
            "shorten it"
        )
    bad = _FORBIDDEN_IN_NAMES.search(value)
    if bad is None:
        return
    char = bad.group()
    code = f"U+{ord(char):04X}"
    if char == "\x00":
        kind = f"the NUL character ({code})"
    elif unicodedata.category(char) == "Cc":
        kind = f"the control character {code}"
    else:
        kind = f"{code} {unicodedata.name(char)}, a bidirectional control that can disguise how text reads"
    raise IngestError(f"{what} {_clip(value)!r} contains {kind}; remove it (names must be plain printable text)")


def check_class_count(k: int, how: str) -> None:
    """At most `MAX_CLASSES` classes; `how` says where the count came from."""
    if k > MAX_CLASSES:
        raise IngestError(
            f"{how} {k} classes, more than the limit of {MAX_CLASSES}; merge classes or upload a subset of them"
        )


def check_class_names(names: Sequence[str]) -> None:
    check_class_count(len(names), "the dataset names")
    for name in names:
        check_name(name, "class name")


# ------------------------------------------------------------------------------------- signatures


def check_magic(ext: str, head: bytes, filename: str) -> None:
    """The file's first bytes match its extension, with a hint for the usual mix-ups."""
    if ext in (".npz", ".zip"):
        if head.startswith(ZIP_MAGIC):
            return
        if head.startswith(NPY_MAGIC):
            raise IngestError(
                f"{filename!r} is a single .npy array, not a .npz archive; "
                "save images and labels together with np.savez(path, x=x, y=y)"
            )
        if head.startswith(EMPTY_ZIP_MAGIC):
            raise IngestError(f"{filename!r} is an empty zip archive; add the dataset files and upload again")
        what = "np.savez(path, x=x, y=y)" if ext == ".npz" else "a zip tool (one folder of images per class)"
        raise IngestError(
            f"{filename!r} is not a {ext} file (it does not start with the zip signature PK\\x03\\x04); "
            f"re-create it with {what}"
        )
    if head.startswith(ZIP_MAGIC):  # .csv
        raise IngestError(
            f"{filename!r} is a zip archive, not CSV text; upload it with a .zip (image folders) "
            "or .npz (NumPy arrays) extension"
        )
    if head.startswith(NPY_MAGIC):
        raise IngestError(f"{filename!r} is a NumPy .npy file, not CSV text; save x and y with np.savez as .npz")


# -------------------------------------------------------------------------------------------- bombs


def check_expansion(subject: str, packed: int, unpacked: int, limits: IngestLimits, fix: str) -> None:
    """Refuse `subject` if its `packed` bytes expand more than the ratio limit (sizes over 1 MiB only)."""
    if unpacked <= RATIO_EXEMPT_BYTES:
        return
    ratio = unpacked / max(packed, 1)
    if ratio > limits.max_compression_ratio:
        raise IngestError(
            f"{subject} expands {ratio:.0f}× ({human_bytes(packed)} to {human_bytes(unpacked)}), more than the "
            f"limit of {limits.max_compression_ratio:.0f}× (a compression bomb?); {fix}"
        )


def check_image_side(subject: str, w: int, h: int, limits: IngestLimits) -> None:
    """Refuse images over the stored-resolution limit on their longer side (documented: 1024 px by default)."""
    if max(w, h) > limits.max_image_side:
        raise IngestError(
            f"{subject} is {w}×{h} pixels, over the limit of {limits.max_image_side} pixels on the longer side "
            "(NORMBENCH_MAX_IMAGE_SIDE); downscale the images before uploading (a job can resize them further on "
            "the device with input.resize and input.crop)"
        )


def check_decoded_total(subject: str, total: int, limits: IngestLimits, fix: str) -> None:
    if total > limits.max_uncompressed_bytes:
        raise IngestError(
            f"{subject} {human_bytes(total)}, more than the limit of {human_bytes(limits.max_uncompressed_bytes)}; "
            f"{fix}"
        )


def check_zip_budget(infos: Sequence[zipfile.ZipInfo], filename: str, limits: IngestLimits) -> None:
    """Entry count, total unpacked size (from the directory), encryption and duplicate names."""
    if len(infos) > limits.max_zip_entries:
        raise IngestError(
            f"{filename!r} has {len(infos)} entries, more than the limit of {limits.max_zip_entries}; "
            "upload fewer files"
        )
    total = sum(info.file_size for info in infos)
    check_decoded_total(f"{filename!r} unpacks to", total, limits, "upload a smaller dataset")
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


def check_zip_layout(path: Path, zf: zipfile.ZipFile, filename: str) -> None:
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


def first_nonfinite(a: np.ndarray) -> tuple[int, ...] | None:
    """The index of the first NaN or infinite value of `a` (row-major), or None when every value is finite."""
    bad = ~np.isfinite(a)
    return tuple(int(i) for i in np.argwhere(bad)[0]) if bad.any() else None


def open_checked_zip(
    path: Path, filename: str, limits: IngestLimits, fix: str
) -> tuple[zipfile.ZipFile, list[zipfile.ZipInfo]]:
    """An uploaded zip, open, and its directory, checked before any member is read: the entry budget, the layout
    and the compression ratio (`fix` says what to do about a high one). The caller closes it."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise IngestError(f"{filename!r} is not a readable zip archive ({plain_reason(e)}); re-create it") from e
    try:
        infos = zf.infolist()
        check_zip_budget(infos, filename, limits)
        check_zip_layout(path, zf, filename)
        check_zip_ratio(infos, filename, limits, fix)
    except BaseException:
        zf.close()
        raise
    return zf, infos


def check_zip_ratio(infos: Sequence[zipfile.ZipInfo], filename: str, limits: IngestLimits, fix: str) -> None:
    """Every entry's expansion, from the directory's sizes, before anything is decompressed."""
    for info in infos:
        check_expansion(f"entry {info.filename!r} in {filename!r}", info.compress_size, info.file_size, limits, fix)


# ------------------------------------------------------------------------------------------- labels


def check_labels(y: np.ndarray, splits: dict[str, np.ndarray], class_names: list[str] | None) -> list[str]:
    """Validate int64 training labels (+ split labels); return the class names."""
    top = int(y.max())
    if class_names is not None:
        check_class_names(class_names)
        k = len(class_names)
        if top >= k:
            raise IngestError(
                f"y contains label {top} but class_names has only {k} name(s) (labels 0..{k - 1}); "
                "add the missing names or fix the labels"
            )
    else:
        k = top + 1
        check_class_count(k, f"the largest label is {top}, so the labels define")
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


def display_name(kind: str, name: str | None, filename: str) -> str:
    """The name the user gave an upload, else its file's name; checked as `check_name` does (IngestError)."""
    if name:
        what, value = f"{kind} name", name
    else:
        what = f"{kind} name (taken from the file name; rename the file or pass `name`)"
        value = Path(filename).name[:200]
    check_name(value, what)
    return value
