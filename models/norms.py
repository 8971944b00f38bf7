"""Norm layer registry: catalogue norm names -> layer constructors.

Every layer takes its channel count first and works on (N, C, *) inputs, so one
constructor serves the MLP (N, C) and the CNNs (N, C, H, W). Valid names and
parameters come from `app.core.catalogue`, which the API validates against too.

Layers draw no random numbers at construction, so adding a norm never shifts the
seeded initialization of the convolutions and linears around it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from app.core import catalogue
from models.hybrid_norms import BatchGroupNorm, SwitchableNorm
from models.running_stats import RunningStatsNorm
from models.running_stats import channel_shape as _channel_shape

NormLayer = Callable[[int], nn.Module]

__all__ = [
    "BatchNorm",
    "BatchGroupNorm",
    "BatchRenorm",
    "ChannelLayerNorm",
    "EvalBatchNorm",
    "EvoNormS0",
    "FilterResponseNorm",
    "FrozenBatchNorm",
    "GroupNorm",
    "GroupNorm1",
    "GroupNormWS",
    "InstanceNorm",
    "NoNorm",
    "NormLayer",
    "PreciseBatchNorm",
    "RMSNorm",
    "SwitchableNorm",
    "create_norm_layer",
    "get_norm_layer",
    "is_norm_layer",
    "norm_includes_activation",
    "norm_standardizes_weights",
]


def _require_spatial(layer: nn.Module, x: torch.Tensor) -> None:
    if x.dim() < 3:
        raise ValueError(f"{type(layer).__name__} needs (N, C, *spatial) inputs with spatial positions, got {x.dim()}D")


class BatchNorm(_BatchNorm):
    """BatchNorm over (N, C, *) inputs: statistics per channel over the batch and all positions.

    nn.BatchNorm1d/2d differ only in the input rank they accept; accepting any rank
    lets the same `bn` constructor serve linear and conv layers.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an (N, C, *) input with at least 2 dims, got {input.dim()}D")


class PreciseBatchNorm(BatchNorm):
    """`bn_precise`: BatchNorm whose evaluation statistics are recomputed after training.

    Trains exactly like `bn`; `models.precise_bn.recompute_bn_stats` replaces the running
    averages with the equal-weight average over `precise_samples` training samples.
    """

    def __init__(self, num_features: int, precise_samples: int = 8192, **kwargs: Any) -> None:
        super().__init__(num_features, **kwargs)
        self.precise_samples = precise_samples

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, precise_samples={self.precise_samples}"


