"""Torch-free catalogue of normalization layers and architectures.

The API validates job specs against it and `models/` builds networks from it, so the
two can never disagree about norm names, their parameters or layer widths.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

DEFAULT_GN_GROUPS = 32
# Most classes a dataset may define, so a classifier head (and every per-class table) stays bounded.
MAX_CLASSES = 10_000
# Most learned parameters a job's network may have (a ResNet-50 has 25 million), so one run's state stays bounded
# whatever the input size; app.core.memory checks it with the rest of a job's memory.
MAX_PARAMETERS = 100_000_000

ParamValue = int | float
NormParams = Mapping[str, ParamValue | None]


class CatalogueError(ValueError):
    """A norm, parameter or architecture choice that cannot be built."""


class Named(Protocol):
    @property
    def name(self) -> str: ...


_Entry = TypeVar("_Entry", bound=Named)


def by_name(*items: _Entry) -> dict[str, _Entry]:
    """A catalogue table: its entries keyed by their names, in the order listed."""
    return {item.name: item for item in items}


@dataclass(frozen=True)
class ParamInfo:
    """A norm parameter: its type, accepted range and default (None: resolved per layer)."""

    name: str
    kind: type[int] | type[float]
    low: ParamValue
    high: ParamValue
    default: ParamValue | None
    description: str


PARAMS = by_name(
    ParamInfo(
        "groups",
        int,
        1,
        1024,
        None,
        "Number of channel groups per layer; must divide every normalized layer's channel count. "
        f"Default: {DEFAULT_GN_GROUPS}, lowered to the largest divisor of a narrower layer's channel count.",
    ),
    ParamInfo(
        "group_size",
        int,
        1,
        1024,
        None,
        "Channels per group (instead of `groups`); must divide every normalized layer's channel count.",
    ),
    ParamInfo(
        "precise_samples",
        int,
        1,
        1_000_000,
        8192,
        "Training samples over which the evaluation statistics are recomputed after training "
        "(equal-weight average of per-batch statistics).",
    ),
    ParamInfo(
        "r_max",
        float,
        1.0,
        100.0,
        3.0,
        "Final bound on the scale correction r = σ_B/σ, clipped to [1/r_max, r_max]; 1 is plain BatchNorm.",
    ),
    ParamInfo(
        "d_max",
        float,
        0.0,
        100.0,
        5.0,
        "Final bound on the shift correction d = (μ_B − μ)/σ, clipped to [−d_max, d_max]; 0 is plain BatchNorm.",
    ),
    ParamInfo(
        "warmup_steps",
        int,
        0,
        100_000_000,
        0,
        "Training steps of plain BatchNorm (r_max = 1, d_max = 0) before the bounds start to ramp.",
    ),
    ParamInfo(
        "ramp_steps",
        int,
        0,
        100_000_000,
        1000,
        "Training steps after the warm-up over which r_max ramps linearly from 1 and d_max from 0 "
        "to their final values (0: they jump at the end of the warm-up).",
    ),
)


@dataclass(frozen=True)
class NormInfo:
    """A norm a job can name.

    `includes_activation`: the layer ends in its own nonlinearity, so networks drop the ReLU
    that would follow it. `standardize_weights`: the convolutions (and MLP hidden linears)
    feeding its layers standardize their weights at every forward.
    """

    name: str
    title: str
    description: str
    batch_dependent: bool
    params: tuple[str, ...] = ()
    needs_spatial: bool = False
    includes_activation: bool = False
    standardize_weights: bool = False
    needs_init: bool = False  # meaningful only from pretrained BatchNorm statistics (a job's `init`)


# Listed (and offered in error messages) classic choices first, then the zoo.
NORMS = by_name(
    NormInfo(
        "bn",
        "BatchNorm",
        "Normalizes each channel over the batch (and spatial positions); running averages are used at evaluation.",
        batch_dependent=True,
    ),
    NormInfo(
        "gn",
        "GroupNorm",
        "Normalizes groups of channels within each sample. Set `groups` (number of "
        f"groups) or `group_size` (channels per group); default {DEFAULT_GN_GROUPS} "
        "groups, capped by the channel count.",
        batch_dependent=False,
        params=("groups", "group_size"),
    ),
    NormInfo(
        "ln",
        "LayerNorm",
        "Normalizes all channels (and spatial positions) of each sample together: GroupNorm with one group.",
        batch_dependent=False,
    ),
    NormInfo(
        "in",
        "InstanceNorm",
        "Normalizes each channel of each sample over its spatial positions: GroupNorm "
        "with one channel per group. Needs spatial positions, so not for the MLP.",
        batch_dependent=False,
        needs_spatial=True,
    ),
    NormInfo("none", "No normalization", "Identity; the unnormalized baseline.", False),
    NormInfo(
        "bn_precise",
        "BatchNorm with precise statistics",
        "BatchNorm whose evaluation statistics are recomputed after training as the equal-weight average "
        "of per-batch means and variances over `precise_samples` training samples (default 8192), instead "
        "of the running average (Wu & Johnson 2021, PreciseBN).",
        batch_dependent=True,
        params=("precise_samples",),
    ),
    NormInfo(
        "brn",
        "Batch Renormalization",
        "BatchNorm corrected towards its running statistics during training: the normalized value is "
        "scaled by r = clip(σ_B/σ, 1/r_max, r_max) and shifted by d = clip((μ_B − μ)/σ, −d_max, d_max), "
        "with r and d held constant in the backward pass (Ioffe 2017). Plain BatchNorm for `warmup_steps`, "
        "then r_max ramps from 1 and d_max from 0 to their final values (default 3 and 5) over `ramp_steps`. "
        "Running averages are used at evaluation.",
        batch_dependent=True,
        params=("r_max", "d_max", "warmup_steps", "ramp_steps"),
    ),
    NormInfo(
        "gn_ws",
        "GroupNorm + Weight Standardization",
        "GroupNorm (same `groups`/`group_size` as `gn`) with the weights of the convolution before each "
        "norm standardized per output channel to zero mean and unit variance at every forward "
        "(Qiao et al. 2019). In the MLP the hidden linear layers' weights are standardized likewise.",
        batch_dependent=False,
        params=("groups", "group_size"),
        standardize_weights=True,
    ),
    NormInfo(
        "frn",
        "Filter Response Normalization + TLU",
        "Divides each channel of each sample by the root mean square of its spatial responses, then "
        "applies a per-channel affine and a learned threshold max(y, τ) that replaces the ReLU after the "
        "norm (Singh & Krishnan 2020). Needs spatial positions, so not for the MLP.",
        batch_dependent=False,
        needs_spatial=True,
        includes_activation=True,
    ),
    NormInfo(
        "evonorm_s0",
        "EvoNorm-S0",
        "x·sigmoid(v·x) divided by the standard deviation of the sample's channel group, then a "
        "per-channel affine; replaces the ReLU after the norm (Liu et al. 2020). Set `groups` (default "
        f"{DEFAULT_GN_GROUPS}, capped like `gn`). Needs spatial positions, so not for the MLP.",
        batch_dependent=False,
        params=("groups",),
        needs_spatial=True,
        includes_activation=True,
    ),
    NormInfo(
        "rmsnorm",
        "RMSNorm",
        "Divides all channels (and spatial positions) of each sample by their root mean square, without "
        "subtracting a mean, then a per-channel scale (Zhang & Sennrich 2019); in the transformer, each token's "
        "channels, as torch.nn.RMSNorm.",
        batch_dependent=False,
    ),
    NormInfo(
        "ln_channel",
        "LayerNorm over channels",
        "Normalizes each sample's channels at every spatial position separately (the LayerNorm of ConvNeXt "
        "and transformers; torchvision's LayerNorm2d), with a per-channel affine; eps 1e-6 as in ConvNeXt. "
        "On flat inputs it is `ln`.",
        batch_dependent=False,
    ),
    NormInfo(
        "bn_frozen",
        "Frozen BatchNorm",
        "BatchNorm fixed at the pretrained weights' running statistics and affine, which never change "
        "(torchvision.ops.FrozenBatchNorm2d, as detection codebases fine-tune): y = (x − μ)/√(σ² + eps)·γ + β. "
        "Needs `init` weights with BatchNorm statistics. With a trainable affine it is `bn_eval`.",
        batch_dependent=False,
        needs_init=True,
    ),
    NormInfo(
        "bn_eval",
        "BatchNorm in eval mode",
        "BatchNorm that always normalizes with the pretrained running statistics (never updating them, also "
        "in training) and a trainable affine. Needs `init` weights with BatchNorm statistics.",
        batch_dependent=False,
        needs_init=True,
    ),
    NormInfo(
        "switchable",
        "Switchable Normalization",
        "Normalizes with a learned mix of InstanceNorm, LayerNorm and BatchNorm statistics: the mean is "
        "Σ w_k μ_k and the variance Σ w'_k σ²_k with w = softmax of 3 learned weights per layer for the means and "
        "w' another for the variances, then a per-channel affine (Luo et al. 2019). The BN part keeps running "
        "statistics for evaluation. At batch 1 BN's statistics over one sample equal IN's; on flat inputs "
        "(the MLP) only LN and BN are mixed. The learned shares per layer are reported after training.",
        batch_dependent=True,
    ),
    NormInfo(
        "bgn",
        "Batch Group Normalization",
        "Normalizes each group of channels with one mean and variance over the whole batch and the group's "
        "channels and positions (Zhou et al. 2020): BatchNorm statistics over more values at small batches; "
        "`groups` = channels is BatchNorm, batch 1 is GroupNorm. Set `groups` (default "
        f"{DEFAULT_GN_GROUPS}, capped like `gn`). Running statistics are used at evaluation.",
        batch_dependent=True,
        params=("groups",),
    ),
)
# The norms that hold BatchNorm's running statistics (and so take them from pretrained weights).
BN_FAMILY = ("bn", "bn_precise", "brn", "bn_frozen", "bn_eval")


@dataclass(frozen=True)
class NormSite:
    """One place in a network where a norm layer sits. `positions`: spatial positions (H×W) of its input
    for the job's input size, when known (torchvision networks given an input shape)."""

    layer: str
    channels: int
    spatial: bool
    positions: int | None = None


