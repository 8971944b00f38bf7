"""Per-run diagnostics that explain a verdict: how noisy BatchNorm's batch statistics are.

Small-batch BN fails because each batch's mean and variance are noisy estimates of the population's;
for each channel we measure |μ_B − μ| / σ and |σ²_B − σ²| / σ² against the layer's running estimates
μ, σ², averaged over channels, then over layers and sampled training steps."""

from __future__ import annotations

import torch

EPS = 1e-5
NOISE_SAMPLE_EVERY = 10  # steps between samples: every step would slow training for no better estimate


def noise_terms(
    x: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One BN layer's mean and variance noise for its input x (N, C, ...), averaged over channels."""
    x = x.detach().float()
    dims = [0, *range(2, x.dim())]
    mean, var = x.mean(dims), x.var(dims, unbiased=False)
    std = (running_var + EPS).sqrt()
    d_mean = ((mean - running_mean).abs() / std).mean()
    d_var = ((var - running_var).abs() / (running_var + EPS)).mean()
    return d_mean, d_var


def noise_metrics(mean_sum: float, var_sum: float, count: float) -> dict[str, float]:
    """Sums of `noise_terms` over `count` layer calls → metric values; empty if nothing was sampled."""
    if count == 0:
        return {}
    return {"bn_mean_noise": mean_sum / count, "bn_var_noise": var_sum / count}
