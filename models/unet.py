"""U-Net (Ronneberger et al. 2015) for semantic segmentation, with the variant's norm after every 3×3 convolution.

`levels` down-samplings (2×2 max-pool) between `levels + 1` double-conv blocks of widths `width`·2^i; the decoder
upsamples bilinearly to the skip's size (any input size works, odd ones too), concatenates the skip and applies a
double conv; a 1×1 convolution gives per-pixel class logits (N, K, H, W). Norm sites, in build order, are
`app.core.catalogue.norm_sites("unet", ...)`: enc{i}.norm{1,2}, then dec{i}.norm{1,2} from the deepest decoder up.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from app.core import catalogue
from models.nets import WSConv2d
from models.norms import NormLayer, get_norm_layer

ActLayer = Callable[[], nn.Module]

__all__ = ["UNet", "build_unet"]


class DoubleConv(nn.Module):
    """conv3×3 → norm → act → conv3×3 → norm → act."""

    def __init__(self, c_in: int, c_out: int, norm_layer: NormLayer, conv: type[nn.Conv2d], act: ActLayer) -> None:
        super().__init__()
        # No bias: a norm follows each conv (kept bias-free under `none` too, so every variant has the same weights).
        self.conv1, self.norm1, self.act1 = conv(c_in, c_out, 3, padding=1, bias=False), norm_layer(c_out), act()
        self.conv2, self.norm2, self.act2 = conv(c_out, c_out, 3, padding=1, bias=False), norm_layer(c_out), act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.norm1(self.conv1(x)))
        return self.act2(self.norm2(self.conv2(x)))


class UNet(nn.Module):
    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        width: int,
        levels: int,
        norm_layer: NormLayer,
        *,
        act: ActLayer,
        standardize: bool = False,
    ) -> None:
        super().__init__()
        widths = catalogue.unet_widths(width, levels)
        conv = WSConv2d if standardize else nn.Conv2d  # gn_ws: the convs feeding a norm are weight-standardized
        self.enc = nn.ModuleList()
        prev = in_channels
        for w in widths:
            self.enc.append(DoubleConv(prev, w, norm_layer, conv, act))
            prev = w
        # Decoder i merges level i's skip (widths[i]) with the upsampled level i+1; built deepest first, so the
        # norm layers are created in the catalogue's site order.
        self.dec = nn.ModuleDict()
        for i in reversed(range(levels)):
            self.dec[str(i)] = DoubleConv(widths[i + 1] + widths[i], widths[i], norm_layer, conv, act)
        for m in self.modules():  # He et al. (2015) init, as the other conv networks; the head keeps PyTorch's
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        self.head = nn.Conv2d(widths[0], num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.enc):
            if i:
                x = F.max_pool2d(x, 2, ceil_mode=True)
            x = block(x)
            skips.append(x)
        for i in reversed(range(len(self.enc) - 1)):
            skip = skips[i]
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = self.dec[str(i)](torch.cat([x, skip], dim=1))
        return self.head(x)


def build_unet(
    input_shape: tuple[int, ...],
    num_classes: int,
    norm: str,
    norm_params: catalogue.NormParams,
    *,
    width: int,
    levels: int,
) -> UNet:
    """The U-Net for (C, H, W) images with the variant's norm (checked against its sites) at every site."""
    if len(input_shape) != 3:
        raise catalogue.CatalogueError(f"unet needs (C, H, W) image inputs; got shape {tuple(input_shape)}")
    catalogue.check_variant(norm, norm_params, catalogue.norm_sites("unet", width=width, levels=levels))
    info = catalogue.NORMS[norm]
    act: ActLayer = nn.Identity if info.includes_activation else functools.partial(nn.ReLU, inplace=True)
    return UNet(
        input_shape[0],
        num_classes,
        width,
        levels,
        get_norm_layer(norm, **norm_params),
        act=act,
        standardize=info.standardize_weights,
    )