@dataclass(frozen=True)
class ArchInfo:
    """A network a job can name. `torchvision`: built by torchvision's builder with `norm_layer=`; `head`: the
    module name of its last classifier layer (re-initialised when fine-tuning); `refuses`: zoo norms that do
    not make sense in it, with the reason the API gives; `min_side`: smallest image side it accepts."""

    name: str
    description: str
    input_kinds: tuple[str, ...]
    torchvision: bool = False
    head: str = "head"
    refuses: Mapping[str, str] = field(default_factory=dict)
    min_side: int = 1
    # torchvision networks, for the torch-free memory estimate (app.core.memory): learned parameters of the
    # network with no norm, for RGB input, head left out; the head's input features; the stem convolution's
    # output channels and kernel side (its weights scale with the image channels); activation elements per
    # norm-site element outside the norms (residual sums, activations, MobileNet's squeeze-excitation,
    # ConvNeXt's 4× MLP), rounded up.
    backbone_weights: int = 0
    head_features: int = 0
    stem: tuple[int, int] = (0, 0)
    other_per_site: int = 2


# Norms that end in their own nonlinearity (`frn`, `evonorm_s0`): each torchvision network refuses them all, for
# one reason of its own.
_OWN_NONLINEARITY = tuple(name for name, info in NORMS.items() if info.includes_activation)
_SHARED_RELU = (
    "it ends in its own nonlinearity, which replaces the activation after each norm; torchvision's blocks apply "
    "one shared activation after a norm and after the residual addition, so it cannot be swapped in without "
    "rewriting them (use the CIFAR `resnet`)"
)
_LINEAR_BOTTLENECK = (
    "it ends in its own nonlinearity, and MobileNetV3's projection layers are linear by design (a norm with no "
    "activation after it): the norm would add one"
)
_CONVNEXT_MLP = (
    "it ends in its own nonlinearity, and ConvNeXt's block norm feeds a linear layer directly (the block's one "
    "activation is the GELU inside its MLP)"
)
_WS_DEPTHWISE = (
    "Weight Standardization is defined for dense convolutions; in this network most norms follow depthwise "
    "convolutions ({n} weights per output channel), which it would reduce to fixed patterns"
)
_NO_BN_STATS = (
    "ConvNeXt has no BatchNorm: its pretrained weights carry LayerNorm affines and no running statistics to "
    "freeze or evaluate with"
)


