"""Torch-free catalogue of normalization layers and architectures.

The API validates job specs against it and `models/` builds networks from it, so the
two can never disagree about norm names, their parameters or layer widths.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

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


@dataclass(frozen=True)
class ParamInfo:
    """A norm parameter: its type, accepted range and default (None: resolved per layer)."""

    name: str
    kind: type[int] | type[float]
    low: ParamValue
    high: ParamValue
    default: ParamValue | None
    description: str


PARAMS: dict[str, ParamInfo] = {
    p.name: p
    for p in (
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
}


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


# Listed (and offered in error messages) classic choices first, then the zoo.
NORMS: dict[str, NormInfo] = {
    n.name: n
    for n in (
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
}


@dataclass(frozen=True)
class NormSite:
    """One place in a network where a norm layer sits."""

    layer: str
    channels: int
    spatial: bool


@dataclass(frozen=True)
class ArchInfo:
    name: str
    description: str
    input_kinds: tuple[str, ...]


ARCHS: dict[str, ArchInfo] = {
    a.name: a
    for a in (
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
    )
}


# Convolution width of the 1-D networks (padding KERNEL_1D // 2 keeps the length at stride 1).
KERNEL_1D = 5
# The network a job with `model.arch: auto` gets for each dataset kind.
AUTO_ARCH = {"image": "cnn", "tabular": "mlp", "signal": "cnn1d"}


def unknown_choice(kind: str, value: str, valid: list[str]) -> CatalogueError:
    return CatalogueError(f"unknown {kind} '{value}'; valid choices: {', '.join(valid)}")


def stage_widths(width: int) -> list[int]:
    return [width, 2 * width, 4 * width]


def resnet_blocks_per_stage(depth: int) -> int:
    if depth < 8 or (depth - 2) % 6:
        raise CatalogueError(f"resnet depth must be 6n+2 with n >= 1 (8, 14, 20, 32, 44, 56, 110); got {depth}")
    return (depth - 2) // 6


def norm_sites(arch: str, *, depth: int = 20, width: int = 16, hidden: list[int] | None = None) -> list[NormSite]:
    """Every norm layer the network `arch` has, in build order, with its channel count."""
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
    raise unknown_choice("architecture", arch, sorted(ARCHS))


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


def check_variant(norm: str, params: NormParams, sites: list[NormSite]) -> None:
    """Raise CatalogueError with an actionable message if `norm` cannot be built on `sites`.

    Checks the norm's name, that it takes every parameter given (None counts as not
    given), each value's type and range, spatial positions where the norm needs them,
    and that the grouping divides every site's channel count.
    """
    info = NORMS.get(norm)
    if info is None:
        raise unknown_choice("norm", norm, list(NORMS))
    given = {k: v for k, v in params.items() if v is not None}
    extra = set(given) - set(info.params)
    if extra:
        allowed = ", ".join(info.params) or "no parameters"
        raise CatalogueError(f"norm '{norm}' does not take {', '.join(sorted(extra))} (takes {allowed})")
    for key, value in given.items():
        _check_value(norm, PARAMS[key], value)
    if info.needs_spatial and not all(s.spatial for s in sites):
        raise CatalogueError(f"norm '{norm}' needs spatial positions; use it with 'cnn' or 'resnet', not 'mlp'")
    if "groups" in info.params:
        # Integers by now (checked above).
        groups, group_size = given.get("groups"), given.get("group_size")
        for site in sites:
            try:
                resolve_groups(site.channels, groups, group_size, norm=norm)  # type: ignore[arg-type]
            except CatalogueError as e:
                raise CatalogueError(f"{e} (layer '{site.layer}')") from None


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
