"""A run's training state between attempts: the typed `Checkpoint`, its format version, and its file IO.

The engine writes one per run at epoch ends and at shutdown; a resumed run (alone or in any pack)
continues from it exactly where it stopped."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# 2: augmentation draws are a function of (seed, epoch), so no augmentation generator state is kept.
# 1 (read only): as 2 plus `aug_rng`, which is dropped.
FORMAT = 2
READABLE = (1, 2)


@dataclass
class Checkpoint:
    model: dict[str, torch.Tensor]  # the run's state_dict
    optimizer: dict[str, Any]  # torch.optim.SGD's state_dict (workers.run_config.make_optimizer's groups)
    epoch: int  # completed epochs
    batch: int  # batches done of the current epoch
    step: int  # batches done in all
    epoch_loss: float  # sum of the current epoch's training losses so far
    window: list[float]  # training losses since the last window check
    elapsed: float  # wall seconds of training so far
    torch_rng: torch.Tensor | None = None  # the CPU generator state when written
    noise: list[float] | None = None  # BN-noise sums of the current epoch: mean, var, count
    # Only in the checkpoint written after the last epoch of a run that succeeded: its final metrics, so an
    # attempt that resumes from it (the worker died before the result was committed) records them, training
    # nothing again.
    final_metrics: dict[str, float] | None = None

    def to_state(self) -> dict[str, Any]:
        """The plain dict torch.save writes (weights_only-loadable)."""
        state: dict[str, Any] = {
            "format": FORMAT,
            "model": self.model,
            "optimizer": self.optimizer,
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "epoch_loss": self.epoch_loss,
            "window": list(self.window),
            "elapsed": self.elapsed,
        }
        if self.torch_rng is not None:
            state["torch_rng"] = self.torch_rng
        if self.noise is not None:
            state["noise"] = list(self.noise)
        if self.final_metrics is not None:
            state["final_metrics"] = dict(self.final_metrics)
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> Checkpoint:
        version = state.get("format")
        if version not in READABLE:
            raise ValueError(f"checkpoint format {version!r} is not readable (expected one of {READABLE})")
        noise, finals = state.get("noise"), state.get("final_metrics")
        return cls(
            model=state["model"],
            optimizer=state["optimizer"],
            epoch=int(state["epoch"]),
            batch=int(state["batch"]),
            step=int(state["step"]),
            epoch_loss=float(state["epoch_loss"]),
            window=[float(v) for v in state["window"]],
            elapsed=float(state["elapsed"]),
            torch_rng=state.get("torch_rng"),
            noise=None if noise is None else [float(v) for v in noise],
            final_metrics=None if finals is None else {str(k): float(v) for k, v in finals.items()},
        )


def write_checkpoint(ckpt: Checkpoint, path: Path) -> None:
    torch.save(ckpt.to_state(), path)


def read_checkpoint(path: Path, device: torch.device) -> Checkpoint:
    # weights_only: a checkpoint is data, never code.
    state: dict[str, Any] = torch.load(path, map_location=device, weights_only=True)
    if isinstance(state.get("torch_rng"), torch.Tensor):
        state["torch_rng"] = state["torch_rng"].cpu()  # generator states live on the CPU
    return Checkpoint.from_state(state)