def _refuses(nonlinearity_reason: str, **other_refusals: str) -> dict[str, str]:
    """A torchvision network's `refuses`: the self-activating norms for its `nonlinearity_reason`, and the rest."""
    return dict.fromkeys(_OWN_NONLINEARITY, nonlinearity_reason) | other_refusals


def _torchvision_resnet(name: str, description: str, backbone_weights: int, head_features: int) -> ArchInfo:
    """torchvision's ResNets share their head (`fc`), their stem (64 channels, 7×7) and what they refuse."""
    return ArchInfo(
        name,
        description,
        ("image",),
        torchvision=True,
        head="fc",
        refuses=_refuses(_SHARED_RELU),
        backbone_weights=backbone_weights,
        head_features=head_features,
        stem=(64, 7),
    )


ARCHS = by_name(
    ArchInfo(
        "mlp",
        "Fully connected network on flattened inputs; `hidden` lists the layer widths.",
        ("image", "tabular", "signal"),
    ),
    ArchInfo(
        "cnn",
        "Small 3-stage CNN for tiny images; stage widths are `width`, 2×`width`, 4×`width`.",
        ("image",),
    ),
    ArchInfo(
        "resnet",
        "CIFAR-style ResNet, `depth` = 6n+2; stage widths `width`, 2×`width`, 4×`width`.",
        ("image",),
    ),
    ArchInfo(
        "cnn1d",
        "Small 3-stage 1-D CNN for signals (C×L): width-5 convolutions (stride 2 from stage 2), each followed by "
        "the norm (over positions as BatchNorm1d, GroupNorm, ...); stage widths `width`, 2×`width`, 4×`width`.",
        ("signal",),
    ),
    ArchInfo(
        "resnet1d",
        "1-D ResNet for signals (C×L): the CIFAR ResNet's layout with width-5 1-D convolutions, `depth` = 6n+2; "
        "stage widths `width`, 2×`width`, 4×`width`.",
        ("signal",),
    ),
    _torchvision_resnet(
        "resnet18",
        "torchvision's ResNet-18 (ImageNet design: 7×7 stride-2 stem, max pool, four stages of basic blocks, "
        "output stride 32); `depth`/`width`/`hidden` do not apply.",
        backbone_weights=11_166_912,
        head_features=512,
    ),
    _torchvision_resnet(
        "resnet50",
        "torchvision's ResNet-50 (bottleneck blocks, 25.6M parameters, output stride 32).",
        backbone_weights=23_454_912,
        head_features=2048,
    ),
    ArchInfo(
        "mobilenet_v3_small",
        "torchvision's MobileNetV3-Small (depthwise-separable inverted residuals with squeeze-excitation; "
        "BatchNorm eps 1e-3, momentum 0.01 as torchvision sets them; dropout off so runs are deterministic).",
        ("image",),
        torchvision=True,
        head="classifier.3",
        refuses=_refuses(_LINEAR_BOTTLENECK, gn_ws=_WS_DEPTHWISE.format(n="9 or 25")),
        backbone_weights=1_505_744,
        head_features=1024,
        stem=(16, 3),
        other_per_site=3,
    ),
    ArchInfo(
        "convnext_tiny",
        "torchvision's ConvNeXt-Tiny (LayerNorm by design: `ln_channel` is its own norm; every norm site, the "
        "blocks' included, is swapped; stochastic depth off so runs are deterministic). Images of at least "
        "32×32 (4×4 stem, output stride 32).",
        ("image",),
        torchvision=True,
        head="classifier.2",
        refuses=_refuses(
            _CONVNEXT_MLP, gn_ws=_WS_DEPTHWISE.format(n="49"), bn_frozen=_NO_BN_STATS, bn_eval=_NO_BN_STATS
        ),
        min_side=32,
        backbone_weights=27_803_808,
        head_features=768,
        stem=(96, 4),
        other_per_site=10,
    ),
)