class BatchRenorm(RunningStatsNorm):
    """`brn`: Batch Renormalization (Ioffe 2017) over (N, C, *) inputs.

    Training: y = ((x − μ_B)/σ_B · r + d)·γ + β with r = clip(σ_B/σ, 1/r_max, r_max) and
    d = clip((μ_B − μ)/σ, −d_max, d_max), r and d held constant in the backward pass;
    σ_B² is the biased batch variance, σ = sqrt(running_var + eps). The running mean and
    (unbiased) variance follow BatchNorm's momentum update, so with r_max = 1 and
    d_max = 0 the layer is exactly `bn`. Evaluation uses the running statistics.

    The bounds start at r_max = 1, d_max = 0 (plain BatchNorm) for `warmup_steps`
    training forwards, then ramp linearly to their final values over `ramp_steps`. The
    step count lives in the `num_batches_tracked` buffer, so a model restored from a
    state_dict resumes the ramp where it stopped, and the bounds are computed on the
    tensor's device (no host sync; CUDA-graph safe).
    """

    def __init__(
        self,
        num_features: int,
        r_max: float = 3.0,
        d_max: float = 5.0,
        warmup_steps: int = 0,
        ramp_steps: int = 1000,
        eps: float = 1e-5,
        momentum: float = 0.1,
    ) -> None:
        super().__init__(num_features, eps, momentum)
        self.r_max = float(r_max)
        self.d_max = float(d_max)
        self.warmup_steps = warmup_steps
        self.ramp_steps = ramp_steps

    def limits(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(r_max, d_max) for the next training forward, from the step count."""
        # float32 keeps the step exact up to 2^24 whatever the model's dtype.
        step = self.num_batches_tracked.float()
        if self.ramp_steps > 0:
            progress = ((step - self.warmup_steps) / self.ramp_steps).clamp(0.0, 1.0)
        else:
            progress = (step >= self.warmup_steps).to(step.dtype)
        dtype = self.running_mean.dtype
        return (1.0 + (self.r_max - 1.0) * progress).to(dtype), (self.d_max * progress).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError(f"expected an (N, C, *) input with at least 2 dims, got {x.dim()}D")
        shape = _channel_shape(x)
        weight, bias = self.weight.reshape(shape), self.bias.reshape(shape)
        if not self.training:
            mean, var = self.running_mean.reshape(shape), self.running_var.reshape(shape)
            return (x - mean) * torch.rsqrt(var + self.eps) * weight + bias
        count = x.numel() // x.shape[1]
        if count < 2:
            raise ValueError(f"Batch Renormalization needs more than 1 value per channel when training, got {count}")
        dims = [0, *range(2, x.dim())]
        var_b, mean_b = torch.var_mean(x, dim=dims, correction=0, keepdim=True)
        std_b = torch.sqrt(var_b + self.eps)
        with torch.no_grad():
            r_max, d_max = self.limits()
            std = torch.sqrt(self.running_var + self.eps).reshape(shape)
            r = torch.minimum(torch.maximum(std_b / std, 1.0 / r_max), r_max)
            d = torch.minimum(torch.maximum((mean_b - self.running_mean.reshape(shape)) / std, -d_max), d_max)
            self.update_running_stats(mean_b.flatten(), var_b.flatten() * (count / (count - 1)))
        return ((x - mean_b) / std_b * r + d) * weight + bias

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, r_max={self.r_max:g}, d_max={self.d_max:g}, warmup_steps={self.warmup_steps}, "
            f"ramp_steps={self.ramp_steps}, eps={self.eps}, momentum={self.momentum}"
        )


class GroupNorm(nn.GroupNorm):
    """GroupNorm whose group count is resolved by the catalogue from `groups` or `group_size`."""

    catalogue_name = "gn"

    def __init__(
        self,
        num_channels: int,
        groups: int | None = None,
        group_size: int | None = None,
        eps: float = 1e-5,
        affine: bool = True,
    ) -> None:
        num_groups = catalogue.resolve_groups(num_channels, groups, group_size, norm=self.catalogue_name)
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)


class GroupNormWS(GroupNorm):
    """`gn_ws`: GroupNorm placed after weight-standardized convolutions (see models.nets.WSConv2d).

    The layer is GroupNorm; the standardization lives in the convolution, which
    `build_model` picks from the catalogue's `standardize_weights` flag.
    """

    catalogue_name = "gn_ws"


class GroupNorm1(nn.GroupNorm):
    """LayerNorm over (C, *) of each sample, as GroupNorm with one group.

    Unlike nn.LayerNorm it keeps a per-channel (not per-element) affine, so it is
    independent of the spatial size and has the same parameters as `gn`.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__(1, num_channels, eps=eps, affine=affine)


class RMSNorm(nn.Module):
    """`rmsnorm` over (C, *) of each sample: y = x / sqrt(mean(x²) + eps) · γ, with a per-channel scale and no
    mean removed and no shift (Zhang & Sennrich 2019). On (N, C) inputs, such as the transformer's tokens
    flattened to (tokens, channels), it is torch.nn.RMSNorm(C) with the same eps."""

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.num_channels, self.eps = num_channels, eps
        self.weight = nn.Parameter(torch.ones(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(1, x.dim()))
        return x * torch.rsqrt(x.pow(2).mean(dims, keepdim=True) + self.eps) * self.weight.reshape(_channel_shape(x))

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}"


class InstanceNorm(nn.GroupNorm):
    """InstanceNorm as GroupNorm with one channel per group.

    nn.InstanceNorm2d defaults to no affine and is rank-specific; this form has the
    same per-channel affine as `gn`/`ln`, so variants differ only in the grouping.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__(num_channels, num_channels, eps=eps, affine=affine)


class ChannelAffineNorm(nn.Module):
    """Base of a norm with a per-channel affine (`weight` ones, `bias` zeros) and an `eps` (frn, evonorm_s0,
    ln_channel); its forward applies `affine` to the normalized input."""

    def __init__(self, num_channels: int, eps: float) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def affine(self, y: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        return y * self.weight.reshape(shape) + self.bias.reshape(shape)


class FilterResponseNorm(ChannelAffineNorm):
    """`frn`: Filter Response Normalization with its TLU (Singh & Krishnan 2020).

    ν² = mean of x² over the spatial positions of each sample and channel;
    y = γ·x/sqrt(ν² + |ε|) + β; z = max(y, τ) with a learned per-channel threshold τ.
    The TLU is the layer's activation: networks drop the ReLU that would follow it.
    ε is fixed (not learned). Needs spatial positions: over one value the layer
    degenerates to a sign function.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps)
        self.tau = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _require_spatial(self, x)
        shape = _channel_shape(x)
        nu2 = x.square().mean(dim=tuple(range(2, x.dim())), keepdim=True)
        y = self.affine(x * torch.rsqrt(nu2 + abs(self.eps)), shape)
        return torch.maximum(y, self.tau.reshape(shape))

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}"


