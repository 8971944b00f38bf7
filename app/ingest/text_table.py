"""Text-classification uploads (`.csv` with `kind=text`, or `.jsonl`) to canonical `text`: byte-level tokens.

Each text becomes its UTF-8 bytes, byte b as token b + 1 (`TEXT_PAD` = 0 pads; vocabulary `TEXT_VOCAB` = 257), so
no tokenizer is downloaded and every language round-trips. Texts longer than `max_length` bytes are cut there
(the dataset's summary counts them); the stored array is N × (the longest kept text), padded with `TEXT_PAD`,
which never occurs inside a text, so a sample's length is its count of non-PAD tokens.

The file is read as bytes, one bounded line at a time (`IngestLimits.max_text_line_bytes`): a huge single line is
refused after reading that many bytes, never held whole; invalid UTF-8 is refused with its line number.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from app.core.dataset_format import TEXT_PAD, TEXT_VOCAB, CanonicalDataset
from app.core.units import human_bytes
from app.ingest.checks import IngestError, IngestLimits, check_labels, plain_reason, preview
from app.ingest.csv_table import _csv_labels

DEFAULT_MAX_LENGTH = 256
MIN_MAX_LENGTH, MAX_MAX_LENGTH = 8, 4096
_CHUNK_ROWS = 4096
_BOM = b"\xef\xbb\xbf"


@dataclass
class _Tokens:
    """Token rows gathered in fixed-size chunks (N × max_length uint16 at most), with the summary's counts."""

    max_length: int
    chunks: list[np.ndarray] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    truncated: int = 0
    longest_bytes: int = 0

    def add(self, text: str, label: str) -> None:
        raw = text.encode("utf-8")
        self.longest_bytes = max(self.longest_bytes, len(raw))
        if len(raw) > self.max_length:
            self.truncated += 1
            raw = raw[: self.max_length]
        row = len(self.labels) % _CHUNK_ROWS
        if row == 0:
            self.chunks.append(np.full((_CHUNK_ROWS, self.max_length), TEXT_PAD, dtype=np.uint16))
        self.chunks[-1][row, : len(raw)] = np.frombuffer(raw, dtype=np.uint8).astype(np.uint16) + 1
        self.labels.append(label)
        self.lengths.append(len(raw))

    def array(self) -> np.ndarray:
        """N × (longest kept text) tokens."""
        width = max(self.lengths)
        return np.concatenate(self.chunks)[: len(self.labels), :width].copy()


def check_max_length(max_length: int) -> None:
    if not MIN_MAX_LENGTH <= max_length <= MAX_MAX_LENGTH:
        raise IngestError(
            f"max_length {max_length} is outside {MIN_MAX_LENGTH}..{MAX_MAX_LENGTH} tokens (UTF-8 bytes); pick a "
            "length in that range (longer texts are truncated to it)"
        )


