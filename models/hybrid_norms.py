"""Hybrid norms that mix batch and per-sample statistics: Switchable Normalization and Batch Group Normalization.

Both work on (N, C, *) inputs of any rank and inside the pack engine (torch.func.vmap over functional_call):
running statistics are updated out of place and copied into their buffers (models.running_stats), and every
branch depends on shapes only, never on values.
"""

from __future__ import annotations

import torch
from torch import nn

from app.core import catalogue
from models.running_stats import RunningStatsNorm
from models.running_stats import channel_shape as _channel_shape

__all__ = ["MIX_STATISTICS", "BatchGroupNorm", "SwitchableNorm", "switchable_mixtures"]

# The order of Switchable Normalization's mixing logits, as in the official code (mean_weight, var_weight).
MIX_STATISTICS = ("in", "ln", "bn")


def _check_rank(x: torch.Tensor) -> None:
    if x.dim() < 2:
        raise ValueError(f"expected an (N, C, *) input with at least 2 dims, got {x.dim()}D")


class SwitchableNorm(RunningStatsNorm):
    """`switchable`: Switchable Normalization (Luo et al. 2019, "Differentiable Learning-to-Normalize via
    Switchable Normalization").

    y = (x − Σ_k w_k μ_k) / sqrt(Σ_k w'_k σ²_k + eps) · γ + β over k ∈ {IN, LN, BN}, with w = softmax(mean_weight)
    and w' = softmax(var_weight) learned per layer (separately for means and variances, both initialised to
    equal shares), and a per-channel affine γ, β. μ_IN, σ²_IN: per sample and channel over the positions;
    μ_LN, σ²_LN: per sample over channels and positions; μ_BN, σ²_BN: per channel over the batch and positions.
    Variances are the biased ones of the paper's equations (the official code's IN variance is unbiased).

    The BN part keeps running statistics for evaluation, updated as BatchNorm's are (momentum 0.1 and the
    unbiased variance, not the official code's momentum 0.997, so that over this service's short budgets SN's
    BN part is averaged as `bn`'s is); evaluation mixes them in place of the batch's.

    Batch 1 in training: BN's statistics over one sample are that sample's per-channel statistics over its
    positions, exactly IN's (as in the paper's and the official code's formulas): BN and IN then receive the
    same gradient, so from equal shares their weights stay equal, and only evaluation (running statistics)
    tells them apart. Flat (N, C) inputs have no positions, so no IN statistics: as the official
    SwitchNorm1d, the layer mixes LN and BN only (IN's weight is 0 there). Training needs more than one value
    per channel for BN's statistics, as BatchNorm does.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__(num_features, eps, momentum)
        self.mean_weight = nn.Parameter(torch.ones(len(MIX_STATISTICS)))
        self.var_weight = nn.Parameter(torch.ones(len(MIX_STATISTICS)))
        # Whether the last input had positions (None: no forward yet); read by `switchable_mixtures`.
        self.spatial: bool | None = None

    def mixtures(self, spatial: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean shares, variance shares) over MIX_STATISTICS; IN's share is 0 for flat inputs."""
        return _shares(self.mean_weight, spatial), _shares(self.var_weight, spatial)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_rank(x)
        shape = _channel_shape(x)
        n, c = x.shape[:2]
        spatial = x.dim() > 2
        self.spatial = spatial
        flat = x.reshape(n, c, -1)  # (N, C, positions); one position for (N, C) inputs
        var_in, mean_in = torch.var_mean(flat, dim=2, correction=0, keepdim=True)
        var_ln, mean_ln = torch.var_mean(flat, dim=(1, 2), correction=0, keepdim=True)
        if self.training:
            count = n * flat.shape[2]
            if count < 2:
                raise ValueError(
                    f"Switchable Normalization needs more than 1 value per channel when training, got {count}"
                )
            var_bn, mean_bn = torch.var_mean(flat, dim=(0, 2), correction=0, keepdim=True)
            with torch.no_grad():
                self.update_running_stats(mean_bn.flatten(), var_bn.flatten() * (count / (count - 1)))
        else:
            mean_bn, var_bn = self.running_mean.reshape(1, c, 1), self.running_var.reshape(1, c, 1)
        w_mean, w_var = self.mixtures(spatial)
        mean = w_mean[0] * mean_in + w_mean[1] * mean_ln + w_mean[2] * mean_bn
        var = w_var[0] * var_in + w_var[1] * var_ln + w_var[2] * var_bn
        y = ((flat - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape)
        return y * self.weight.reshape(shape) + self.bias.reshape(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}"


def _shares(logits: torch.Tensor, spatial: bool) -> torch.Tensor:
    if spatial:
        return torch.softmax(logits, 0)
    # No IN on flat inputs: softmax over LN and BN, IN's share a constant 0 (no host data: CUDA-graph safe).
    return torch.cat([torch.zeros_like(logits[:1]), torch.softmax(logits[1:], 0)])


def switchable_mixtures(model: nn.Module, params: dict[str, torch.Tensor] | None = None) -> dict[str, dict[str, float]]:
    """Per Switchable Normalization layer of `model` (by module name): the learned shares, as
    {"mean_bn": ..., "mean_in": ..., "mean_ln": ..., "var_bn": ..., ...}. `params` (name → tensor) replaces
    the module's own parameters, e.g. one run's slice of a packed group."""
    out: dict[str, dict[str, float]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, SwitchableNorm):
            continue
        spatial = module.spatial is not False
        prefix = f"{name}." if name else ""
        shares: dict[str, float] = {}
        for kind in ("mean", "var"):
            logits = params[f"{prefix}{kind}_weight"] if params is not None else getattr(module, f"{kind}_weight")
            values = _shares(logits.detach().float().cpu(), spatial).tolist()
            shares |= {f"{kind}_{stat}": float(v) for stat, v in zip(MIX_STATISTICS, values, strict=True)}
        out[name] = shares
    return out


class BatchGroupNorm(RunningStatsNorm):
    """`bgn`: Batch Group Normalization (Zhou et al. 2020, "Batch Group Normalization").

    The channels (with their positions) are split into `groups` groups, and each group is normalized with
    one mean and (biased) variance over the whole batch and the group's channels and positions:
    statistics over (N, C/G, *), shared by the batch, so more values per statistic than BatchNorm's at small
    batches. `groups` = C is BatchNorm; at batch 1 it is GroupNorm with `groups` groups. Groups resolve like
    `gn`'s (default 32, capped by the channel count). A per-channel affine follows.

    Running statistics, for evaluation, follow BatchNorm's momentum update (the unbiased group variance). They
    are kept per channel, each channel holding its group's values, so the layer's state has BatchNorm's
    shapes; evaluation normalizes each channel by them.
    """

    def __init__(self, num_features: int, groups: int | None = None, eps: float = 1e-5, momentum: float = 0.1) -> None:
        num_groups = catalogue.resolve_groups(num_features, groups, norm="bgn")
        super().__init__(num_features, eps, momentum)
        self.num_groups = num_groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_rank(x)
        shape = _channel_shape(x)
        n, c, g = x.shape[0], x.shape[1], self.num_groups
        if not self.training:
            mean, var = self.running_mean.reshape(shape), self.running_var.reshape(shape)
            return (x - mean) * torch.rsqrt(var + self.eps) * self.weight.reshape(shape) + self.bias.reshape(shape)
        grouped = x.reshape(n, g, -1)  # (N, G, C/G · positions)
        count = n * grouped.shape[2]
        if count < 2:
            raise ValueError(f"Batch Group Normalization needs more than 1 value per group when training, got {count}")
        var, mean = torch.var_mean(grouped, dim=(0, 2), correction=0, keepdim=True)  # (1, G, 1)
        with torch.no_grad():
            per_channel = c // g
            self.update_running_stats(
                mean.flatten().repeat_interleave(per_channel),
                (var.flatten() * (count / (count - 1))).repeat_interleave(per_channel),
            )
        y = ((grouped - mean) * torch.rsqrt(var + self.eps)).reshape(x.shape)
        return y * self.weight.reshape(shape) + self.bias.reshape(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, groups={self.num_groups}, eps={self.eps}, momentum={self.momentum}"