class EvoNormS0(ChannelAffineNorm):
    """`evonorm_s0`: EvoNorm-S0 (Liu et al. 2020), batch-independent.

    y = x·sigmoid(v·x) / group_std(x) · γ + β, where group_std is the standard deviation
    (biased, plus eps, square-rooted) over the C/G channels and spatial positions of the
    sample's group, and v is learned per channel. The sigmoid gate is the layer's
    activation: networks drop the ReLU that would follow it. Groups resolve like `gn`.
    """

    def __init__(self, num_channels: int, groups: int | None = None, eps: float = 1e-5) -> None:
        num_groups = catalogue.resolve_groups(num_channels, groups, norm="evonorm_s0")
        super().__init__(num_channels, eps)
        self.num_groups = num_groups
        self.v = nn.Parameter(torch.ones(num_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _require_spatial(self, x)
        shape = _channel_shape(x)
        grouped = x.reshape(x.shape[0], self.num_groups, -1)
        std = torch.sqrt(grouped.var(dim=2, correction=0, keepdim=True) + self.eps)
        std = std.expand_as(grouped).reshape(x.shape)
        return self.affine(x * torch.sigmoid(self.v.reshape(shape) * x) / std, shape)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, groups={self.num_groups}, eps={self.eps}"


class ChannelLayerNorm(ChannelAffineNorm):
    """`ln_channel`: LayerNorm over the channels at each position of each sample, with a per-channel affine.

    On (N, C, H, W) it is torchvision's LayerNorm2d (ConvNeXt's stem, downsampling and head norm, and the
    block norm nn.LayerNorm applies to channels-last tensors); on (N, C) it is nn.LayerNorm(C). Parameters
    are named like nn.LayerNorm's, so ConvNeXt's pretrained norms load into it.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__(num_channels, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError(f"expected an (N, C, *) input with at least 2 dims, got {x.dim()}D")
        y = F.layer_norm(x.movedim(1, -1), (self.num_channels,), self.weight, self.bias, self.eps)
        return y.movedim(-1, 1)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, eps={self.eps}"


class FrozenBatchNorm(nn.Module):
    """`bn_frozen`: BatchNorm with fixed statistics and affine, as torchvision.ops.misc.FrozenBatchNorm2d.

    y = (x − running_mean) · rsqrt(running_var + eps) · weight + bias over (N, C, *) inputs, in training
    and evaluation alike. All four tensors are buffers (nothing here trains); a BatchNorm state dict loads
    into it (its `num_batches_tracked` is ignored). Not a _BatchNorm: it never computes batch statistics.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.weight: torch.Tensor
        self.bias: torch.Tensor
        self.running_mean: torch.Tensor
        self.running_var: torch.Tensor
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any) -> None:
        state_dict.pop(prefix + "num_batches_tracked", None)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = _channel_shape(x)
        scale = self.weight * torch.rsqrt(self.running_var + self.eps)
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(shape) + shift.reshape(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class EvalBatchNorm(RunningStatsNorm):
    """`bn_eval`: BatchNorm that always runs as in eval mode: normalized by its running statistics (never
    updated) with a trainable affine. Its state dict is BatchNorm's (weight, bias, running_mean, running_var,
    num_batches_tracked), so pretrained BatchNorm weights load unchanged. Not a _BatchNorm: it never computes
    batch statistics, so the batch-noise probe and precise BN leave it alone."""

    # The constructor is RunningStatsNorm's, BatchNorm's arguments (momentum unused: the statistics stay fixed).

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = _channel_shape(x)
        y = (x - self.running_mean.reshape(shape)) * torch.rsqrt(self.running_var + self.eps).reshape(shape)
        return y * self.weight.reshape(shape) + self.bias.reshape(shape)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


class NoNorm(nn.Identity):
    """Identity that takes (and records) the channel count, for the unnormalized baseline."""

    def __init__(self, num_channels: int) -> None:
        super().__init__()
        # Recorded so norm sites can be inspected uniformly, `none` included.
        self.num_channels = num_channels

    def extra_repr(self) -> str:
        return f"{self.num_channels}"


_NORM_LAYERS: dict[str, type[nn.Module]] = {
    "bn": BatchNorm,
    "bn_precise": PreciseBatchNorm,
    "brn": BatchRenorm,
    "gn": GroupNorm,
    "gn_ws": GroupNormWS,
    "ln": GroupNorm1,
    "rmsnorm": RMSNorm,
    "in": InstanceNorm,
    "frn": FilterResponseNorm,
    "evonorm_s0": EvoNormS0,
    "none": NoNorm,
    "ln_channel": ChannelLayerNorm,
    "bn_frozen": FrozenBatchNorm,
    "bn_eval": EvalBatchNorm,
    "switchable": SwitchableNorm,
    "bgn": BatchGroupNorm,
}
_NORM_TYPES: tuple[type[nn.Module], ...] = tuple(_NORM_LAYERS.values())


def get_norm_layer(name: str, **params: catalogue.ParamValue | None) -> NormLayer:
    """Constructor `f(num_channels) -> nn.Module` for the catalogue norm `name` with `params`.

    Raises CatalogueError for unknown names, parameters the norm does not take and
    values of the wrong type or out of range; a grouping that does not divide a layer
    raises when that layer is built.
    """
    if name not in _NORM_LAYERS:
        raise catalogue.unknown_choice("norm", name, list(catalogue.NORMS))
    # No sites yet: this checks names, types and ranges; widths are checked per layer.
    catalogue.check_variant(name, params, [])
    kwargs = {k: v for k, v in params.items() if v is not None}
    return functools.partial(_NORM_LAYERS[name], **kwargs)


def create_norm_layer(name: str, num_channels: int, **params: catalogue.ParamValue | None) -> nn.Module:
    """Norm layer `name` for `num_channels` channels."""
    return get_norm_layer(name, **params)(num_channels)


def is_norm_layer(module: nn.Module) -> bool:
    """Whether `module` is a layer built by this registry (one per catalogue norm site)."""
    return isinstance(module, _NORM_TYPES)


def norm_includes_activation(name: str) -> bool:
    """Whether norm `name` ends in its own nonlinearity (networks then drop the ReLU after it)."""
    return _norm_info(name).includes_activation


def norm_standardizes_weights(name: str) -> bool:
    """Whether the layers feeding norm `name` standardize their weights (Weight Standardization)."""
    return _norm_info(name).standardize_weights


def _norm_info(name: str) -> catalogue.NormInfo:
    info = catalogue.NORMS.get(name)
    if info is None:
        raise catalogue.unknown_choice("norm", name, list(catalogue.NORMS))
    return info
