"""The learning-rate schedule of a run: batch-size scaling, warmup, then constant or cosine.

One formula, evaluated on the host (`lr_at`, for reports and checkpoints) and elementwise on a device
tensor of step counters (`Schedule.device_lr`, inside the captured training step)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from app.core.budget import steps_per_epoch

if TYPE_CHECKING:
    from workers.run_config import RunConfig


def scaled_lr(opt: dict[str, Any], batch_size: int) -> float:
    ratio = batch_size / opt["reference_batch_size"]
    scale = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[opt["lr_scaling"]]
    return float(opt["lr"] * scale)


def lr_at(step: int, total: int, warmup: int, base: float, schedule: str) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class Schedule:
    """One batch size's step budget and learning-rate schedule (every run at that batch size shares it)."""

    batch_size: int
    per_epoch: int
    epochs: int
    warmup: int
    base_lr: float
    schedule: str

    @property
    def total(self) -> int:
        return self.per_epoch * self.epochs

    @classmethod
    def of(cls, cfg: RunConfig) -> Schedule:
        per_epoch = steps_per_epoch(cfg.budget, cfg.batch_size)
        return cls(
            cfg.batch_size,
            per_epoch,
            cfg.budget["epochs"],
            round(cfg.optimizer["warmup_epochs"] * per_epoch),
            scaled_lr(cfg.optimizer, cfg.batch_size),
            cfg.optimizer["schedule"],
        )

    def lr(self, step: int) -> float:
        """The rate of step `step` (0-based)."""
        return lr_at(step, self.total, self.warmup, self.base_lr, self.schedule)

    def lr_after(self, steps_done: int) -> float:
        """The rate of the last step taken (the base rate before any): what a run reports as `lr`."""
        return self.base_lr if steps_done == 0 else self.lr(steps_done - 1)

    def device_lr(self, step: torch.Tensor) -> torch.Tensor:
        """`lr_at` elementwise over a device tensor of step counters, with no host read (float32)."""
        s = step.double()
        base, warmup = self.base_lr, self.warmup
        if self.schedule == "constant":
            after = torch.full_like(s, base)
        else:
            progress = (s - warmup) / max(1, self.total - warmup)
            after = base * 0.5 * (1.0 + torch.cos(math.pi * progress))
        lr = torch.where(s < warmup, base * (s + 1) / max(warmup, 1), after) if warmup > 0 else after
        return lr.float()
