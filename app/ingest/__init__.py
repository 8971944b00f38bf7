"""Upload parsers: validate a user's `.npz`, `.zip` of class folders or `.csv` and convert it to the canonical form.

One module per format (`npz`, `image_zip`, `csv_table`) and the checks they share (`checks`); the canonical
form itself is `app.core.dataset_format`. Every user-facing problem raises `IngestError` with a message that
says what is wrong and how to fix it. Standard library, NumPy and Pillow only.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from app.core.dataset_format import CanonicalDataset
from app.ingest.checks import ACCEPTED_FORMATS, IngestError, IngestLimits, check_magic
from app.ingest.csv_table import read_csv
from app.ingest.image_zip import read_image_zip
from app.ingest.npz import read_npz
from app.ingest.segmentation import is_segmentation_zip, read_segmentation_zip
from app.ingest.text_table import DEFAULT_MAX_LENGTH, read_text

__all__ = ["ACCEPTED_FORMATS", "IngestError", "IngestLimits", "ingest_file"]


def ingest_file(
    path: Path,
    filename: str,
    *,
    label_column: str = "label",
    text_column: str = "text",
    max_length: int = DEFAULT_MAX_LENGTH,
    limits: IngestLimits = IngestLimits(),
    kind: str | None = None,
    ignore_index: int | None = None,
) -> CanonicalDataset:
    """Validate the upload at `path` (named `filename` by the user) and return its canonical form. `kind`:
    what the uploader says the samples are (`signal` is only ever stated: an .npz's (N, C, L) array would
    otherwise be grayscale images); None lets the format and x's rank decide (a zip with images/ and masks/
    folders, or an .npz whose y is (N, H, W), is segmentation). `ignore_index`: segmentation masks' value
    for pixels that count for nothing."""
    path = Path(path)
    ext = PurePosixPath(filename.replace("\\", "/")).suffix.lower()
    if ext not in (".npz", ".zip", ".csv", ".jsonl"):
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
        check_magic(ext, f.read(8), filename)
    if ext == ".jsonl" or kind == "text":  # text classification: `text_column` and `label_column`, byte tokens
        if ext not in (".csv", ".jsonl") or kind not in (None, "text"):
            raise IngestError(
                f"kind=text needs a .csv or .jsonl upload with a text and a label column; {filename!r} is {ext}"
                + ("" if kind in (None, "text") else f" with kind={kind}")
            )
        return read_text(
            path,
            filename,
            jsonl=ext == ".jsonl",
            text_column=text_column,
            label_column=label_column,
            max_length=max_length,
            limits=limits,
        )
    if kind == "signal" and ext != ".npz":
        raise IngestError(
            f"kind=signal needs a .npz upload with x of shape (N, L) or (N, C, L) and labels y; {filename!r} is {ext}"
        )
    if ext == ".csv" and (kind == "segmentation" or ignore_index is not None):
        raise IngestError(
            "segmentation needs images with masks: a .zip with images/ and masks/ folders or a .npz with "
            f"x (N, H, W[, C]) and y (N, H, W); {filename!r} is .csv"
        )
    if ignore_index is not None and kind not in (None, "segmentation"):
        raise IngestError(f"ignore_index applies to segmentation masks only, not kind={kind}; remove it")
    if ext == ".npz":
        return read_npz(path, filename, limits, kind, ignore_index)
    if ext == ".zip":
        if kind == "segmentation" or (kind is None and is_segmentation_zip(path)):
            return read_segmentation_zip(path, filename, limits, ignore_index)
        if ignore_index is not None:
            raise IngestError(f"ignore_index applies to segmentation masks; {filename!r} has no images/ and masks/")
        return read_image_zip(path, filename, limits)
    return read_csv(path, filename, label_column, limits)
