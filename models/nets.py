"""Networks for the norm benchmark: MLP, small CNN and CIFAR-style ResNet, the conv ones on images or 1-D signals.

Each network takes a resolved `norm_layer(num_channels)` and creates its norm layers
in the order `app.core.catalogue.norm_sites` lists them. Conv/linear parameter shapes and
creation order do not depend on the norm, and norm layers draw no random numbers, so
the same seed gives the same conv/linear weights for every norm variant.

Two catalogue flags change the layers around the norms, never their parameters:
`standardize_weights` (`gn_ws`) swaps each conv feeding a norm (and each MLP hidden
linear) for its weight-standardized subclass, and `includes_activation` (`frn`,
`evonorm_s0`) drops the ReLU right after each norm because the layer ends in its own
nonlinearity. The ReLU after a residual addition stays: it follows the addition, not
a norm, so a block's second norm applies its own activation to the residual branch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from app.core import catalogue
from models.norms import NormLayer, get_norm_layer

__all__ = [
    "IMAGE",
    "MLP",
    "SIGNAL",
    "BasicBlock",
    "ConvLayers",
    "ResNet",
    "SmallCNN",
    "Spatial",
    "WSConv1d",
    "WSConv2d",
    "WSLinear",
    "build_model",
    "standardize_weight",
]

ActLayer = Callable[[], nn.Module]
_relu: ActLayer = functools.partial(nn.ReLU, inplace=True)

WS_EPS = 1e-5


def standardize_weight(weight: torch.Tensor, eps: float = WS_EPS) -> torch.Tensor:
    """Weight Standardization (Qiao et al. 2019): each output channel's weights (dim 0)
    shifted and scaled to zero mean and unit (biased) variance over all other dims."""
    dims = tuple(range(1, weight.dim()))
    var, mean = torch.var_mean(weight, dim=dims, correction=0, keepdim=True)
    return (weight - mean) / torch.sqrt(var + eps)


class WSConv2d(nn.Conv2d):
    """Conv2d that convolves with its standardized weight; the stored parameter is unchanged,
    so shapes, state_dict keys and seeded init are those of nn.Conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, standardize_weight(self.weight), self.bias)


class WSLinear(nn.Linear):
    """Linear with a standardized weight (per output feature, over the input features)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, standardize_weight(self.weight), self.bias)


@dataclass(frozen=True)
class Spatial:
    """What a conv network changes between images (N, C, H, W) and 1-D signals (N, C, L); the layouts are one."""

    conv: type[nn.Conv1d] | type[nn.Conv2d]  # plain: shortcut projections, and every conv without gn_ws
    ws_conv: type[nn.Conv1d] | type[nn.Conv2d]  # weight-standardized, for the convs feeding a norm under gn_ws
    pool: type[nn.AdaptiveAvgPool1d] | type[nn.AdaptiveAvgPool2d]
    kernel: int


class WSConv1d(nn.Conv1d):
    """Conv1d with a weight-standardized kernel (`gn_ws`), as WSConv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, standardize_weight(self.weight), self.bias)


IMAGE = Spatial(nn.Conv2d, WSConv2d, nn.AdaptiveAvgPool2d, 3)
# cnn1d/resnet1d: the same layouts over (C, L) with width-KERNEL_1D kernels.
SIGNAL = Spatial(nn.Conv1d, WSConv1d, nn.AdaptiveAvgPool1d, catalogue.KERNEL_1D)