def read_text(
    path: Path,
    filename: str,
    *,
    jsonl: bool,
    text_column: str,
    label_column: str,
    max_length: int,
    limits: IngestLimits,
) -> CanonicalDataset:
    """Validate the CSV or JSONL text-classification file at `path` and tokenize it."""
    check_max_length(max_length)
    if text_column == label_column:
        raise IngestError(f"text_column and label_column are both {text_column!r}; name two different columns")
    tokens = _Tokens(max_length)
    max_rows = min(limits.max_csv_rows, limits.max_samples, limits.max_uncompressed_bytes // (2 * max_length))
    with path.open("rb") as f:
        lines = _decoded_lines(f, filename, limits.max_text_line_bytes)
        if jsonl:
            _read_jsonl(lines, filename, text_column, label_column, tokens, max_rows)
        else:
            _read_csv(lines, filename, text_column, label_column, tokens, max_rows)
    if not tokens.labels:
        raise IngestError(f"{filename!r} has no samples; add at least 2 texts per class")
    y, class_names = _csv_labels(tokens.labels)
    names = check_labels(y, {}, class_names)
    ds = CanonicalDataset(kind="text", x=tokens.array(), y=y, class_names=names)
    lengths = np.asarray(tokens.lengths)
    ds.summary = {
        "tokens": f"UTF-8 bytes: byte b is token b+1, {TEXT_PAD} pads; vocabulary {TEXT_VOCAB}",
        "pad_id": TEXT_PAD,
        "vocab_size": TEXT_VOCAB,
        "max_length": max_length,
        "stored_length": int(ds.x.shape[1]),
        "truncated_texts": tokens.truncated,
        "longest_text_bytes": tokens.longest_bytes,
        "mean_tokens": round(float(lengths.mean()), 2),
        "text_column": text_column,
        "label_column": label_column,
    }
    return ds


def _decoded_lines(f: IO[bytes], filename: str, limit: int) -> Iterator[str]:
    """The file's lines as text, each at most `limit` bytes (refused once that many are read without a line
    end), checked as UTF-8 with the line's number in the message."""
    number = 0
    while line := f.readline(limit + 1):
        number += 1
        if len(line) > limit and not line.endswith(b"\n"):
            raise IngestError(
                f"line {number} of {filename!r} is longer than {human_bytes(limit)}, the limit for one line; put "
                "one sample per line (check the line endings) and shorten very long texts"
            )
        if number == 1 and line.startswith(_BOM):
            line = line[len(_BOM) :]
        if b"\x00" in line:
            raise IngestError(f"line {number} of {filename!r} contains a NUL byte; upload UTF-8 text")
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise IngestError(
                f"line {number} of {filename!r} is not valid UTF-8 (byte {e.start + 1} of the line: {e.reason}); "
                "save the file as UTF-8"
            ) from None


def _read_jsonl(
    lines: Iterator[str], filename: str, text_column: str, label_column: str, tokens: _Tokens, max_rows: int
) -> None:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if len(tokens.labels) >= max_rows:
            raise IngestError(f"{filename!r} has more than {max_rows} samples, the limit; upload a subset")
        try:
            obj: Any = json.loads(line)
        except json.JSONDecodeError as e:
            raise IngestError(
                f"line {number} of {filename!r} is not valid JSON ({plain_reason(e)}); write one JSON object per line"
            ) from None
        if not isinstance(obj, dict):
            raise IngestError(
                f"line {number} of {filename!r} is a JSON {type(obj).__name__}, not an object; write one object "
                f'per line, e.g. {{"{text_column}": "...", "{label_column}": "..."}}'
            )
        for key in (text_column, label_column):
            if key not in obj:
                raise IngestError(
                    f"line {number} has no {key!r} key; its keys are {preview(obj)}. Name the keys "
                    f"{text_column!r} and {label_column!r}, or pass text_column/label_column"
                )
        text, label = obj[text_column], obj[label_column]
        if not isinstance(text, str):
            raise IngestError(f"line {number}: {text_column!r} is a JSON {type(text).__name__}; it must be a string")
        if isinstance(label, bool) or not isinstance(label, str | int):
            raise IngestError(
                f"line {number}: {label_column!r} is {json.dumps(label)[:40]}; a label must be a string or an integer"
            )
        _add(tokens, text, str(label).strip(), f"line {number}", text_column, label_column)


def _read_csv(
    lines: Iterator[str], filename: str, text_column: str, label_column: str, tokens: _Tokens, max_rows: int
) -> None:
    reader = csv.reader(lines)
    try:
        header = next((row for row in reader if any(c.strip() for c in row)), None)
        if header is None:
            raise IngestError(
                f"{filename!r} has no rows; the first row must name the columns {text_column!r} and {label_column!r}"
            )
        header = [c.strip() for c in header]
        missing = [c for c in (text_column, label_column) if c not in header]
        if missing:
            raise IngestError(
                f"column(s) {preview(missing)} not found; the header has {preview(header)}. Name the text and label "
                "columns so, or pass text_column/label_column"
            )
        t, lab = header.index(text_column), header.index(label_column)
        for row in reader:
            if not any(c.strip() for c in row):
                continue
            if len(tokens.labels) >= max_rows:
                raise IngestError(f"{filename!r} has more than {max_rows} data rows, the limit; upload a subset")
            if len(row) != len(header):
                raise IngestError(
                    f"row {reader.line_num} has {len(row)} field(s) but the header has {len(header)} columns; quote "
                    "texts that contain commas, quotes or line breaks"
                )
            _add(tokens, row[t], row[lab].strip(), f"row {reader.line_num}", text_column, label_column)
    except csv.Error as e:
        raise IngestError(
            f"{filename!r} is not valid CSV near line {reader.line_num} ({plain_reason(e)}); fix the quoting, or "
            "shorten texts over 131,072 characters"
        ) from None


def _add(tokens: _Tokens, text: str, label: str, where: str, text_column: str, label_column: str) -> None:
    if not text.strip():
        raise IngestError(f"{where} has an empty text ({text_column!r}); drop it or give it a text")
    if not label:
        raise IngestError(f"{where} has an empty label ({label_column!r}); give every sample a label")
    tokens.add(text, label)
