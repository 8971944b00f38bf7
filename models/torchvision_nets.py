"""torchvision's ImageNet networks (resnet18, resnet50, mobilenet_v3_small, convnext_tiny) built by torchvision's
own builders with the zoo's norms plugged in through `norm_layer=`, plus the pieces fine-tuning needs.

Module names are torchvision's, so an uploaded torchvision state dict (safetensors) maps key for key; the norm
sites are `app.core.catalogue.norm_sites(arch)` in build order. What changes from torchvision's defaults, and why:
- every run is deterministic per seed and packable under `torch.func.vmap`: MobileNet's dropout and ConvNeXt's
  stochastic depth (the only random layers) are off;
- ConvNeXt's block norm runs on the NCHW tensor before the block's permute to channels-last (same arithmetic
  for `ln_channel`, its own LayerNorm), so every zoo norm sees (N, C, H, W) and its state-dict keys stay put;
- images with other than 3 channels get a stem convolution for their channel count (pretrained RGB filters are
  summed for grayscale: `adapt_first_conv`);
- MobileNetV3's BatchNorm-family norms keep its eps 1e-3 and momentum 0.01.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from torchvision import models as tvm
from torchvision.models.convnext import CNBlock

from app.core import catalogue
from models.nets import WSConv2d
from models.norms import NormLayer, get_norm_layer, is_norm_layer

__all__ = ["NormFirstCNBlock", "build_torchvision", "first_conv_name", "head_module", "init_head"]

# (eps, momentum) torchvision gives each network's BatchNorm, where they differ from BatchNorm's defaults.
_BN_SETTINGS: dict[str, dict[str, float]] = {"mobilenet_v3_small": {"eps": 1e-3, "momentum": 0.01}}
_FIRST_CONV = {
    "resnet18": "conv1",
    "resnet50": "conv1",
    "mobilenet_v3_small": "features.0.0",
    "convnext_tiny": "features.0.0",
}


class NormFirstCNBlock(CNBlock):
    """ConvNeXt's block with its norm applied before the permute to channels-last: dwconv → norm (NCHW) →
    permute → Linear → GELU → Linear → permute back, × layer scale, plus the input. The same modules (and
    state-dict keys) as CNBlock; for a channel LayerNorm the same arithmetic."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        dwconv, _, norm, fc1, act, fc2, _ = self.block
        x = norm(dwconv(input)).permute(0, 2, 3, 1)
        x = fc2(act(fc1(x))).permute(0, 3, 1, 2)
        return self.stochastic_depth(self.layer_scale * x) + input


def first_conv_name(arch: str) -> str:
    """The module name of the network's first convolution (the one that sees the image channels)."""
    return _FIRST_CONV[arch]


def head_module(model: nn.Module, arch: str) -> nn.Linear:
    head = model.get_submodule(catalogue.ARCHS[arch].head)
    assert isinstance(head, nn.Linear)
    return head


@torch.no_grad()
def init_head(head: nn.Linear, arch: str, generator: torch.Generator) -> None:
    """The classifier's initialisation as torchvision gives it for `arch`, drawn from `generator`."""
    if arch in ("resnet18", "resnet50"):  # nn.Linear's own default
        bound = 1 / head.in_features**0.5
        head.weight.uniform_(-bound, bound, generator=generator)
        head.bias.uniform_(-bound, bound, generator=generator)
    elif arch == "mobilenet_v3_small":
        head.weight.normal_(0.0, 0.01, generator=generator)
        head.bias.zero_()
    else:  # convnext: truncated normal, std 0.02 (within ±2)
        nn.init.trunc_normal_(head.weight, std=0.02, generator=generator)
        head.bias.zero_()