@dataclass(frozen=True)
class ConvLayers:
    """The layers around a conv network's norms: its dimension, and what the norm's catalogue flags swap."""

    spatial: Spatial = IMAGE
    standardize: bool = False  # gn_ws: the convs feeding a norm are weight-standardized
    act: ActLayer = _relu  # after each norm; nn.Identity for norms that end in their own nonlinearity

    def conv(self, in_channels: int, out_channels: int, stride: int) -> nn.Module:
        # No bias: every conv is followed by a norm (or, for `none`, kept bias-free so the
        # conv parameters are identical across variants). Padding kernel // 2 keeps the size at stride 1.
        conv = self.spatial.ws_conv if self.standardize else self.spatial.conv
        k = self.spatial.kernel
        return conv(in_channels, out_channels, k, stride=stride, padding=k // 2, bias=False)


def _init_convs(module: nn.Module, spatial: Spatial) -> None:
    # He et al. (2015) init as in the CIFAR ResNets; linear layers keep PyTorch's default.
    for m in module.modules():
        if isinstance(m, spatial.conv):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")


class MLP(nn.Module):
    """Flatten -> [Linear -> norm -> ReLU] per hidden width -> Linear head."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: list[int],
        norm_layer: NormLayer,
        *,
        linear: type[nn.Linear] = nn.Linear,
        act_layer: ActLayer = _relu,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        prev = in_features
        for width in hidden:
            # Bias kept even before a norm (where it is redundant) so parameter shapes,
            # and hence seeded init, are the same for every norm.
            layers += [linear(prev, width), norm_layer(width), act_layer()]
            prev = width
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(prev, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class SmallCNN(nn.Module):
    """Three conv -> norm -> ReLU stages (stride 2 from stage 2) -> global avg pool -> Linear (`cnn`, `cnn1d`)."""

    def __init__(
        self, in_channels: int, num_classes: int, width: int, norm_layer: NormLayer, layers: ConvLayers = ConvLayers()
    ) -> None:
        super().__init__()
        stages: list[nn.Module] = []
        prev = in_channels
        for i, w in enumerate(catalogue.stage_widths(width)):
            stages += [layers.conv(prev, w, 1 if i == 0 else 2), norm_layer(w), layers.act()]
            prev = w
        self.features = nn.Sequential(*stages)
        self.pool = layers.spatial.pool(1)
        self.head = nn.Linear(prev, num_classes)
        _init_convs(self, layers.spatial)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.features(x)), 1))


class BasicBlock(nn.Module):
    """conv -> norm1 -> ReLU -> conv -> norm2, plus shortcut, then ReLU.

    `layers.act` replaces the ReLU after norm1 (nn.Identity for norms with their own
    activation); the ReLU after the addition is always kept.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int, norm_layer: NormLayer, layers: ConvLayers = ConvLayers()
    ) -> None:
        super().__init__()
        self.conv1 = layers.conv(in_channels, out_channels, stride)
        self.norm1 = norm_layer(out_channels)
        self.act1 = layers.act()
        self.conv2 = layers.conv(out_channels, out_channels, 1)
        self.norm2 = norm_layer(out_channels)
        self.act2 = nn.ReLU(inplace=True)
        # Projection shortcut (He et al. option B) when the shape changes, but without
        # the usual norm after it: the catalogue's norm sites (stem + 2 per block) are the
        # contract the API validates `gn` groupings against, and an extra site here would
        # be an unvalidated layer. None (not nn.Identity) so it is never mistaken for a
        # `none` norm layer. A plain conv even for `gn_ws`: standardizing a conv with no
        # norm after it would scale the shortcut by about sqrt(in_channels).
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = layers.spatial.conv(in_channels, out_channels, 1, stride=stride, bias=False)

    def zero_init_last(self) -> None:
        # Starts each residual branch at zero so the block is initially the identity
        # (Goyal et al. 2017; the GroupNorm paper's default). Every affine norm calls its
        # scale `weight` (for frn and evonorm_s0 a zero scale makes the output β = 0 and
        # max(0, τ = 0) = 0, so the branch starts at zero too). A norm without an affine
        # weight (`none`) has nothing to zero.
        # A frozen norm's scale is a buffer: zeroed too, so the block starts the same for every norm.
        weight = getattr(self.norm2, "weight", None)
        if isinstance(weight, torch.Tensor):
            with torch.no_grad():
                weight.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.shortcut is None else self.shortcut(x)
        x = self.act1(self.norm1(self.conv1(x)))
        x = self.norm2(self.conv2(x))
        return self.act2(x + shortcut)


class ResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016): depth 6n+2, three stages of n BasicBlocks (`resnet`, `resnet1d`)."""

    def __init__(
        self,
        depth: int,
        width: int,
        in_channels: int,
        num_classes: int,
        norm_layer: NormLayer,
        zero_init_last: bool = True,
        layers: ConvLayers = ConvLayers(),
    ) -> None:
        super().__init__()
        blocks_per_stage = catalogue.resnet_blocks_per_stage(depth)
        self.stem = nn.Sequential(layers.conv(in_channels, width, 1), norm_layer(width), layers.act())
        stages: list[nn.Module] = []
        prev = width
        for i, w in enumerate(catalogue.stage_widths(width)):
            blocks = []
            for b in range(blocks_per_stage):
                stride = 2 if i > 0 and b == 0 else 1
                blocks.append(BasicBlock(prev, w, stride, norm_layer, layers))
                prev = w
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = layers.spatial.pool(1)
        self.head = nn.Linear(prev, num_classes)
        _init_convs(self, layers.spatial)
        if zero_init_last:
            for m in self.modules():
                if isinstance(m, BasicBlock):
                    m.zero_init_last()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(x))
        return self.head(torch.flatten(self.pool(x), 1))


def build_model(
    arch: str,
    input_shape: tuple[int, ...],
    num_classes: int,
    norm: str,
    norm_params: catalogue.NormParams,
    *,
    depth: int = 20,
    width: int = 16,
    hidden: list[int] | None = None,
    zero_init_last: bool = True,
    levels: int = catalogue.UNET_LEVELS,
    layers: int = 2,
    heads: int = 4,
) -> nn.Module:
    """Network `arch` with norm `norm` for inputs of `input_shape` ((C, H, W), (C, L) signals or (F,)).

    `layers`, `heads`: the transformer's (models.transformer; texts of (L,) tokens).
    `zero_init_last` (ResNet only) zero-initializes each residual block's last norm scale.
    torchvision networks (`catalogue.ARCHS[arch].torchvision`) come from `models.torchvision_nets`.
    Raises CatalogueError (the catalogue's own messages where it has one) for choices
    that cannot be built.
    """
    info = catalogue.ARCHS.get(arch)
    if info is None:
        raise catalogue.unknown_choice("architecture", arch, sorted(catalogue.ARCHS))
    if arch == "transformer":  # (L,) token ids, a rank tabular data shares: before the kinds by rank
        from models.transformer import build_transformer

        return build_transformer(
            tuple(input_shape), num_classes, norm, norm_params, width=width, layers=layers, heads=heads
        )
    if arch == "unet":  # (C, H, W) like images, with per-pixel classes: models.unet
        from models.unet import build_unet

        return build_unet(tuple(input_shape), num_classes, norm, norm_params, width=width, levels=levels)
    shape = tuple(input_shape)
    if len(shape) not in (1, 2, 3) or any(not isinstance(d, int) or d < 1 for d in shape):
        raise catalogue.CatalogueError(f"input shape must be (C, H, W), (C, L) or (F,) of positive ints; got {shape}")
    kind = {3: "image", 2: "signal", 1: "tabular"}[len(shape)]
    if kind not in info.input_kinds:
        raise catalogue.CatalogueError(
            f"architecture '{arch}' needs {' or '.join(info.input_kinds)} inputs; got {kind} shape {shape}"
        )
    if num_classes < 1 or width < 1 or any(h < 1 for h in hidden or []):
        raise catalogue.CatalogueError("num_classes, width and hidden widths must be positive")
    if info.torchvision:  # imported here: torchvision is needed only for its networks
        from models.torchvision_nets import build_torchvision

        return build_torchvision(arch, shape, num_classes, norm, norm_params)
    sites = catalogue.norm_sites(arch, depth=depth, width=width, hidden=hidden)
    catalogue.check_variant(norm, norm_params, sites)
    norm_layer = get_norm_layer(norm, **norm_params)
    norm_info = catalogue.NORMS[norm]
    act_layer: ActLayer = nn.Identity if norm_info.includes_activation else _relu

    if arch == "mlp":
        # Widths from the sites, so the MLP's default hidden sizes are the catalogue's.
        linear = WSLinear if norm_info.standardize_weights else nn.Linear
        widths = [s.channels for s in sites]
        return MLP(math.prod(shape), num_classes, widths, norm_layer, linear=linear, act_layer=act_layer)
    conv_layers = ConvLayers(SIGNAL if kind == "signal" else IMAGE, norm_info.standardize_weights, act_layer)
    if arch in ("cnn", "cnn1d"):
        return SmallCNN(shape[0], num_classes, width, norm_layer, conv_layers)
    return ResNet(depth, width, shape[0], num_classes, norm_layer, zero_init_last, conv_layers)
