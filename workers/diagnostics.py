"""Per-run diagnostics that explain a verdict: how noisy BatchNorm's batch statistics are.

Small-batch BN fails because each batch's mean and variance are noisy estimates of the
population's; `BatchStatNoise` measures that noise against the layer's running estimates.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

EPS = 1e-5


class BatchStatNoise:
    """Forward pre-hooks on every BatchNorm-like layer, active only on sampled steps (to stay cheap).

    For each channel: |μ_B − μ| / σ and |σ²_B − σ²| / σ², with μ, σ² the running estimates, averaged
    over channels, layers and sampled steps.
    """

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
        self.active = False
        self.mean_sum: torch.Tensor | None = None
        self.var_sum: torch.Tensor | None = None
        self.count = 0
        self.handles = [m.register_forward_pre_hook(self._hook) for m in self.layers]

    def __bool__(self) -> bool:
        return bool(self.layers)

    @torch.no_grad()
    def _hook(self, module: _BatchNorm, inputs: tuple[Any, ...]) -> None:
        if not (self.active and module.training and module.running_mean is not None and module.running_var is not None):
            return
        x = inputs[0].detach().float()
        dims = [0, *range(2, x.dim())]
        mean, var = x.mean(dims), x.var(dims, unbiased=False)
        std = (module.running_var + EPS).sqrt()
        d_mean = ((mean - module.running_mean).abs() / std).mean()
        d_var = ((var - module.running_var).abs() / (module.running_var + EPS)).mean()
        self.mean_sum = d_mean if self.mean_sum is None else self.mean_sum + d_mean
        self.var_sum = d_var if self.var_sum is None else self.var_sum + d_var
        self.count += 1

    def pop(self) -> dict[str, float]:
        """Averages since the last pop, as metric values; empty if nothing was sampled."""
        if self.count == 0 or self.mean_sum is None or self.var_sum is None:
            return {}
        out = {"bn_mean_noise": float(self.mean_sum) / self.count, "bn_var_noise": float(self.var_sum) / self.count}
        self.mean_sum = self.var_sum = None
        self.count = 0
        return out

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
