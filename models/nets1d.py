"""Networks for 1-D signals (N, C, L): a small 1-D CNN and a 1-D ResNet, the 2-D ones' layouts with 1-D convolutions.

The norm layers are the zoo's, which work on (N, C, *) inputs of any rank: `bn` is BatchNorm1d's arithmetic,
`gn`/`ln`/`in` GroupNorm's over channels and positions, and so on. Norm sites are created in the order
`app.core.catalogue.norm_sites` lists them (the same as `cnn` and `resnet`), convolutions are created in a fixed
order whatever the norm, so one seed gives every variant the same initial weights.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from app.core import catalogue
from models.nets import standardize_weight
from models.norms import NormLayer

__all__ = ["BasicBlock1d", "ResNet1d", "SmallCNN1d", "WSConv1d"]

ActLayer = Callable[[], nn.Module]
_relu: ActLayer = functools.partial(nn.ReLU, inplace=True)


class WSConv1d(nn.Conv1d):
    """Conv1d with a weight-standardized kernel (`gn_ws`), as models.nets.WSConv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, standardize_weight(self.weight), self.bias)


def _conv(in_channels: int, out_channels: int, stride: int, conv: type[nn.Conv1d]) -> nn.Conv1d:
    # Bias-free as the 2-D networks' convolutions: a norm follows every one.
    k = catalogue.KERNEL_1D
    return conv(in_channels, out_channels, k, stride=stride, padding=k // 2, bias=False)


def _init_convs(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv1d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class SmallCNN1d(nn.Module):
    """Three conv → norm → ReLU stages (stride 2 from stage 2) → global average pool → Linear."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        width: int,
        norm_layer: NormLayer,
        *,
        conv: type[nn.Conv1d] = nn.Conv1d,
        act_layer: ActLayer = _relu,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        prev = in_channels
        for i, w in enumerate(catalogue.stage_widths(width)):
            layers += [_conv(prev, w, 1 if i == 0 else 2, conv), norm_layer(w), act_layer()]
            prev = w
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(prev, num_classes)
        _init_convs(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock1d(nn.Module):
    """conv → norm1 → act → conv → norm2, plus the shortcut (a 1×1 projection when the shape changes), then ReLU."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        norm_layer: NormLayer,
        *,
        conv: type[nn.Conv1d] = nn.Conv1d,
        act_layer: ActLayer = _relu,
    ) -> None:
        super().__init__()
        self.conv1 = _conv(in_channels, out_channels, stride, conv)
        self.norm1 = norm_layer(out_channels)
        self.act1 = act_layer()
        self.conv2 = _conv(out_channels, out_channels, 1, conv)
        self.norm2 = norm_layer(out_channels)
        self.act2 = nn.ReLU(inplace=True)
        # No norm on the projection, as in models.nets.BasicBlock: the catalogue's sites are the contract.
        self.shortcut: nn.Conv1d | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv1d(in_channels, out_channels, 1, stride=stride, bias=False)

    def zero_init_last(self) -> None:
        # The residual branch starts at zero (Goyal et al. 2017), as models.nets.BasicBlock's.
        weight = getattr(self.norm2, "weight", None)
        if isinstance(weight, torch.Tensor):
            with torch.no_grad():
                weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.shortcut is None else self.shortcut(x)
        x = self.act1(self.norm1(self.conv1(x)))
        x = self.norm2(self.conv2(x))
        return self.act2(x + shortcut)


class ResNet1d(nn.Module):
    """1-D ResNet: depth 6n+2, a stem and three stages of n BasicBlock1d (stride 2 at stages 2 and 3)."""

    def __init__(
        self,
        depth: int,
        width: int,
        in_channels: int,
        num_classes: int,
        norm_layer: NormLayer,
        zero_init_last: bool = True,
        *,
        conv: type[nn.Conv1d] = nn.Conv1d,
        act_layer: ActLayer = _relu,
    ) -> None:
        super().__init__()
        blocks_per_stage = catalogue.resnet_blocks_per_stage(depth)
        self.stem = nn.Sequential(_conv(in_channels, width, 1, conv), norm_layer(width), act_layer())
        stages: list[nn.Module] = []
        prev = width
        for i, w in enumerate(catalogue.stage_widths(width)):
            blocks = []
            for b in range(blocks_per_stage):
                stride = 2 if i > 0 and b == 0 else 1
                blocks.append(BasicBlock1d(prev, w, stride, norm_layer, conv=conv, act_layer=act_layer))
                prev = w
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool1d(1)
        self.head = nn.Linear(prev, num_classes)
        _init_convs(self)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, BasicBlock1d):
                    m.zero_init_last()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


def build_1d(
    arch: str,
    in_channels: int,
    num_classes: int,
    norm_layer: NormLayer,
    *,
    depth: int,
    width: int,
    zero_init_last: bool,
    standardize_weights: bool,
    act_layer: ActLayer,
) -> nn.Module:
    """`cnn1d` or `resnet1d` (models.nets.build_model checks the choices and resolves the norm)."""
    conv = WSConv1d if standardize_weights else nn.Conv1d
    if arch == "cnn1d":
        return SmallCNN1d(in_channels, num_classes, width, norm_layer, conv=conv, act_layer=act_layer)
    return ResNet1d(
        depth,
        width,
        in_channels,
        num_classes,
        norm_layer,
        zero_init_last=zero_init_last,
        conv=conv,
        act_layer=act_layer,
    )
