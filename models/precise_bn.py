"""Precise BatchNorm statistics (Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm").

After training, a `bn_precise` model's running averages are replaced by the equal-weight
average of per-batch statistics over a fixed number of training samples, which estimates
the population statistics better than the exponential moving average does.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from models.norms import PreciseBatchNorm

__all__ = ["precise_bn_samples", "recompute_bn_stats"]


def precise_bn_samples(model: nn.Module) -> int | None:
    """How many training samples `recompute_bn_stats` should see for `model`, or None
    when the model has no `bn_precise` layers (nothing to recompute)."""
    counts = [m.precise_samples for m in model.modules() if isinstance(m, PreciseBatchNorm)]
    # One norm per model, so every layer carries the same count.
    return max(counts) if counts else None


@torch.no_grad()
def recompute_bn_stats(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Set every BatchNorm layer's running mean and variance to the equal-weight average
    of the per-batch mean and unbiased variance over `batches`; return the samples used.

    `batches` are model inputs, already preprocessed and on the model's device. The model
    runs in train mode without gradients; each layer's momentum is set to 1/(k+1) for the
    k-th batch after its running statistics are reset, which turns BatchNorm's
    exponential average into a cumulative one (as fvcore's `update_bn_stats` does).
    Afterwards momentum, `num_batches_tracked` and every module's train/eval mode are
    restored. A model without BatchNorm layers is left untouched and 0 is returned
    without reading `batches`; an empty `batches` raises ValueError, and on any error
    the previous statistics are put back.
    """
    layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
    if not layers:
        return 0
    modes = [(m, m.training) for m in model.modules()]
    momenta = [m.momentum for m in layers]
    saved = [
        (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())  # type: ignore[union-attr]
        for m in layers
    ]
    samples = 0
    try:
        model.train()
        for m in layers:
            m.reset_running_stats()
        for k, x in enumerate(batches):
            for m in layers:
                m.momentum = 1.0 / (k + 1)
            model(x)
            samples += x.shape[0]
        if samples == 0:
            raise ValueError("recompute_bn_stats needs at least one batch of training inputs")
    except BaseException:
        for m, (mean, var, _) in zip(layers, saved, strict=True):
            m.running_mean.copy_(mean)  # type: ignore[union-attr]
            m.running_var.copy_(var)  # type: ignore[union-attr]
        raise
    finally:
        for m, momentum, (_, _, tracked) in zip(layers, momenta, saved, strict=True):
            m.momentum = momentum
            m.num_batches_tracked.copy_(tracked)  # type: ignore[union-attr]
        for module, training in modes:
            module.training = training
    return samples
