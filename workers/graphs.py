"""CUDA-graph capture of a training step (or any step function) with a checked fallback to eager.

A step function here reads only device tensors and updates device tensors in place: the data
position, learning rate and every other per-step scalar live in device tensors, and nothing is
read back to the host. Replaying the captured kernels is then the same computation as calling
the function again, minus a few hundred kernel launches from Python.

`GraphedStep` runs such a function. On a CPU, or when capture is switched off or fails, it calls
the function eagerly (and says why). On a GPU it warms the function up on a side stream, captures
one call, puts the state back as it was before the warm-up (warm-up calls really train), and
checks one replay against one eager call from the same state before trusting the graph; any
mismatch or error logs the reason and falls back to eager for good.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

log = logging.getLogger(__name__)

WARMUP_CALLS = 3
# Replay vs eager after one step, from the same state: kernels are the same, so any difference is a
# few ulps from non-deterministic reductions (atomics in conv backward), far inside these bounds.
VERIFY_RTOL, VERIFY_ATOL = 1e-3, 1e-5


def graphs_unavailable(device: torch.device) -> str | None:
    """Why this device cannot replay CUDA graphs, or None when it can."""
    if device.type != "cuda":
        return f"device is {device.type}"
    if os.environ.get("NORMBENCH_CUDA_GRAPHS", "1").strip().lower() in ("0", "false", "no", "off"):
        return "switched off by NORMBENCH_CUDA_GRAPHS"
    if not torch.cuda.is_available():
        return "CUDA is not available"
    return None


def snapshot(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [t.detach().clone() for t in tensors]


def restore(tensors: Sequence[torch.Tensor], saved: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        for t, s in zip(tensors, saved, strict=True):
            t.copy_(s)


def compare(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor], names: Sequence[str] | None = None) -> str | None:
    """None when two states agree (floats to VERIFY_RTOL/ATOL, NaN where NaN; others exactly), else where not."""
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        name = names[i] if names is not None else f"state[{i}]"
        if x.shape != y.shape or x.dtype != y.dtype:
            return f"{name}: {tuple(x.shape)}/{x.dtype} vs {tuple(y.shape)}/{y.dtype}"
        if x.is_floating_point():
            if not torch.allclose(x, y, rtol=VERIFY_RTOL, atol=VERIFY_ATOL, equal_nan=True):
                diff = (x.double() - y.double()).abs().nan_to_num(float("inf")).max().item()
                return f"{name}: max abs difference {diff:.3g}"
        elif not torch.equal(x, y):
            return f"{name}: differs"
    return None


class GraphedStep:
    """Calls `fn` (no arguments, no result: it reads and writes device state), from a CUDA graph once
    captured.

    `state()` lists every tensor `fn` mutates: warm-up and verification put them back, so capturing
    never changes what training computes. `stream` and `pool` let several graphs share memory
    (those replayed one after another on one stream) or run side by side (different streams).
    """

    def __init__(
        self,
        fn: Callable[[], Any],
        device: torch.device,
        state: Callable[[], Sequence[torch.Tensor]],
        name: str,
        *,
        stream: Any = None,
        pool: Any = None,
        verify: bool = True,
        off: str | None = None,
    ) -> None:
        self.fn, self.device, self.state, self.name = fn, device, state, name
        self.stream, self.pool, self.verify = stream, pool, verify
        self.graph: Any = None
        # Why it runs eagerly: `off` (the caller's reason), the device's, or a failed capture's.
        self.reason: str | None = off or graphs_unavailable(device)
        self.tried = self.reason is not None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self) -> None:
        if not self.tried:
            self.tried = True
            self._capture()
        if self.graph is not None:
            self.graph.replay()
        else:
            self.fn()

    def _capture(self) -> None:
        state = list(self.state())
        saved = snapshot(state)
        stream = self.stream if self.stream is not None else torch.cuda.Stream(self.device)
        current = torch.cuda.current_stream(self.device)
        try:
            stream.wait_stream(current)
            with torch.cuda.stream(stream):
                for _ in range(WARMUP_CALLS):
                    self.fn()
            current.wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                self.fn()
            restore(state, saved)  # capture ran nothing; the warm-up calls did
            if self.verify:
                graph.replay()
                replayed = snapshot(state)
                restore(state, saved)
                self.fn()
                eager = snapshot(state)
                restore(state, saved)
                mismatch = compare(replayed, eager)
                if mismatch is not None:
                    raise RuntimeError(f"replay differs from the eager step ({mismatch})")
            torch.cuda.synchronize(self.device)
        except Exception as e:  # fall back to eager, loudly, with the state untouched
            self.graph = None
            self.reason = f"capture failed: {type(e).__name__}: {e}"
            log.warning("CUDA graph for %s not used, running eagerly: %s", self.name, self.reason)
            try:
                torch.cuda.synchronize(self.device)
            except Exception:
                log.exception("CUDA synchronize after a failed capture")
            restore(state, saved)
            return
        self.graph = graph
        log.info("CUDA graph captured for %s", self.name)
