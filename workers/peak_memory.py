"""Peak memory of one pack's training, measured on the worker and recorded with each of its runs.

GPU: `torch.cuda.max_memory_allocated`, its peak reset when the pack starts (tensors the caching allocator handed
out, the dataset on the device included). CPU: the process's peak resident set (Linux VmHWM), reset when the pack
starts by writing 5 to /proc/self/clear_refs; it includes the worker itself, the dataset and whatever the C
allocator kept from earlier packs. Where the reset is not allowed, the lifetime peak (ru_maxrss) is reported and
labelled so. Either way it is the pack's peak: runs trained together share it."""

from __future__ import annotations

import resource
from typing import Any

import torch


def _status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024  # kB
    except OSError:
        return None
    return None


class PeakMemory:
    """Started when a pack starts; `read()` gives what a run records under `environment.peak_memory`."""

    def __init__(self, device: torch.device, pack_runs: int) -> None:
        self.device, self.pack_runs = device, pack_runs
        self.method = "cuda_max_memory_allocated"
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            self.start = int(torch.cuda.memory_allocated(device))
            return
        self.start = _status_bytes("VmRSS") or 0
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "process_peak_rss"
        except OSError:
            self.method = "process_lifetime_peak_rss"

    def read(self) -> dict[str, Any]:
        if self.device.type == "cuda":
            peak = int(torch.cuda.max_memory_allocated(self.device))
        elif self.method == "process_peak_rss":
            peak = _status_bytes("VmHWM") or 0
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return {"bytes": peak, "start_bytes": self.start, "method": self.method, "pack_runs": self.pack_runs}
