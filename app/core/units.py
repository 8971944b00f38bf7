"""How sizes are written for people: one formatter for every message, table and limit."""

from __future__ import annotations


def human_bytes(n: int) -> str:
    """`512 bytes`, `1.5 KiB`, `512.0 MiB`, `2.0 GiB`: binary units, one decimal above bytes."""
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