# The norms the transformer takes (per token over channels, or BatchNorm over the batch's real tokens only).
TRANSFORMER_NORMS = ("ln", "rmsnorm", "gn", "bn", "none")
_TOKEN_NORMS_ONLY = (
    "the transformer takes ln, rmsnorm, gn (per token over channels), bn (masked: statistics over real tokens) or "
    "none; a token sequence has no spatial positions, and the other batch statistics would take in padding"
)
ARCHS["transformer"] = ArchInfo(
    "transformer",
    "Small pre-norm Transformer encoder for texts (byte tokens): token and learned position embeddings of `width` "
    "channels, `layers` blocks (self-attention with `heads` heads, then a 4×`width` GELU MLP, each after the norm "
    "and added back), a final norm, the mean over real tokens (padding is masked in attention, pooling and "
    "BatchNorm's statistics) and a linear classifier. `ln`, `rmsnorm` and `gn` normalize each token's channels "
    "(`gn`: 4 groups unless set); "
    "`bn` normalizes each channel over the batch's real tokens.",
    ("text",),
    refuses={n: _TOKEN_NORMS_ONLY for n in NORMS if n not in TRANSFORMER_NORMS},
)

# Convolution width of the 1-D networks (padding KERNEL_1D // 2 keeps the length at stride 1).
KERNEL_1D = 5
# The network a job with `model.arch: auto` gets for each dataset kind.
AUTO_ARCH = {"image": "cnn", "tabular": "mlp", "signal": "cnn1d", "text": "transformer"}


