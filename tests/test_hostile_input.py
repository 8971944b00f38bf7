"""Hostile input: one test per attack. Each asserts the status code, the message, and that nothing was
stored (no dataset/job/run rows, no files in storage, no temporary files or open temp descriptors).

The closing table of issue 6 maps every attack to the test here that proves its answer.
"""

from __future__ import annotations

import ast
import asyncio
import io
import json
import os
import re
import socket
import stat
import struct
import threading
import time
import tracemalloc
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import uvicorn
from PIL import Image
from sqlalchemy import create_engine, func, select

from app.api.middleware import MULTIPART_SLACK
from app.config import Settings
from app.core.catalogue import MAX_CLASSES
from app.main import create_app
from app.services import datasets as datasets_service
from app.tables import Dataset, Job, Run
from tests.factories import job_spec, npz_bytes, pattern_images, upload
from tests.support import ROOT, UploadHarness, http_scope, stored_files, upload_harness

State = tuple[list[Path], int, int, int]


def state(settings: Settings) -> State:
    with create_engine(settings.resolved_database_url).connect() as conn:
        rows = [int(conn.scalar(select(func.count()).select_from(t))) for t in (Dataset, Job, Run)]
    return stored_files(settings), rows[0], rows[1], rows[2]


def open_temp_descriptors(tmp: Path) -> list[str]:
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(tmp)):
            out.append(target)
    return out


class Harness(UploadHarness):
    """The upload harness on datasets and jobs: an attack leaves no row, file, temporary file or descriptor."""

    def stored(self) -> State:
        return state(self.settings)

    def assert_nothing_left(self, before: State) -> None:
        super().assert_nothing_left(before)
        assert open_temp_descriptors(self.tmp) == [], "a temporary file is still open"

    def refuse_upload(self, filename: str, data: bytes, status: int, *needles: str, **form: str) -> str:
        return self.assert_refused(lambda: upload(self.client, filename, data, **form), status, *needles)

    def refuse_job(self, spec: dict[str, Any], *needles: str) -> None:
        self.assert_refused(lambda: self.client.post("/v1/jobs", json=spec), 422, *needles)


