"""Uploaded weights: a bounded, streaming check of a safetensors file (never a pickle) and its match against an
architecture's manifest. Reads the header and then the data in small chunks: no tensor is loaded whole.

The format (https://huggingface.co/docs/safetensors): 8 bytes little-endian header length N, N bytes of JSON
`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`, then the data, whose
offsets (relative to the end of the header) must cover it exactly: contiguous, no overlap, no hole.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from app.core.arch_manifests import ArchManifest

# The format caps the header at 100 MB; ours is far lower: a ResNet-50 header is about 30 KB.
MAX_HEADER_BYTES = 8 * 2**20
MAX_TENSORS = 20_000
MAX_NAME_CHARS = 1_000
SHOWN = 8  # names listed per kind of mismatch; the counts say how many there are in all
READ_CHUNK = 4 * 2**20
SAVE_HINT = (
    "save the state dict with safetensors: `from safetensors.torch import save_file; "
    "save_file(model.state_dict(), 'weights.safetensors')`"
)
# Every dtype name of the format, with its size in bytes.
DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
    "C64": 8,
}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")  # what a trained parameter or statistic may be stored as
INT_DTYPES = ("I64", "I32", "U8", "I8", "I16", "U16", "U32", "U64")  # num_batches_tracked
NUMPY_FLOATS = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}


class WeightsFileError(Exception):
    """The upload is not weights we accept; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class TensorEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int  # file offset of the first data byte (8 + header length)


@dataclass(frozen=True)
class WeightsSummary:
    """What an upload holds, recorded with it so a job can say what was transferred."""

    tensor_count: int
    parameter_count: int  # elements of the trainable tensors (running statistics left out)
    dtypes: list[str]
    has_bn_stats: bool  # every BatchNorm layer's running mean and variance
    has_gn_weights: bool  # norm affine weights without running statistics on a BatchNorm network: GroupNorm-trained
    head_classes: int | None  # the classifier's output size; None when the head was left out