# Semantic segmentation (kind `segmentation`): per-pixel class logits, models/unet.py.
UNET_LEVELS = 3
ARCHS["unet"] = ArchInfo(
    "unet",
    "U-Net for segmentation (per-pixel classes): `levels` 2×2 down-samplings between double 3×3 convolutions "
    "(each followed by the norm) of widths `width`·2^i, a decoder that upsamples, concatenates the skip and "
    "applies a double convolution, and a 1×1 classifier per pixel.",
    ("segmentation",),
)
AUTO_ARCH["segmentation"] = "unet"
# The metric results rank by, intervals and verdicts are about, and plots show first, per dataset kind.
PRIMARY_METRIC = {"segmentation": "val_miou"}
METRIC_LABELS = {"val_acc": "accuracy", "val_miou": "mean IoU"}
METRIC_ABBREVIATIONS = {"val_acc": "acc", "val_miou": "mIoU"}  # in column heads


def primary_metric(kind: str | None) -> str:
    """`val_miou` (mean intersection over union) for segmentation, `val_acc` for every classification kind."""
    return PRIMARY_METRIC.get(kind or "", "val_acc")


def unet_widths(width: int, levels: int) -> list[int]:
    """Channels of the U-Net's encoder blocks, shallowest first (the decoder mirrors them)."""
    if levels < 1:
        raise CatalogueError(f"unet levels must be at least 1; got {levels}")
    return [width * 2**i for i in range(levels + 1)]


# `gn` in the transformer when neither `groups` nor `group_size` is set: a token has no positions, so a group
# of one channel would normalize each value to 0 (GroupNorm's default of 32 groups would do that at width 32).
TRANSFORMER_GN_GROUPS = 4


def transformer_norm_params(norm: str, params: NormParams, width: int) -> dict[str, ParamValue | None]:
    """The variant's parameters as the transformer builds it: `gn` gets TRANSFORMER_GN_GROUPS (lowered to a
    divisor of `width`) unless set, and refuses groups of one channel."""
    out = dict(params)
    if norm == "gn":
        if out.get("groups") is None and out.get("group_size") is None:
            groups = min(TRANSFORMER_GN_GROUPS, width)
            while width % groups:
                groups -= 1
            out["groups"] = groups
        groups = resolve_groups(width, out.get("groups"), out.get("group_size"))  # type: ignore[arg-type]
        if groups == width and width > 1:
            raise CatalogueError(
                f"gn with {groups} groups of one channel normalizes each token's value to 0 in the transformer; "
                f"use fewer groups (default {TRANSFORMER_GN_GROUPS})"
            )
    return out


def check_transformer(width: int, layers: int, heads: int) -> None:
    """The transformer's `width` (channels) splits evenly over its attention `heads`."""
    if layers < 1 or heads < 1 or width % heads:
        raise CatalogueError(
            f"transformer width {width} must be a multiple of heads {heads} (and layers, heads at least 1); "
            f"e.g. width {heads * max(1, -(-width // heads))}"
        )


def unknown_choice(kind: str, value: str, valid: list[str]) -> CatalogueError:
    return CatalogueError(f"unknown {kind} '{value}'; valid choices: {', '.join(valid)}")


def stage_widths(width: int) -> list[int]:
    return [width, 2 * width, 4 * width]


def resnet_blocks_per_stage(depth: int) -> int:
    if depth < 8 or (depth - 2) % 6:
        raise CatalogueError(f"resnet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110); got {depth}")
    return (depth - 2) // 6


