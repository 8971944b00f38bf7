"""Peak memory of the API process during a 2 GiB upload attempt.

Starts `uvicorn app.main:app` as a subprocess on the embedded default (SQLite in a temporary
NORMBENCH_HOME), warms it up with one small real upload, then streams 2 GiB of multipart body over a
raw socket in 1 MiB pieces and samples the server's resident set size (VmRSS in /proc/<pid>/status)
every few milliseconds; the kernel's own high-water mark (VmHWM, reset through /proc/<pid>/clear_refs
before each attempt) is recorded as a cross-check. Scenarios:

  chunked-over-cap     no Content-Length, default 512 MiB cap: cut off with 413 at the cap
  honest-over-cap      Content-Length: 2 GiB, default cap: 413 before a byte is read
  chunked-under-cap    cap raised to 3 GiB: all 2 GiB stream through the parser to disk, then the
                       upload is refused as "not a .npz" (422): the worst case for a streamed upload

    .venv/bin/python bench/upload_memory.py [--gib 2] [--scenario NAME ...]

Prints one line per scenario and a Markdown table for bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MiB = 2**20
BOUNDARY = b"nbbench0boundary"


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


class Sampler(threading.Thread):
    def __init__(self, pid: int, every: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.pid, self.every, self.peak, self.samples = pid, every, 0, 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                self.peak = max(self.peak, rss_kib(self.pid))
                self.samples += 1
            except (OSError, RuntimeError):
                return
            time.sleep(self.every)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(home: Path, port: int, max_upload: int | None) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NORMBENCH_")}
    env.update(NORMBENCH_HOME=str(home), PYTHONUNBUFFERED="1")
    if max_upload is not None:
        env["NORMBENCH_MAX_UPLOAD_BYTES"] = str(max_upload)
        env["NORMBENCH_MAX_DECOMPRESSED_BYTES"] = str(max_upload)
    subprocess.run(
        [sys.executable, "-m", "alembic", "upgrade", "head"], cwd=ROOT, env=env, check=True, capture_output=True
    )
    cmd = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"uvicorn exited: {proc.stderr.read().decode() if proc.stderr else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(100).startswith(b"HTTP/1.1 200"):
                    return proc
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("uvicorn did not answer /healthz")


def multipart_head(filename: str) -> bytes:
    return (
        b"--" + BOUNDARY + b'\r\nContent-Disposition: form-data; name="file"; filename="' + filename.encode() + b'"\r\n'
        b"Content-Type: application/octet-stream\r\n\r\n"
    )


def multipart_tail() -> bytes:
    return b"\r\n--" + BOUNDARY + b"--\r\n"


def read_response(sock: socket.socket, already: bytes = b"") -> bytes:
    data = already
    sock.settimeout(600)
    try:
        while True:
            more = sock.recv(65536)
            if not more:
                break
            data += more
            head, _, body = data.partition(b"\r\n\r\n")
            length = next(
                (
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                ),
                None,
            )
            if length is not None and len(body) >= length:
                break
    except (ConnectionResetError, TimeoutError):
        pass
    return data


def warm_up(port: int) -> None:
    """One small valid upload, so every import and code path of an upload is loaded before measuring."""
    x = (np.arange(120 * 64) % 251).astype(np.uint8).reshape(120, 8, 8)
    buf = io.BytesIO()
    np.savez(buf, x=x, y=np.repeat(np.arange(3), 40))
    body = multipart_head("warm.npz") + buf.getvalue() + multipart_tail()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(
            b"POST /v1/datasets HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: multipart/form-data; boundary=" + BOUNDARY + b"\r\n"
            b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
        )
        resp = read_response(s)
    if not resp.startswith(b"HTTP/1.1 201"):
        raise RuntimeError(f"warm-up upload failed: {resp[:300]!r}")


def stream_upload(port: int, total: int, honest_length: bool) -> tuple[int, bytes, float]:
    """Send `total` bytes of file content; return (bytes sent, response, seconds)."""
    piece = os.urandom(MiB)
    head, tail = multipart_head("big.npz"), multipart_tail()
    started = time.monotonic()
    sent = 0
    response = b""
    with socket.create_connection(("127.0.0.1", port)) as s:
        framing = b"Content-Type: multipart/form-data; boundary=" + BOUNDARY + b"\r\n"
        if honest_length:
            framing += b"Content-Length: " + str(len(head) + total + len(tail)).encode() + b"\r\n"
        else:
            framing += b"Transfer-Encoding: chunked\r\n"
        s.sendall(b"POST /v1/datasets HTTP/1.1\r\nHost: x\r\n" + framing + b"\r\n")

        def frame(data: bytes) -> bytes:
            return data if honest_length else b"%x\r\n%s\r\n" % (len(data), data)

        try:
            s.sendall(frame(head))
            while sent < total:
                s.settimeout(0.0)
                try:
                    response += s.recv(65536)
                    if response:
                        break  # the server answered before the body was complete
                except BlockingIOError:
                    pass
                s.settimeout(600)
                chunk = piece[: total - sent]
                s.sendall(frame(chunk))
                sent += len(chunk)
            else:
                s.sendall(frame(tail) + (b"" if honest_length else b"0\r\n\r\n"))
        except (BrokenPipeError, ConnectionResetError):
            pass
        response = read_response(s, response)
    return sent, response, time.monotonic() - started


def measure(name: str, gib: float) -> dict[str, object]:
    total = int(gib * 2**30)
    max_upload = 3 * 2**30 if name == "chunked-under-cap" else None
    with tempfile.TemporaryDirectory(prefix="normbench-bench-") as tmp:
        port = free_port()
        proc = start_server(Path(tmp) / "home", port, max_upload)
        try:
            warm_up(port)
            time.sleep(0.5)
            baseline = rss_kib(proc.pid)
            Path(f"/proc/{proc.pid}/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            sampler = Sampler(proc.pid)
            sampler.start()
            sent, response, seconds = stream_upload(port, total, honest_length=name == "honest-over-cap")
            time.sleep(0.5)
            sampler.stop.set()
            sampler.join()
            hwm = rss_kib(proc.pid, "VmHWM")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    status = response.split(b"\r\n", 1)[0].decode(errors="replace")
    body = response.partition(b"\r\n\r\n")[2][:160].decode(errors="replace")
    return {
        "scenario": name,
        "attempted_gib": gib,
        "sent_mib": sent / MiB,
        "status": status,
        "body": body,
        "seconds": seconds,
        "baseline_mib": baseline / 1024,
        "peak_growth_mib": (max(sampler.peak, baseline) - baseline) / 1024,
        "hwm_growth_mib": (hwm - baseline) / 1024,
        "samples": sampler.samples,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=2.0, help="size of the upload attempt")
    parser.add_argument(
        "--scenario",
        action="append",
        choices=["chunked-over-cap", "honest-over-cap", "chunked-under-cap"],
        help="run only these (default: all)",
    )
    args = parser.parse_args()
    results = [
        measure(name, args.gib)
        for name in args.scenario or ["chunked-over-cap", "honest-over-cap", "chunked-under-cap"]
    ]
    for r in results:
        print(
            f"{r['scenario']:<18} sent {r['sent_mib']:7.0f} MiB in {r['seconds']:5.1f} s -> {r['status']}; "
            f"API RSS {r['baseline_mib']:.0f} MiB at rest, peak +{r['peak_growth_mib']:.1f} MiB sampled "
            f"({r['samples']} samples), +{r['hwm_growth_mib']:.1f} MiB by VmHWM; {r['body']}"
        )
    print()
    print(
        "| scenario | attempted | sent before the answer | answer | API RSS at rest | peak RSS growth (sampled / VmHWM) |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['scenario']} | {r['attempted_gib']:g} GiB | {r['sent_mib']:.0f} MiB | {r['status'].removeprefix('HTTP/1.1 ')} "
            f"| {r['baseline_mib']:.0f} MiB | +{r['peak_growth_mib']:.1f} / +{r['hwm_growth_mib']:.1f} MiB |"
        )


if __name__ == "__main__":
    main()
