"""Keys-off safety judged on the sockets this process really listens on (read from /proc on Linux), not on
what its command line says: uvicorn takes the last `--host`, `uvicorn.run(host=...)` has none, gunicorn binds
with `-b`, and a supervisor may hand over a bound socket."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
from dataclasses import dataclass, field
from pathlib import Path

from app.config import Settings, UnsafeBind, check_bind_safety

log = logging.getLogger(__name__)

PROC = Path("/proc")
LISTEN = "0A"  # TCP_LISTEN in /proc/net/tcp's `st` column
WATCH_SECONDS = 60.0  # how long after start-up to wait for the server's own socket to appear


def _decode_address(hex_address: str) -> str:
    """`0100007F` → `127.0.0.1`; IPv6 addresses are four 32-bit words, each in host (little-endian) order."""
    raw = bytes.fromhex(hex_address)
    if len(raw) == 4:
        return socket.inet_ntop(socket.AF_INET, raw[::-1])
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, 16, 4))
    return socket.inet_ntop(socket.AF_INET6, words)


def _own_socket_inodes(proc: Path) -> set[str]:
    inodes = set()
    fd_dir = proc / "self" / "fd"
    for fd in os.listdir(fd_dir):
        with contextlib.suppress(OSError):  # closed since listdir
            target = os.readlink(fd_dir / fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    return inodes


def listening_addresses(proc: Path = PROC) -> set[tuple[str, int]] | None:
    """The (address, port) of every TCP socket this process listens on; None where /proc cannot tell (not Linux)."""
    try:
        inodes = _own_socket_inodes(proc)
        found: set[tuple[str, int]] = set()
        for table in ("tcp", "tcp6"):
            path = proc / "net" / table
            if not path.exists():
                continue
            for line in path.read_text().splitlines()[1:]:
                cols = line.split()
                if len(cols) > 9 and cols[3] == LISTEN and cols[9] in inodes:
                    address, port = cols[1].split(":")
                    found.add((_decode_address(address), int(port, 16)))
        return found
    except (OSError, ValueError):
        return None


def _bracketed(address: str) -> str:
    return f"[{address}]" if ":" in address else address


def unsafe_listeners(settings: Settings, addresses: set[tuple[str, int]]) -> str | None:
    """Why serving on `addresses` is unsafe (keys off and one of them is not loopback), else None."""
    for address, port in sorted(addresses):
        try:
            check_bind_safety(settings, address)
        except UnsafeBind as e:
            shown = f"{_bracketed(address)}:{port}"
            return str(e).replace(repr(address), f"{shown!r} (a socket this process listens on)", 1)
    return None


@dataclass
class BindVerdict:
    """What is known about this process's listening sockets: filled in at start-up, after the server binds,
    or by the first request that arrives, whichever comes first; `unsafe` is why requests are refused."""

    checked: bool = False
    unsafe: str | None = None
    at_start: set[tuple[str, int]] = field(default_factory=set)

    def judge(self, settings: Settings) -> str | None:
        """Judge the sockets once any exist (a request has arrived on one); None while nothing is known."""
        if self.checked or settings.require_api_keys:
            return self.unsafe
        addresses = listening_addresses()
        if addresses:
            self.checked, self.unsafe = True, unsafe_listeners(settings, addresses)
        return self.unsafe


def check_sockets_at_start(settings: Settings) -> BindVerdict:
    """Sockets bound before the app starts (gunicorn, uvicorn --workers or --fd, systemd): refuse to start
    (raises UnsafeBind) if one is unsafe. The verdict remembers them, so the watcher only judges new ones."""
    verdict = BindVerdict()
    addresses = listening_addresses() or set()
    if not settings.require_api_keys:
        reason = unsafe_listeners(settings, addresses)
        if reason:
            raise UnsafeBind(reason)
    verdict.at_start = addresses
    return verdict


async def watch_new_sockets(settings: Settings, verdict: BindVerdict) -> None:
    """uvicorn binds only after the app's start-up: wait for this process's new listening sockets, judge
    them, and if one is unsafe stop the process (SIGTERM: the server shuts down and exits non-zero) after
    saying why; until then every request is refused (see `LoopbackOnlyWithoutKeys`)."""
    if settings.require_api_keys or listening_addresses() is None:
        return
    delay, waited = 0.02, 0.0
    while waited < WATCH_SECONDS and not verdict.checked:
        await asyncio.sleep(delay)
        waited += delay
        delay = min(delay * 2, 1.0)
        new = (listening_addresses() or set()) - verdict.at_start
        if new:
            verdict.checked, verdict.unsafe = True, unsafe_listeners(settings, new)
    if verdict.unsafe:
        log.error("%s", verdict.unsafe)
        os.kill(os.getpid(), signal.SIGTERM)


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.strip("[]"))
        return True
    except ValueError:
        return False