def norm_sites(
    arch: str,
    *,
    depth: int = 20,
    width: int = 16,
    hidden: list[int] | None = None,
    input_shape: tuple[int, ...] | list[int] | None = None,
    levels: int = UNET_LEVELS,
    layers: int = 2,
    heads: int = 4,
) -> list[NormSite]:
    """Every norm layer the network `arch` has, in build order, with its channel count.

    For torchvision networks the layer names are the modules' (and the state-dict keys' prefixes) and, given
    the job's `input_shape` (C, H, W as fed to the network), each site's spatial positions: a site with a single
    position is not `spatial` (an instance-wise norm there sees one value per channel)."""
    if arch == "unet":  # module names: encoder blocks shallowest first, then decoders deepest first
        widths = unet_widths(width, levels)
        enc = [NormSite(f"enc.{i}.norm{j}", w, spatial=True) for i, w in enumerate(widths) for j in (1, 2)]
        dec = [NormSite(f"dec.{i}.norm{j}", widths[i], spatial=True) for i in reversed(range(levels)) for j in (1, 2)]
        return enc + dec
    if arch == "transformer":
        check_transformer(width, layers, heads)
        blocks = [NormSite(f"blocks.{i}.norm{j}", width, spatial=False) for i in range(layers) for j in (1, 2)]
        return [*blocks, NormSite("norm", width, spatial=False)]
    if arch == "mlp":
        return [NormSite(f"hidden{i}", w, spatial=False) for i, w in enumerate(hidden or [256, 256])]
    if arch in ("cnn", "cnn1d"):  # the 1-D networks mirror the 2-D ones layer for layer
        return [NormSite(f"stage{i}", w, spatial=True) for i, w in enumerate(stage_widths(width))]
    if arch in ("resnet", "resnet1d"):
        n = resnet_blocks_per_stage(depth)
        sites = [NormSite("stem", width, spatial=True)]
        for s, w in enumerate(stage_widths(width)):
            for b in range(n):
                sites += [NormSite(f"stage{s}.block{b}.norm{j}", w, spatial=True) for j in (1, 2)]
        return sites
    builder = _TORCHVISION_SITES.get(arch)
    if builder is None:
        raise unknown_choice("architecture", arch, sorted(ARCHS))
    side: tuple[int, int] | None = None
    if input_shape is not None:
        if len(input_shape) != 3:
            raise CatalogueError(f"architecture '{arch}' needs (C, H, W) image inputs; got shape {tuple(input_shape)}")
        side = (int(input_shape[1]), int(input_shape[2]))
        low = ARCHS[arch].min_side
        if min(side) < low:
            raise CatalogueError(
                f"architecture '{arch}' needs images of at least {low}×{low} pixels as fed to it; got "
                f"{side[0]}×{side[1]}: set `input.resize` or pick another architecture"
            )
    out = []
    for layer, channels, size in builder(side or (224, 224)):
        if side is None:
            out.append(NormSite(layer, channels, spatial=size != (1, 1) or layer == "classifier.0"))
        else:
            positions = size[0] * size[1]
            out.append(NormSite(layer, channels, spatial=positions > 1, positions=positions))
    if side is None and arch == "convnext_tiny":  # its classifier norm sees one position whatever the input
        out[-1] = NormSite(out[-1].layer, out[-1].channels, spatial=False)
    return out


Size = tuple[int, int]
SiteList = list[tuple[str, int, Size]]


