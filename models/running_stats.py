"""The state BatchNorm keeps, for the zoo's norms that keep it too (`brn`, `bn_eval`, `switchable`, `bgn`).

A per-channel affine and running statistics under BatchNorm's names and shapes (so a BatchNorm state dict loads
into them), BatchNorm's momentum update of the statistics, and the per-channel broadcast shape every norm uses.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RunningStatsNorm", "channel_shape"]


def channel_shape(x: torch.Tensor) -> tuple[int, ...]:
    """Shape that broadcasts a per-channel (C,) tensor against an (N, C, *) input."""
    return (1, x.shape[1]) + (1,) * (x.dim() - 2)


class RunningStatsNorm(nn.Module):
    """Base of a norm with BatchNorm's parameters and buffers: weight, bias, running_mean, running_var and
    num_batches_tracked (the training step count)."""

    running_mean: torch.Tensor
    running_var: torch.Tensor
    num_batches_tracked: torch.Tensor

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def update_running_stats(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """BatchNorm's momentum update by a batch's per-channel mean and unbiased variance, and one more step.

        Out-of-place lerp + copy_ (the values of lerp_): torch.func.vmap has a batching rule for it, so packed
        runs (workers.packing) update their stacked statistics in one kernel. The batch statistics take the
        buffers' dtype (bf16 under autocast, float32 buffers)."""
        dtype = self.running_mean.dtype
        self.running_mean.copy_(torch.lerp(self.running_mean, mean.to(dtype), self.momentum))
        self.running_var.copy_(torch.lerp(self.running_var, var.to(dtype), self.momentum))
        self.num_batches_tracked.add_(1)
