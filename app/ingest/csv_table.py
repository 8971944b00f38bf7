"""`.csv` uploads: a header row, numeric feature columns and one label column, to canonical tabular form.

Rows are parsed in bounded chunks (line length, row count and float32 size capped while reading), so a
huge or malformed file is refused before it is held in memory.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

import numpy as np

from app.core.dataset_format import CanonicalDataset
from app.core.units import human_bytes
from app.ingest.checks import (
    IngestError,
    IngestLimits,
    check_class_count,
    check_decoded_total,
    check_labels,
    first_nonfinite,
    plain_reason,
    preview,
)

if TYPE_CHECKING:
    from _csv import Reader  # the type csv.reader returns; _csv has no such name at run time

_CHUNK_CELLS = 1_000_000  # feature cells parsed as Python strings before converting a chunk to float32


@dataclass(frozen=True)
class _Columns:
    header: list[str]
    label: int  # index of the label column
    features: list[int]  # indices of the feature columns

    @property
    def feature_names(self) -> list[str]:
        return [self.header[i] for i in self.features]


def read_csv(path: Path, filename: str, label_column: str, limits: IngestLimits) -> CanonicalDataset:
    """Validate the CSV at `path` and convert it to the canonical tabular form."""
    check_decoded_total(f"{filename!r} is", path.stat().st_size, limits, "upload a smaller file")
    with path.open("rb") as f:
        if b"\x00" in f.read(65_536):
            raise IngestError(f"{filename!r} is not text (it contains NUL bytes); upload a UTF-8 CSV file")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            x, labels = _parse_csv(f, filename, label_column, limits)
    except UnicodeDecodeError as e:
        raise IngestError(f"{filename!r} is not UTF-8 text ({plain_reason(e)}); save it as a UTF-8 encoded CSV") from e
    y, class_names = _csv_labels(labels)
    names = check_labels(y, {}, class_names)
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
        columns = _read_header(reader, filename, label_column, limits)
        chunks, labels = _read_rows(reader, columns, filename, label_column, limits)
    except csv.Error as e:
        raise IngestError(
            f"{filename!r} is not valid CSV near line {reader.line_num} ({plain_reason(e)}); fix the quoting"
        ) from e
    if not labels:
        raise IngestError(f"{filename!r} has a header but no data rows; add at least 2 samples per class")
    return np.concatenate(chunks), labels


def _read_header(reader: Reader, filename: str, label_column: str, limits: IngestLimits) -> _Columns:
    """The first non-blank row, checked: named, unique, within the column limit, holding the label column."""
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
        raise IngestError(f"the header repeats the column name(s) {preview(dups)}; column names must be unique")
    if label_column not in header:
        hint = ""
        if len(header) == 1 and (";" in header[0] or "\t" in header[0]):
            hint = " The file looks like it uses ';' or tabs as separators; save it with commas."
        raise IngestError(
            f"label column {label_column!r} not found; the columns present are {preview(header)}. "
            f"Rename the label column to {label_column!r} or pick one of these as the label column.{hint}"
        )
    label = header.index(label_column)
    features = [i for i in range(len(header)) if i != label]
    if not features:
        raise IngestError(f"{filename!r} has only the label column; add numeric feature columns")
    return _Columns(header, label, features)


def _read_rows(
    reader: Reader, columns: _Columns, filename: str, label_column: str, limits: IngestLimits
) -> tuple[list[np.ndarray], list[str]]:
    """float32 feature chunks and the label strings of every data row; rows and bytes are capped while reading."""
    chunks: list[np.ndarray] = []
    labels: list[str] = []
    rows: list[list[str]] = []
    lines: list[int] = []
    ncols = len(columns.header)
    chunk_rows = max(1, _CHUNK_CELLS // ncols)
    max_rows = min(limits.max_csv_rows, limits.max_samples)
    by_bytes = limits.max_uncompressed_bytes // (4 * len(columns.features))  # rows of float32 features
    for row in reader:
        if not any(cell.strip() for cell in row):
            continue  # blank line
        if len(labels) >= max_rows:
            raise IngestError(f"{filename!r} has more than {max_rows} data rows, the limit; upload a subset")
        if len(labels) >= by_bytes:
            raise IngestError(
                f"{filename!r} has more than {by_bytes} rows of {len(columns.features)} features, more than the "
                f"limit of {human_bytes(limits.max_uncompressed_bytes)} as float32; upload a subset"
            )
        line = reader.line_num
        if len(row) != ncols:
            raise IngestError(
                f"row {line} has {len(row)} field(s) but the header has {ncols} columns; make every row "
                "match the header (quote values that contain commas)"
            )
        label = row[columns.label].strip()
        if not label:
            raise IngestError(f"row {line} has an empty label (column {label_column!r}); give every row a label")
        labels.append(label)
        rows.append([row[i] for i in columns.features])
        lines.append(line)
        if len(rows) >= chunk_rows:
            chunks.append(_csv_chunk(rows, lines, columns.feature_names, label_column))
            rows, lines = [], []
    if rows:
        chunks.append(_csv_chunk(rows, lines, columns.feature_names, label_column))
    return chunks, labels


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
    if (at := first_nonfinite(values)) is not None:
        r, c = at
        raise IngestError(
            f"row {lines[r]}, column {feat_names[c]!r} holds {rows[r][c].strip()!r}; NaN and infinite values "
            "are not allowed, fill in or drop missing values"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        out = values.astype(np.float32)
    if (at := first_nonfinite(out)) is not None:
        r, c = at
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
        check_class_count(len(uniq_ints), "the label column holds")
        if uniq_ints == list(range(len(uniq_ints))):
            return np.array(ints, dtype=np.int64), [str(v) for v in uniq_ints]
        index = {v: i for i, v in enumerate(uniq_ints)}
        return np.array([index[v] for v in ints], dtype=np.int64), [str(v) for v in uniq_ints]
    uniq = sorted(set(labels))
    check_class_count(len(uniq), "the label column holds")
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