def _half_up(size: Size) -> Size:
    """A stride-2 convolution or pooling padded to keep the size at stride 1 (3×3 pad 1, 7×7 pad 3, 1×1)."""
    return ((size[0] + 1) // 2, (size[1] + 1) // 2)


def _resnet_sites(blocks: tuple[int, ...], bottleneck: bool) -> Callable[[Size], SiteList]:
    def sites(size: Size) -> SiteList:
        size = _half_up(size)  # 7×7 stride-2 stem
        out: SiteList = [("bn1", 64, size)]
        size = _half_up(size)  # 3×3 stride-2 max pool
        inplanes, expansion = 64, 4 if bottleneck else 1
        for stage, (planes, n) in enumerate(zip((64, 128, 256, 512), blocks, strict=True)):
            for b in range(n):
                stride = 2 if stage > 0 and b == 0 else 1
                name = f"layer{stage + 1}.{b}"
                after = _half_up(size) if stride == 2 else size
                if bottleneck:  # torchvision's v1.5: the stride is in the 3×3 conv
                    out += [(f"{name}.bn1", planes, size), (f"{name}.bn2", planes, after)]
                    out += [(f"{name}.bn3", planes * expansion, after)]
                else:
                    out += [(f"{name}.bn1", planes, after), (f"{name}.bn2", planes, after)]
                if b == 0 and (stride != 1 or inplanes != planes * expansion):
                    out.append((f"{name}.downsample.1", planes * expansion, after))
                inplanes, size = planes * expansion, after
        return out

    return sites


# MobileNetV3-Small's inverted residual settings (torchvision): input, kernel, expanded, output, SE, stride.
_MOBILENET_V3_SMALL = (
    (16, 3, 16, 16, True, 2),
    (16, 3, 72, 24, False, 2),
    (24, 3, 88, 24, False, 1),
    (24, 5, 96, 40, True, 2),
    (40, 5, 240, 40, True, 1),
    (40, 5, 240, 40, True, 1),
    (40, 5, 120, 48, True, 1),
    (48, 5, 144, 48, True, 1),
    (48, 5, 288, 96, True, 2),
    (96, 5, 576, 96, True, 1),
    (96, 5, 576, 96, True, 1),
)


def _mobilenet_sites(size: Size) -> SiteList:
    size = _half_up(size)
    out: SiteList = [("features.0.1", 16, size)]
    for i, (inp, _, expanded, outp, se, stride) in enumerate(_MOBILENET_V3_SMALL, start=1):
        j = 0
        if expanded != inp:
            out.append((f"features.{i}.block.{j}.1", expanded, size))
            j += 1
        size = _half_up(size) if stride == 2 else size  # depthwise conv, padded: ceil(size / stride)
        out.append((f"features.{i}.block.{j}.1", expanded, size))
        j += 2 if se else 1
        out.append((f"features.{i}.block.{j}.1", outp, size))
    out.append((f"features.{len(_MOBILENET_V3_SMALL) + 1}.1", 576, size))
    return out


def _convnext_sites(size: Size) -> SiteList:
    size = (size[0] // 4, size[1] // 4)  # 4×4 stride-4 stem, no padding
    out: SiteList = [("features.0.1", 96, size)]
    for stage, (dim, n) in enumerate(zip((96, 192, 384, 768), (3, 3, 9, 3), strict=True)):
        out += [(f"features.{2 * stage + 1}.{b}.block.2", dim, size) for b in range(n)]
        if stage < 3:
            out.append((f"features.{2 * stage + 2}.0", dim, size))  # the downsampling layer's norm, then 2×2 stride 2
            size = (size[0] // 2, size[1] // 2)
    out.append(("classifier.0", 768, (1, 1)))  # after global average pooling
    return out


_TORCHVISION_SITES: dict[str, Callable[[Size], SiteList]] = {
    "resnet18": _resnet_sites((2, 2, 2, 2), bottleneck=False),
    "resnet50": _resnet_sites((3, 4, 6, 3), bottleneck=True),
    "mobilenet_v3_small": _mobilenet_sites,
    "convnext_tiny": _convnext_sites,
}


def fed_shape(input_shape: tuple[int, ...] | list[int], resize: int | None, crop: int | None) -> tuple[int, ...]:
    """The (C, H, W) an image network is fed from stored images of `input_shape` after the job's `input` options:
    `resize` scales the shorter side to that many pixels (keeping the aspect ratio), `crop` cuts a square."""
    shape = tuple(int(d) for d in input_shape)
    if len(shape) != 3:
        if resize is not None or crop is not None:
            raise CatalogueError("input.resize and input.crop apply to images only")
        return shape
    c, h, w = shape
    if resize is not None:
        short = min(h, w)
        # torchvision's Resize(int): the shorter side becomes `resize`, the longer one scales with it (truncated).
        h, w = (resize, int(resize * w / h)) if h == short else (int(resize * h / w), resize)
    if crop is not None:
        if crop > min(h, w):
            raise CatalogueError(
                f"input.crop {crop} is larger than the images as fed ({h}×{w}); lower it or set input.resize"
            )
        h = w = crop
    return (c, h, w)


def resolve_groups(
    num_channels: int, groups: int | None = None, group_size: int | None = None, *, norm: str = "gn"
) -> int:
    """Number of groups `norm` (a GroupNorm-style layer) uses for a layer of `num_channels` channels."""
    if groups is not None and group_size is not None:
        raise CatalogueError(f"{norm} takes either `groups` or `group_size`, not both")
    if group_size is not None:
        if group_size < 1 or num_channels % group_size:
            raise CatalogueError(f"{norm} group_size {group_size} does not divide a layer with {num_channels} channels")
        return num_channels // group_size
    if groups is None:
        groups = min(DEFAULT_GN_GROUPS, num_channels)
        while num_channels % groups:
            groups -= 1
        return groups
    if groups < 1 or num_channels % groups:
        raise CatalogueError(f"{norm} groups={groups} does not divide a layer with {num_channels} channels")
    return groups


def norms_taking(param: str) -> list[str]:
    return [n.name for n in NORMS.values() if param in n.params]


def norms_description() -> str:
    """The API's description of the `norm` choice: every norm with its title and description."""
    return "Normalization layer, one of:\n" + "\n".join(
        f"- `{n.name}` ({n.title}): {n.description}" for n in NORMS.values()
    )


def param_description(param: str) -> str:
    """The API's description of `param`: which norms take it, what it does, its default."""
    info = PARAMS[param]
    takers = ", ".join(f"`{n}`" for n in norms_taking(param))
    default = "" if info.default is None else f" Default {info.default}."
    return f"{takers} only: {info.description}{default}"


def _check_value(norm: str, info: ParamInfo, value: object) -> None:
    # bool is an int subclass, but `groups=True` is surely a caller bug.
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if info.kind is int and not (number and isinstance(value, int)):
        raise CatalogueError(f"norm '{norm}' parameter {info.name} must be an integer, got {value!r}")
    if not (number and math.isfinite(value)):  # type: ignore[arg-type]
        raise CatalogueError(f"norm '{norm}' parameter {info.name} must be a finite number, got {value!r}")
    if not info.low <= value <= info.high:  # type: ignore[operator]
        raise CatalogueError(
            f"norm '{norm}' parameter {info.name} must be between {info.low} and {info.high}, got {value}"
        )


def check_variant(norm: str, params: NormParams, sites: list[NormSite], *, arch: str | None = None) -> None:
    """Raise CatalogueError with an actionable message if `norm` cannot be built on `sites`.

    Checks the norm's name, that `arch` (when given) does not refuse it, that it takes every
    parameter given (None counts as not given), each value's type and range, spatial positions
    where the norm needs them, and that the grouping divides every site's channel count.
    """
    info = NORMS.get(norm)
    if info is None:
        raise unknown_choice("norm", norm, list(NORMS))
    reason = ARCHS[arch].refuses.get(norm) if arch in ARCHS else None
    if reason is not None:
        raise CatalogueError(f"norm '{norm}' does not make sense in {arch}: {reason}")
    given = {k: v for k, v in params.items() if v is not None}
    extra = set(given) - set(info.params)
    if extra:
        allowed = ", ".join(info.params) or "no parameters"
        raise CatalogueError(f"norm '{norm}' does not take {', '.join(sorted(extra))} (takes {allowed})")
    for key, value in given.items():
        _check_value(norm, PARAMS[key], value)
    flat = next((s for s in sites if not s.spatial), None)
    if info.needs_spatial and flat is not None:
        if flat.positions is None and not flat.layer.startswith("classifier"):
            raise CatalogueError(f"norm '{norm}' needs spatial positions; use it with 'cnn' or 'resnet', not 'mlp'")
        raise CatalogueError(
            f"norm '{norm}' needs spatial positions; layer '{flat.layer}' sees a single position per channel "
            "(feed larger images, or pick another norm)"
        )
    if "groups" in info.params:
        # Integers by now (checked above).
        groups, group_size = given.get("groups"), given.get("group_size")
        for site in sites:
            try:
                resolve_groups(site.channels, groups, group_size, norm=norm)  # type: ignore[arg-type]
            except CatalogueError as e:
                raise CatalogueError(f"{e} (layer '{site.layer}')") from None
    if arch == "transformer" and sites:  # its gn default, and no groups of one channel
        transformer_norm_params(norm, given, sites[0].channels)


def resolved_params(norm: str, params: NormParams) -> dict[str, ParamValue | None]:
    """Every parameter `norm` takes, with the catalogue default where `params` leaves it unset."""
    return {k: params[k] if params.get(k) is not None else PARAMS[k].default for k in NORMS[norm].params}


def _fmt(value: ParamValue) -> str:
    # Short where exact (3.0 -> '3'), the round-trip repr otherwise, so labels never merge values.
    if isinstance(value, float) and float(f"{value:g}") == value:
        return f"{value:g}"
    return repr(value)


def variant_label(norm: str, params: NormParams) -> str:
    """Stable human label of a variant, e.g. 'gn(16)', 'gn(size=8)' or 'brn(r2,d5)'.

    Parameters left at their defaults do not appear, so a spelled-out default and an
    omitted one get the same label.
    """
    if norm in ("gn", "gn_ws", "evonorm_s0", "bgn"):
        if params.get("groups") is not None:
            return f"{norm}({params['groups']})"
        if params.get("group_size") is not None:
            return f"{norm}(size={params['group_size']})"
        return norm
    if norm not in NORMS:
        return norm
    values = resolved_params(norm, params)
    changed = {k for k, v in values.items() if v != PARAMS[k].default}
    parts: list[str] = []
    if norm == "brn":
        if changed & {"r_max", "d_max"}:
            # The pair the paper quotes, e.g. brn(r3,d5).
            parts += [f"r{_fmt(values['r_max'])}", f"d{_fmt(values['d_max'])}"]  # type: ignore[arg-type]
        parts += [f"{k.removesuffix('_steps')}={values[k]}" for k in ("warmup_steps", "ramp_steps") if k in changed]
    elif norm == "bn_precise" and "precise_samples" in changed:
        parts.append(f"n={values['precise_samples']}")
    return f"{norm}({','.join(parts)})" if parts else norm
