"""The fixed training budget every run of a job shares (pure arithmetic, no torch)."""

from __future__ import annotations

import math


def holdout_size(num_samples: int, fraction: float) -> int:
    """Validation samples carved from the training split when none was uploaded."""
    return max(1, int(round(num_samples * fraction)))


def resolve_budget(train_size: int, val_size: int, epochs: int, batch_sizes: list[int]) -> dict[str, int]:
    """Samples per epoch are a multiple of every batch size, so every run consumes exactly the same
    samples in the same order (the remainder of each shuffled epoch is dropped, as with drop_last)."""
    common = math.lcm(*batch_sizes)
    per_epoch = (train_size // common) * common if common <= train_size else train_size
    return {
        "epochs": epochs,
        "train_size": train_size,
        "val_size": val_size,
        "samples_per_epoch": per_epoch,
        "total_samples": per_epoch * epochs,
    }


def steps_per_epoch(budget: dict[str, int], batch_size: int) -> int:
    return budget["samples_per_epoch"] // batch_size


def total_steps(budget: dict[str, int], batch_size: int) -> int:
    return steps_per_epoch(budget, batch_size) * budget["epochs"]