def _norm_layer(arch: str, norm: str, norm_params: catalogue.NormParams) -> NormLayer:
    layer = get_norm_layer(norm, **norm_params)
    settings = _BN_SETTINGS.get(arch) if norm in catalogue.BN_FAMILY else None
    if settings:
        kwargs: dict[str, Any] = dict(settings)
        if norm == "bn_frozen":
            kwargs.pop("momentum")
        return functools.partial(layer, **kwargs)
    return layer


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _set_in_channels(model: nn.Module, arch: str, channels: int) -> None:
    """A stem convolution for `channels` image channels in place of torchvision's RGB one, initialised as
    torchvision initialises that layer."""
    name = _FIRST_CONV[arch]
    old = model.get_submodule(name)
    assert isinstance(old, nn.Conv2d)
    conv = type(old)(
        channels,
        old.out_channels,
        old.kernel_size,  # type: ignore[arg-type]
        stride=old.stride,  # type: ignore[arg-type]
        padding=old.padding,  # type: ignore[arg-type]
        bias=old.bias is not None,
    )
    if arch == "convnext_tiny":
        nn.init.trunc_normal_(conv.weight, std=0.02)
    elif arch == "mobilenet_v3_small":
        nn.init.kaiming_normal_(conv.weight, mode="fan_out")
    else:
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    _replace(model, name, conv)


def build_torchvision(
    arch: str, input_shape: tuple[int, ...], num_classes: int, norm: str, norm_params: catalogue.NormParams
) -> nn.Module:
    """torchvision's `arch` with norm `norm` at every norm site, for (C, H, W) inputs and `num_classes` classes.
    Raises CatalogueError (the catalogue's messages) for choices that cannot be built."""
    sites = catalogue.norm_sites(arch, input_shape=input_shape)
    catalogue.check_variant(norm, norm_params, sites, arch=arch)
    norm_layer = _norm_layer(arch, norm, norm_params)
    model: nn.Module
    if arch == "resnet18":
        model = tvm.resnet18(weights=None, num_classes=num_classes, norm_layer=norm_layer)
    elif arch == "resnet50":
        model = tvm.resnet50(weights=None, num_classes=num_classes, norm_layer=norm_layer)
    elif arch == "mobilenet_v3_small":
        model = tvm.mobilenet_v3_small(weights=None, num_classes=num_classes, norm_layer=norm_layer, dropout=0.0)
        for name, m in list(model.named_modules()):
            if isinstance(m, nn.Dropout):  # p=0 already; Identity keeps vmap's randomness check out of the way
                _replace(model, name, nn.Identity())
    elif arch == "convnext_tiny":
        block = functools.partial(NormFirstCNBlock, norm_layer=norm_layer)
        model = tvm.convnext_tiny(
            weights=None, num_classes=num_classes, norm_layer=norm_layer, block=block, stochastic_depth_prob=0.0
        )
    else:
        raise catalogue.unknown_choice("torchvision architecture", arch, sorted(_FIRST_CONV))
    if input_shape[0] != 3:
        _set_in_channels(model, arch, input_shape[0])
    if catalogue.NORMS[norm].standardize_weights:
        # Every convolution of a ResNet feeds a norm (the catalogue refuses WS elsewhere): same parameters,
        # standardized at each forward.
        for m in model.modules():
            if type(m) is nn.Conv2d:
                m.__class__ = WSConv2d
    built = [name for name, m in model.named_modules() if is_norm_layer(m)]
    expected = [s.layer for s in sites]
    if built != expected:  # the catalogue's torch-free description must be the network torchvision builds
        raise RuntimeError(f"{arch}: norm layers {built} differ from the catalogue's sites {expected}")
    return model


def adapt_first_conv(weight: torch.Tensor, channels: int) -> torch.Tensor:
    """A pretrained first-convolution weight (out, 3, k, k) for `channels` image channels: summed over RGB for
    grayscale (a gray image is R = G = B, so the response is the RGB filter's on it); unchanged for 3."""
    if weight.shape[1] == channels:
        return weight
    if channels == 1:
        return weight.sum(dim=1, keepdim=True)
    raise ValueError(
        f"the uploaded first convolution takes {weight.shape[1]} image channels; the dataset has {channels}"
    )
