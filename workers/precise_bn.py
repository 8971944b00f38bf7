"""The precise-BN plan of a `bn_precise` run (Wu & Johnson 2021): after each epoch its running
statistics are replaced by the average of per-batch statistics over a fixed number of training samples,
in batches of the run's size, without augmentation. Which samples, and how many batches, live here."""

from __future__ import annotations

import torch

from models import create_norm_layer
from workers.data import epoch_order
from workers.run_config import RunConfig

ORDER_SEED_OFFSET = 1_000_003  # its own sample order, apart from the training order of the same seed


def precise_samples_of(cfg: RunConfig) -> int | None:
    """The number of samples a `bn_precise` run averages over (None for every other norm)."""
    if cfg.norm != "bn_precise":
        return None
    layer = create_norm_layer("bn_precise", 1, **cfg.norm_params)
    return int(getattr(layer, "precise_samples"))  # noqa: B009 (a PreciseBatchNorm attribute)


def precise_bn_batches(cfg: RunConfig, kind: str) -> int:
    """How many batches of the run's size the refresh averages; 0 when it does not refresh."""
    wanted = precise_samples_of(cfg)
    if wanted is None:
        return 0
    b = cfg.batch_size
    n = min(wanted, cfg.budget["train_size"])
    n -= n % b
    if n < b or b < 2 and kind == "tabular":  # a tabular batch of one has no batch statistics
        return 0
    return n // b


def precise_bn_order(cfg: RunConfig, epoch: int, batches: int) -> torch.Tensor:
    """The training-sample indices of the refresh after epoch `epoch` (0-based), batch after batch."""
    return epoch_order(cfg.seed + ORDER_SEED_OFFSET, epoch, cfg.budget["train_size"], batches * cfg.batch_size)