@pytest.fixture
def harness(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[..., Any]:
    return upload_harness(Harness, settings, tmp_path, monkeypatch)


# ----------------------------------------------------------------------------------- file builders


def png(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def good_images() -> dict[str, bytes]:
    x, _ = pattern_images(n_per_class=2, classes=2)
    return {"a/1.png": png(x[0]), "a/2.png": png(x[1]), "b/1.png": png(x[2]), "b/2.png": png(x[3])}


def make_zip(entries: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A few hundred bytes whose PNG header claims width × height pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def npy_with_header(shape: tuple[int, ...], descr: str = "|u1", payload: bytes = b"\0" * 64) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": shape})
    return buf.getvalue() + payload


def npy_with_raw_header(header: str) -> bytes:
    """A .npy member whose header text is `header`, whatever it holds (np.save writes only a plain dict)."""
    text = header.encode("latin1")
    text += b" " * (-(10 + len(text) + 1) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + b"\0" * 64


@contextmanager
def peak_memory() -> Iterator[list[int]]:
    """The peak of Python and NumPy allocations (all threads) inside the block, as `[peak]` once it ends."""
    out: list[int] = []
    tracemalloc.start()
    try:
        yield out
        out.append(tracemalloc.get_traced_memory()[1])
    finally:
        tracemalloc.stop()


LABELS = np.array([0, 0, 1, 1, 2, 2], dtype=np.int64)


def tiny_npz(**arrays: Any) -> bytes:
    base: dict[str, Any] = {"x": np.zeros((6, 4, 4), np.uint8), "y": LABELS}
    base.update(arrays)
    return npz_bytes(**{k: v for k, v in base.items() if v is not None})


# ------------------------------------------------------------------------------ streaming byte cap


MULTIPART_HEAD = (
    b'--nbb\r\nContent-Disposition: form-data; name="file"; filename="big.npz"\r\n'
    b"Content-Type: application/octet-stream\r\n\r\n"
)


def _asgi_upload(settings: Settings, headers: list[tuple[bytes, bytes]], total: int) -> tuple[int, dict, int]:
    """Drive the ASGI app directly with a multipart body of `total` bytes produced lazily, 1 MiB per message;
    return (status, body, bytes the app pulled)."""
    app = create_app(settings)
    chunk = b"\0" * 2**20
    pulled = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        body = MULTIPART_HEAD if pulled == 0 else chunk
        pulled += len(body)
        return {"type": "http.request", "body": body, "more_body": pulled < total}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = http_scope("POST", "/v1/datasets", [(b"content-type", b"multipart/form-data; boundary=nbb"), *headers])
    asyncio.run(app(scope, receive, send))
    return int(sent[0]["status"]), json.loads(sent[1]["body"]), pulled


def test_upload_with_an_honest_content_length_over_the_cap_is_413_before_reading(harness: Any) -> None:
    with harness(max_upload_bytes=2**20) as h:
        before = state(h.settings)
        status, body, pulled = _asgi_upload(h.settings, [(b"content-length", str(2 * 2**30).encode())], 2 * 2**30)
        assert status == 413 and body["error"] == "payload_too_large"
        assert "1.0 MiB" in body["detail"] and "NORMBENCH_MAX_UPLOAD_BYTES" in body["detail"]
        assert pulled == 0, "the body was read although its Content-Length is over the cap"
        h.assert_nothing_left(before)


@pytest.mark.parametrize("length_header", [None, b"1000"], ids=["chunked", "lying-content-length"])
def test_upload_without_honest_content_length_is_cut_off_while_reading(harness: Any, length_header: Any) -> None:
    with harness(max_upload_bytes=2**20) as h:
        before = state(h.settings)
        headers = [(b"content-length", length_header)] if length_header else []
        status, body, pulled = _asgi_upload(h.settings, headers, 2 * 2**30)
        assert status == 413 and body["error"] == "payload_too_large" and "NORMBENCH_MAX_UPLOAD_BYTES" in body["detail"]
        # Stopped at the cap (+ multipart framing + the message in flight), not after 2 GiB.
        assert pulled <= 2**20 + MULTIPART_SLACK + 2**20, pulled
        h.assert_nothing_left(before)


def test_upload_over_the_cap_through_a_real_server_is_cut_off(harness: Any) -> None:
    """uvicorn on a socket: a chunked 256 MiB upload against a 1 MiB cap gets 413 long before it is sent."""
    with harness(max_upload_bytes=2**20) as h:
        before = state(h.settings)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        server = uvicorn.Server(uvicorn.Config(create_app(h.settings), host="127.0.0.1", port=port, log_level="error"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 20
            while not server.started:
                assert time.monotonic() < deadline, "uvicorn did not start"
                time.sleep(0.05)
            sent, response = 0, b""
            with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
                sock.sendall(
                    b"POST /v1/datasets HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                    b"Content-Type: multipart/form-data; boundary=nbb\r\n\r\n"
                )
                sock.sendall(b"%x\r\n%s\r\n" % (len(MULTIPART_HEAD), MULTIPART_HEAD))
                piece = b"%x\r\n%s\r\n" % (2**16, b"\0" * 2**16)
                pending = memoryview(piece)  # a non-blocking send may take part of a frame: keep the rest
                sock.settimeout(0.0)
                try:
                    while sent < 256 * 2**20:
                        try:
                            pending = pending[sock.send(pending) :]
                            if not pending:
                                sent += 2**16
                                pending = memoryview(piece)
                        except BlockingIOError:
                            pass
                        try:
                            response += sock.recv(65536)
                        except BlockingIOError:
                            continue
                        if b"\r\n\r\n" in response:
                            break
                except (BrokenPipeError, ConnectionResetError):
                    pass
                sock.settimeout(5)
                try:
                    while b"}" not in response:
                        more = sock.recv(65536)
                        if not more:
                            break
                        response += more
                except (ConnectionResetError, TimeoutError):
                    pass
        finally:
            server.should_exit = True
            thread.join(timeout=10)
        assert response.startswith(b"HTTP/1.1 413"), response[:200]
        assert b"payload_too_large" in response and b"NORMBENCH_MAX_UPLOAD_BYTES" in response
        assert sent < 64 * 2**20, f"the server let {sent} bytes in before answering"
        h.assert_nothing_left(before)


def test_json_body_over_the_request_cap_is_413(harness: Any) -> None:
    with harness(max_request_bytes=64 * 1024) as h:
        before = state(h.settings)
        spec = job_spec("digits", name="x" * 100, padding="y" * 200_000)
        resp = h.client.post("/v1/jobs", json=spec)
        assert resp.status_code == 413 and "NORMBENCH_MAX_REQUEST_BYTES" in resp.json()["detail"]
        h.assert_nothing_left(before)


def test_upload_form_with_extra_files_is_refused(harness: Any) -> None:
    with harness() as h:
        before = state(h.settings)
        files = [("file", ("a.npz", tiny_npz())), ("file", ("b.npz", tiny_npz()))]
        resp = h.client.post("/v1/datasets", files=files)
        assert resp.status_code == 422, resp.text
        assert resp.json()["error"] == "invalid_request" and "Too many files" in resp.json()["detail"]
        h.assert_nothing_left(before)


def test_upload_filename_with_a_path_is_only_a_label(harness: Any) -> None:
    with harness() as h:
        resp = upload(h.client, "../../../../etc/cron.d/evil.npz", tiny_npz())
        assert resp.status_code == 201, resp.text
        assert resp.json()["name"] == "evil.npz"
        stored = stored_files(h.settings)
        assert any(p.name == f"{resp.json()['id']}.npz" and p.parent.name == "datasets" for p in stored)
        assert not any("evil" in str(p) for p in stored)


# ---------------------------------------------------------------------------------------------- npz


def test_npz_object_array_is_refused_without_unpickling(harness: Any) -> None:
    boom = np.array([{"__reduce__": "os.system"}] * 6, dtype=object)
    with harness() as h:
        h.refuse_upload("p.npz", tiny_npz(x=boom), 422, "array 'x' has dtype object", "refused for safety")


def test_npz_forged_header_claiming_terabytes_is_refused_before_allocation(harness: Any) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("x.npy", npy_with_header((10**12, 1000, 1000)))
        zf.writestr("y.npy", npy_with_header((6,), "<i8", LABELS.tobytes()))
    with harness() as h:
        h.refuse_upload(
            "forged.npz", buf.getvalue(), 422, "array 'x' declares shape (1000000000000, 1000, 1000)", "PiB", "forged"
        )


def test_npz_member_over_the_decompressed_cap_is_refused(harness: Any) -> None:
    buf = io.BytesIO()
    np.savez_compressed(buf, x=np.zeros((6, 200, 200), np.uint8), y=LABELS)  # 240 KB in a few hundred bytes
    with harness(max_decompressed_bytes=100_000) as h:
        h.refuse_upload("big.npz", buf.getvalue(), 422, "unpacks to", "more than the limit of 97.7 KiB")


def test_npz_compression_bomb_is_refused_before_inflating(harness: Any) -> None:
    """np.savez_compressed of zeros expands ~1000×: refused from the zip directory, API memory stays flat."""
    buf = io.BytesIO()
    np.savez_compressed(buf, x=np.zeros((64, 1024, 1024), np.uint8), y=np.arange(64) % 2)  # 64 MiB in ~65 KB
    bomb = buf.getvalue()
    assert len(bomb) < 2**20
    with harness() as h, peak_memory() as peak:
        h.refuse_upload("bomb.npz", bomb, 422, "array 'x' in 'bomb.npz' expands", "limit of 200×", "np.savez")
    assert peak[0] < 16 * 2**20, f"checking a 64 MiB bomb allocated {peak[0] / 2**20:.1f} MiB"


def test_npz_forged_header_message_names_no_python_internals(harness: Any) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        header = "{'descr': '|u1', 'fortran_order': False, 'shape': __import__('os').getpid()}"
        zf.writestr("x.npy", npy_with_raw_header(header))
        zf.writestr("y.npy", npy_with_header((6,), "<i8", LABELS.tobytes()))
    with harness() as h:
        detail = h.refuse_upload(
            "forged.npz", buf.getvalue(), 422, "array 'x' has an unreadable .npy header", "np.save writes", "np.savez"
        )
    assert " at 0x" not in detail and "ast." not in detail, detail


@pytest.mark.parametrize(
    ("arrays", "needles"),
    [
        ({"x": np.array([[1.0, np.nan]] * 6, np.float32)}, ("x contains NaN or infinite values", "row 0, column 1")),
        ({"x": np.array([[1.0, np.inf]] * 6, np.float64)}, ("NaN or infinite",)),
        ({"y": np.array([0, 0, 1, 1, 2.5, 2])}, ("non-integer float labels",)),
        ({"y": np.array([0, 0, 1, 1, -1, 2])}, ("negative label -1",)),
        ({"y": np.zeros(6, np.int64)}, ("only one class", "at least 2 classes")),
        ({"y": np.array([0, 0, 1, 1, 1, 2])}, ("class 2 has 1 training sample", "at least 2")),
        ({"y": LABELS, "class_names": np.array(["a", "b"])}, ("label 2 but class_names has only 2",)),
        ({"y": np.array(["a"] * 6)}, ("labels must be integers",)),
    ],
    ids=["nan", "inf", "float-labels", "negative", "one-class", "one-sample", "out-of-range", "string-labels"],
)
def test_npz_bad_values_and_labels_are_named(harness: Any, arrays: dict[str, Any], needles: tuple[str, ...]) -> None:
    with harness() as h:
        h.refuse_upload("bad.npz", tiny_npz(**arrays), 422, *needles)


def test_npz_shape_mismatch_names_both_shapes(harness: Any) -> None:
    with harness() as h:
        h.refuse_upload("m.npz", tiny_npz(y=np.arange(5) % 2), 422, "x has shape (6, 4, 4)", "y has shape (5,)")
        x_val = np.zeros((4, 5, 5), np.uint8)
        h.refuse_upload("v.npz", tiny_npz(x_val=x_val, y_val=np.array([0, 1, 0, 1])), 422, "x_val has shape (4, 5, 5)")


# ---------------------------------------------------------------------------------------------- zip


@pytest.mark.parametrize(
    ("name", "needle"),
    [("../evil/1.png", "contains '..'"), ("/etc/cron.d/1.png", "absolute path"), ("C:/win/1.png", "absolute path")],
    ids=["traversal", "absolute", "drive-letter"],
)
def test_zip_path_traversal_and_absolute_paths_are_refused(harness: Any, name: str, needle: str) -> None:
    with harness() as h:
        h.refuse_upload("t.zip", make_zip({**good_images(), name: b"x"}), 422, name, needle)


def test_zip_symlink_entry_is_refused(harness: Any) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in good_images().items():
            zf.writestr(name, data)
        link = zipfile.ZipInfo("a/3.png")
        link.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(link, "/etc/passwd")
    with harness() as h:
        h.refuse_upload("s.zip", buf.getvalue(), 422, "'a/3.png'", "symbolic link")


def test_zip_nested_archive_is_refused(harness: Any) -> None:
    inner = make_zip(good_images())
    with harness() as h:
        h.refuse_upload("n.zip", make_zip({**good_images(), "a/more.zip": inner}), 422, "'a/more.zip'", "nested")


def test_zip_entry_count_is_capped(harness: Any) -> None:
    with harness(max_zip_entries=5) as h:
        entries = {**good_images(), "a/3.png": good_images()["a/1.png"], "b/3.png": good_images()["b/1.png"]}
        h.refuse_upload("many.zip", make_zip(entries), 422, "has 6 entries", "limit of 5")


def test_zip_total_uncompressed_bytes_are_capped(harness: Any) -> None:
    with harness(max_decompressed_bytes=200) as h:
        h.refuse_upload("big.zip", make_zip(good_images()), 422, "unpacks to", "more than the limit of 200 bytes")


def test_zip_bomb_compression_ratio_is_refused_before_extraction(harness: Any) -> None:
    bomb = make_zip({**good_images(), "a/3.png": b"\0" * (8 * 2**20)}, zipfile.ZIP_DEFLATED)
    assert len(bomb) < 64 * 1024
    with harness() as h:
        h.refuse_upload("bomb.zip", bomb, 422, "'a/3.png'", "expands", "limit of 200×")


def test_zip_overlapping_entries_are_refused(harness: Any) -> None:
    data = bytearray(make_zip(good_images()))
    records = [m.start() for m in re.finditer(rb"PK\x01\x02", data)]
    first = struct.unpack_from("<I", data, records[0] + 42)[0]
    struct.pack_into("<I", data, records[1] + 42, first)  # entry 2's directory record points at entry 1's bytes
    with harness() as h:
        h.refuse_upload("overlap.zip", bytes(data), 422, "'a/1.png' and 'a/2.png'", "overlap")


def test_zip_decompression_bomb_image_is_refused(harness: Any) -> None:
    images = {**good_images(), "a/1.png": png_claiming(40_000, 40_000)}
    with harness() as h:
        h.refuse_upload("px.zip", make_zip(images), 422, "'a/1.png'", "pixels", "downscale")


def test_zip_flat_colour_images_are_refused_before_decoding(harness: Any) -> None:
    """Four 4096² PNGs of one colour (~50 KB each, 48 MiB decoded): refused from their headers, memory flat."""
    flat = png(np.zeros((4096, 4096, 3), np.uint8))
    images = {f"{c}/{i}.png": flat for c in "ab" for i in (1, 2)}
    with harness() as h, peak_memory() as peak:
        h.refuse_upload("flat.zip", make_zip(images), 422, "image 'a/1.png' expands", "limit of 200×")
    assert peak[0] < 16 * 2**20, f"checking the images allocated {peak[0] / 2**20:.1f} MiB"


def test_zip_decoded_pixels_are_counted_against_the_limit_before_decoding(harness: Any) -> None:
    flat = png(np.full((256, 256, 3), 7, np.uint8))  # a few hundred bytes, 192 KiB decoded: under the ratio guard
    images = {f"{c}/{i}.png": flat for c in "ab" for i in (1, 2)}
    with harness(max_decompressed_bytes=500_000) as h:
        h.refuse_upload("px.zip", make_zip(images), 422, "4 images of 256×256 with 3 channel(s) need 768.0 KiB")


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_zip_image_format_allowlist(harness: Any, fmt: str) -> None:
    x, _ = pattern_images(n_per_class=1, classes=1)
    disguised = png(x[0], fmt)
    with harness() as h:
        h.refuse_upload("f.zip", make_zip({**good_images(), "a/1.png": disguised}), 422, "'a/1.png'", "PNG")
        h.refuse_upload("g.zip", make_zip({**good_images(), "a/3.gif": disguised}), 422, "'a/3.gif'", "PNG/JPEG")


def test_zip_truncated_and_non_image_files_are_named(harness: Any) -> None:
    whole = good_images()["a/1.png"]
    with harness() as h:
        h.refuse_upload("tr.zip", make_zip({**good_images(), "a/1.png": whole[: len(whole) // 2]}), 422, "'a/1.png'")
        h.refuse_upload("tx.zip", make_zip({**good_images(), "b/2.png": b"hello, I am text"}), 422, "'b/2.png'")


# ---------------------------------------------------------------------------------------------- csv


def test_csv_size_cap(harness: Any) -> None:
    text = "a,label\n" + "".join(f"{i},{i % 2}\n" for i in range(200))
    with harness(max_decompressed_bytes=500) as h:
        h.refuse_upload("big.csv", text.encode(), 422, "more than the limit")


def test_csv_row_cap(harness: Any) -> None:
    text = "a,label\n" + "".join(f"{i},{i % 2}\n" for i in range(11))
    with harness(max_csv_rows=10) as h:
        h.refuse_upload("rows.csv", text.encode(), 422, "more than 10 data rows")


def test_csv_overlong_line_and_too_many_columns(harness: Any) -> None:
    with harness() as h:
        h.refuse_upload("wide.csv", ("a,label\n1," + "0" * (2**20 + 10) + "\n").encode(), 422, "line 2", "longer")
        header = ",".join(f"f{i}" for i in range(10_001)) + ",label\n"
        h.refuse_upload("cols.csv", header.encode(), 422, "10002 columns", "limit of 10000")


def test_csv_non_numeric_cell_names_row_and_column(harness: Any) -> None:
    text = "a,b,label\n1,2,0\n3,oops,1\n1,2,0\n3,4,1\n"
    with harness() as h:
        h.refuse_upload("c.csv", text.encode(), 422, "row 3, column 'b'", "'oops'")


# --------------------------------------------------------------------------------------------- names


def test_class_names_are_bounded_in_length(harness: Any) -> None:
    long = "x" * 100_000  # under the CSV module's field limit, so the label reaches the name check
    text = f"a,label\n1,{long}\n2,{long}\n3,b\n4,b\n"
    with harness() as h:
        h.refuse_upload("long.csv", text.encode(), 422, "class name 'xxxx", "100000 characters long", "limit of 200")
        names = np.array(["a", "b", "c" * 201])
        h.refuse_upload("long.npz", tiny_npz(class_names=names), 422, "201 characters long")


def test_class_count_is_bounded(harness: Any) -> None:
    over = MAX_CLASSES + 1
    text = "a,label\n" + "".join(f"{i},{i}\n" for i in range(over))
    with harness() as h:
        h.refuse_upload("many.csv", text.encode(), 422, f"holds {over} classes", f"limit of {MAX_CLASSES}")
        y = np.array([0, 0, 1, 1, 20_000, 20_000])
        h.refuse_upload("big.npz", tiny_npz(y=y), 422, "largest label is 20000", "20001 classes", f"{MAX_CLASSES}")


@pytest.mark.parametrize(
    ("char", "needle"),
    [
        ("\u202e", "U+202E RIGHT-TO-LEFT OVERRIDE"),
        ("\u2066", "U+2066 LEFT-TO-RIGHT ISOLATE"),
        ("\x00", "NUL character"),
        ("\x1b", "control character U+001B"),
        ("\x85", "control character U+0085"),
    ],
    ids=["rlo", "lri", "nul", "escape", "c1"],
)
def test_control_and_bidi_characters_in_names_are_refused(harness: Any, char: str, needle: str) -> None:
    names = np.array(["cat", f"d{char}og", "cow"])
    with harness() as h:
        h.refuse_upload("n.npz", tiny_npz(class_names=names), 422, "class name", needle)
        h.refuse_upload("d.npz", tiny_npz(), 422, "dataset name", needle, name=f"cats{char}gpj.exe")
        if char != "\x00":  # a NUL cannot travel in a zip entry name
            images = {f"a{char}b/1.png": good_images()["a/1.png"], **good_images()}
            h.refuse_upload("z.zip", make_zip(images), 422, "class name", needle)


def test_file_name_used_as_the_dataset_name_is_checked_too(harness: Any) -> None:
    with harness() as h:
        h.refuse_upload("evil\u202egpj.npz", tiny_npz(), 422, "taken from the file name", "U+202E")


# ----------------------------------------------------------------------------------------- job specs


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [
        ({"batch_sizes": [0]}, "batch size"),
        ({"batch_sizes": [5000]}, "batch size"),
        ({"batch_sizes": list(range(1, 18))}, "batch_sizes"),
        ({"seeds": list(range(21))}, "seeds"),
        ({"seeds": [-1]}, "seeds"),
        ({"seeds": [2**31]}, "seeds"),
        ({"budget": {"epochs": 0}}, "budget.epochs"),
        ({"budget": {"epochs": 10**9}}, "budget.epochs"),
        ({"variants": [{"norm": "gn", "groups": g} for g in range(1, 34)]}, "variants"),
        ({"variants": [{"norm": "gn", "groups": 0}]}, "groups"),
        ({"variants": [{"norm": "gn", "groups": 10**6}]}, "groups"),
        ({"model": {"arch": "mlp", "hidden": [64] * 9}}, "model.hidden"),
        ({"model": {"arch": "mlp", "hidden": [10**6]}}, "hidden width"),
        ({"model": {"arch": "cnn", "width": 10**6}}, "model.width"),
        ({"model": {"arch": "resnet", "depth": 10**6}}, "model.depth"),
        ({"name": "n" * 201}, "name"),
        ({"optimizer": {"lr": 1e9}}, "optimizer.lr"),
        ({"log_every_steps": 0}, "log_every_steps"),
        ({"validation_fraction": 0.99}, "validation_fraction"),
    ],
)
def test_job_spec_fields_are_bounded(harness: Any, overrides: dict[str, Any], needle: str) -> None:
    with harness() as h:
        h.refuse_job(job_spec("digits", **overrides), needle)


@pytest.mark.parametrize("where", ["top", "model", "variant", "budget", "optimizer", "augment"])
def test_job_spec_unknown_fields_are_rejected(harness: Any, where: str) -> None:
    spec = job_spec("digits")
    if where == "top":
        spec["gpus"] = 8
    elif where == "variant":
        spec["variants"][0]["gpus"] = 8
    else:
        spec[where] = {**spec.get(where, {}), "gpus": 8}
    with harness() as h:
        h.refuse_job(spec, "gpus", "Extra inputs are not permitted")


# ---------------------------------------------------------------------------------------- pickles


def _calls(path: Path, name: str) -> list[ast.Call]:
    tree = ast.parse(path.read_text())
    return [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and ast.unparse(n.func).endswith(name)
    ]


def test_every_deserializer_refuses_pickles() -> None:
    """torch.load only with weights_only=True and np.load only with allow_pickle=False, everywhere."""
    sources = [p for d in ("app", "workers", "models") for p in (ROOT / d).rglob("*.py")]
    for path in sources:
        for call in _calls(path, "torch.load"):
            kw = {k.arg: ast.unparse(k.value) for k in call.keywords}
            assert kw.get("weights_only") == "True", f"{path}:{call.lineno} torch.load without weights_only=True"
        for call in _calls(path, "np.load"):
            kw = {k.arg: ast.unparse(k.value) for k in call.keywords}
            assert kw.get("allow_pickle") == "False", f"{path}:{call.lineno} np.load without allow_pickle=False"
        assert "pickle.load" not in path.read_text(), f"{path} unpickles"


def test_torch_weights_only_load_refuses_a_malicious_checkpoint(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from importlib.metadata import version

    major, minor = (int(p) for p in version("torch").split(".")[:2])
    assert (major, minor) >= (2, 6), "torch < 2.6 does not default torch.load to weights_only=True"

    class Exploit:
        def __reduce__(self) -> tuple[Any, ...]:
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "ckpt.pt"
    torch.save({"model": Exploit()}, path)
    with pytest.raises(Exception, match="(?i)weights only|unsupported global"):
        torch.load(path, weights_only=True)
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------ values the database refuses


def test_nul_characters_and_overlong_values_are_422_not_500(harness: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Postgres cannot store NUL in text: every place a request string reaches a query answers 422."""
    with harness() as h:
        for path in ("/v1/jobs/a%00b", "/v1/runs/a%00b/metrics", "/v1/datasets/a%00b", "/v1/jobs/a%00b/export.csv"):
            resp = h.client.get(path)
            assert resp.status_code == 422 and "NUL" in resp.json()["detail"], (path, resp.text)
        h.refuse_job(job_spec("digits\x00"), "NUL")
        h.refuse_job(job_spec("digits", name="job\x00"), "NUL")
        h.refuse_upload("ok.npz", tiny_npz(), 422, "NUL", name="bad\x00name")  # refused before it is read
        # Were a name to pass that check, the database's refusal comes after the blob is stored: it must go too.
        monkeypatch.setattr(datasets_service, "upload_name", lambda what, name, filename, error: name or filename)
        h.refuse_upload("ok.npz", tiny_npz(), 422, "NUL", name="bad\x00name")