def sniff_format(first: bytes) -> None:
    """Refuse, by their first bytes, the formats people send instead of safetensors."""
    if first.startswith(b"PK\x03\x04"):
        raise WeightsFileError(
            "this is a zip archive, as torch.save writes (a pickle inside); pickles can run code when loaded, "
            "so they are never accepted: " + SAVE_HINT
        )
    if first[:1] == b"\x80" and first[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        raise WeightsFileError(
            "this is a Python pickle (torch.save's legacy format, .pt/.pth/.bin); pickles can run code when "
            "loaded, so they are never accepted: " + SAVE_HINT
        )
    if first.startswith(b"\x93NUMPY"):
        raise WeightsFileError("this is a NumPy .npy file, not safetensors: " + SAVE_HINT)


def read_header(f: BinaryIO, file_size: int, *, max_header_bytes: int = MAX_HEADER_BYTES) -> SafetensorsHeader:
    """Parse and check the header of the safetensors file `f` (positioned anywhere) of `file_size` bytes,
    reading at most 8 + `max_header_bytes` bytes."""
    f.seek(0)
    first = f.read(8)
    if len(first) < 8:
        raise WeightsFileError(f"the file has {file_size} bytes, too short for a safetensors file; " + SAVE_HINT)
    sniff_format(first)
    (n,) = struct.unpack("<Q", first)
    if n > max_header_bytes:
        raise WeightsFileError(
            f"not a safetensors file: its first 8 bytes give a header of {n} bytes, over the limit of "
            f"{max_header_bytes} (a real header is a few KB to a few MB); " + SAVE_HINT
        )
    if 8 + n > file_size:
        raise WeightsFileError(
            f"the file is truncated or not safetensors: its header claims {n} bytes but the file has only "
            f"{file_size - 8} after the length; upload the complete file"
        )
    raw = f.read(n)
    if not raw.startswith(b"{"):
        raise WeightsFileError("not a safetensors file: the header is not a JSON object; " + SAVE_HINT)
    try:
        parsed = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise WeightsFileError(f"not a safetensors file: the header is not valid JSON ({e}); " + SAVE_HINT) from None
    if not isinstance(parsed, dict):
        raise WeightsFileError("not a safetensors file: the header is not a JSON object; " + SAVE_HINT)
    data_start = 8 + n
    metadata = _metadata(parsed.pop("__metadata__", {}))
    if len(parsed) > MAX_TENSORS:
        raise WeightsFileError(f"the header lists {len(parsed)} tensors; the limit is {MAX_TENSORS}")
    tensors = {name: _entry(name, value) for name, value in parsed.items()}
    _check_layout(tensors, file_size - data_start)
    return SafetensorsHeader(tensors=tensors, metadata=metadata, data_start=data_start)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the name {key[:200]!r} appears twice")
        out[key] = value
    return out


def _metadata(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise WeightsFileError("invalid safetensors header: `__metadata__` must map strings to strings")
    return value


def _entry(name: str, value: Any) -> TensorEntry:
    where = f"invalid safetensors header: tensor {name[:200]!r}"
    if not name or len(name) > MAX_NAME_CHARS:
        raise WeightsFileError(
            f"invalid safetensors header: a tensor name is empty or over {MAX_NAME_CHARS} characters"
        )
    if not isinstance(value, dict) or set(value) != {"dtype", "shape", "data_offsets"}:
        raise WeightsFileError(f"{where} must have exactly `dtype`, `shape` and `data_offsets`")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if dtype not in DTYPE_BYTES:
        raise WeightsFileError(f"{where} has the unknown dtype {str(dtype)[:40]!r}; known: {', '.join(DTYPE_BYTES)}")
    if not isinstance(shape, list) or len(shape) > 8 or not all(_is_count(d) for d in shape):
        raise WeightsFileError(f"{where} has an invalid shape (a list of at most 8 non-negative integers)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise WeightsFileError(f"{where} has invalid `data_offsets` (two non-negative integers)")
    begin, end = offsets
    expected = math.prod(shape) * DTYPE_BYTES[dtype]
    if end - begin != expected:
        raise WeightsFileError(
            f"{where} spans bytes {begin}..{end} ({end - begin} bytes) but {dtype} {shape} needs {expected}"
        )
    return TensorEntry(name=name, dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63


def _check_layout(tensors: dict[str, TensorEntry], data_bytes: int) -> None:
    """The tensors' bytes, in offset order, must tile the data exactly: from 0, each starting where the last
    ended, the last ending at the end of the file."""
    position = 0
    for t in sorted(tensors.values(), key=lambda t: (t.begin, t.end)):
        if t.begin < position:
            raise WeightsFileError(
                f"invalid safetensors file: tensor {t.name[:200]!r} (bytes {t.begin}..{t.end}) overlaps the one "
                "before it"
            )
        if t.begin > position:
            raise WeightsFileError(
                f"invalid safetensors file: bytes {position}..{t.begin} of the data belong to no tensor "
                f"(before {t.name[:200]!r})"
            )
        position = t.end
        if position > data_bytes:
            raise WeightsFileError(
                f"the file is truncated or its header lies: tensor {t.name[:200]!r} ends at data byte {t.end} but "
                f"the file holds {data_bytes} bytes of data; upload the complete file"
            )
    if position != data_bytes:
        raise WeightsFileError(
            f"invalid safetensors file: its tensors cover {position} bytes of data but the file holds {data_bytes} "
            "(trailing bytes after the last tensor)"
        )


def check_finite(f: BinaryIO, header: SafetensorsHeader) -> None:
    """Every floating-point value is finite: a NaN or inf in a pretrained weight would only surface as a
    diverged run. Reads the data once, a chunk at a time."""
    for t in sorted(header.tensors.values(), key=lambda t: t.begin):
        if t.dtype not in FLOAT_DTYPES or t.begin == t.end:
            continue
        for chunk in _chunks(f, header.data_start + t.begin, t.end - t.begin, DTYPE_BYTES[t.dtype]):
            if t.dtype == "BF16":
                bits = np.frombuffer(chunk, dtype="<u2")
                bad = bool(((bits & 0x7F80) == 0x7F80).any())  # exponent all ones: inf or NaN
            else:
                bad = not bool(np.isfinite(np.frombuffer(chunk, dtype=NUMPY_FLOATS[t.dtype])).all())
            if bad:
                raise WeightsFileError(f"tensor {t.name[:200]!r} holds NaN or infinite values; upload finite weights")


def _chunks(f: BinaryIO, start: int, length: int, itemsize: int) -> Iterator[bytes]:
    f.seek(start)
    step = READ_CHUNK - READ_CHUNK % itemsize
    left = length
    while left:
        chunk = f.read(min(step, left))
        if not chunk:
            raise WeightsFileError("the file ended before its last tensor; upload the complete file")
        left -= len(chunk)
        yield chunk


def match_manifest(header: SafetensorsHeader, m: ArchManifest) -> WeightsSummary:
    """Check the upload against the architecture: every backbone parameter and norm weight present with its
    shape, no unknown names, BatchNorm statistics all present or all absent, the head free in its number of
    classes (it is re-initialised for the dataset's). Lists what does not match."""
    got = header.tensors
    missing = [k for k in m.keys("param", "norm") if k not in got]
    unexpected = [k for k in got if k not in m.tensors]
    wrong_shape, wrong_dtype = [], []
    for name, t in got.items():
        spec = m.tensors.get(name)
        if spec is None:
            continue
        allowed = INT_DTYPES if spec.dtype == "I64" else FLOAT_DTYPES
        if t.dtype not in allowed:
            wrong_dtype.append(f"{name}: {t.dtype}, expected one of {'/'.join(allowed)}")
        expected = spec.shape
        if spec.role == "head":  # any number of classes; the rest of the shape is the network's
            ok = len(t.shape) == len(expected) and t.shape[1:] == expected[1:]
            shown = "[K" + "".join(f", {d}" for d in expected[1:]) + "]"
        else:
            ok = t.shape == expected
            shown = str(list(expected))
        if not ok:
            wrong_shape.append(f"{name}: {list(t.shape)}, expected {shown}")
    head = [got[k] for k in m.head if k in got]
    head_classes = {t.shape[0] for t in head if t.shape}
    if len(head_classes) > 1:
        wrong_shape.append(f"{', '.join(m.head)}: the head's weight and bias disagree on the number of classes")
    stats = m.keys("stat")
    moments = [k for k in stats if not k.endswith(".num_batches_tracked")]  # the counter is optional
    present = [k for k in moments if k in got]
    if present and len(present) < len(moments):
        missing += [k for k in moments if k not in got]  # some BatchNorm statistics but not all
    problems = _listed("missing", missing) + _listed("unexpected", unexpected)
    problems += _listed("with the wrong shape", wrong_shape) + _listed("with the wrong dtype", wrong_dtype)
    if problems:
        hint = _hint(unexpected, m)
        raise WeightsFileError(
            f"the weights do not match torchvision's {m.arch} ({len(m.tensors)} state-dict entries, "
            f"{m.source.split(': ')[-1]}): " + "; ".join(problems) + ". " + hint
        )
    return WeightsSummary(
        tensor_count=len(got),
        parameter_count=sum(t.numel for name, t in got.items() if m.tensors[name].role != "stat"),
        dtypes=sorted({t.dtype for t in got.values()}),
        has_bn_stats=bool(moments) and len(present) == len(moments),
        has_gn_weights=m.has_batch_norm and not present,
        head_classes=head_classes.pop() if len(head) == len(m.head) and head_classes else None,
    )


def _listed(what: str, names: list[str]) -> list[str]:
    if not names:
        return []
    shown = ", ".join(n[:200] for n in names[:SHOWN])
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return [f"{len(names)} {what} ({shown}{more})"]


def _hint(unexpected: list[str], m: ArchManifest) -> str:
    if unexpected and all(k.startswith("module.") for k in unexpected):
        return "The names start with `module.` (a DataParallel/DDP wrapper): save `model.module.state_dict()`."
    return (
        f"Save the state dict of `torchvision.models.{m.arch}()` (its own norm layers or `norm_layer=` GroupNorm; "
        "the last classifier layer may have any number of classes) with safetensors.torch.save_file."
    )


def check_weights_file(path: Path, m: ArchManifest, *, max_header_bytes: int = MAX_HEADER_BYTES) -> WeightsSummary:
    """The whole check of one uploaded file: format, layout, finite values, match with the architecture; and
    the safetensors library's own parser (header only, memory-mapped) must agree."""
    size = path.stat().st_size
    if size == 0:
        raise WeightsFileError("the file is empty (0 bytes); upload the complete file")
    with path.open("rb") as f:
        header = read_header(f, size, max_header_bytes=max_header_bytes)
        summary = match_manifest(header, m)
        check_finite(f, header)
    _library_agrees(path, header)
    return summary


def _library_agrees(path: Path, header: SafetensorsHeader) -> None:
    from safetensors import SafetensorError, safe_open  # the reference parser reads the header only

    try:
        with safe_open(str(path), framework="numpy") as st:
            names = set(st.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsFileError(f"not a valid safetensors file: {e}") from None
    if names != set(header.tensors):
        raise WeightsFileError("not a valid safetensors file: the safetensors library reads other tensor names")
