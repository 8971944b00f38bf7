"""Torch-free catalogue of normalization layers and architectures.

The API validates job specs against it and `models/` builds networks from it, so the
two can never disagree about norm names, their parameters or layer widths.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_GN_GROUPS = 32


class CatalogueError(ValueError):
    """A norm, parameter or architecture choice that cannot be built."""


@dataclass(frozen=True)
class NormInfo:
    name: str
    title: str
    description: str
    batch_dependent: bool
    params: tuple[str, ...] = ()
    needs_spatial: bool = False


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
            ("image", "tabular"),
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
    )
}


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
    if arch == "cnn":
        return [NormSite(f"stage{i}", w, spatial=True) for i, w in enumerate(stage_widths(width))]
    if arch == "resnet":
        n = resnet_blocks_per_stage(depth)
        sites = [NormSite("stem", width, spatial=True)]
        for s, w in enumerate(stage_widths(width)):
            for b in range(n):
                sites += [NormSite(f"stage{s}.block{b}.norm{j}", w, spatial=True) for j in (1, 2)]
        return sites
    raise unknown_choice("architecture", arch, sorted(ARCHS))


def resolve_groups(num_channels: int, groups: int | None = None, group_size: int | None = None) -> int:
    """Number of GroupNorm groups for a layer of `num_channels` channels."""
    if groups is not None and group_size is not None:
        raise CatalogueError("gn takes either `groups` or `group_size`, not both")
    if group_size is not None:
        if group_size < 1 or num_channels % group_size:
            raise CatalogueError(f"gn group_size {group_size} does not divide a layer with {num_channels} channels")
        return num_channels // group_size
    if groups is None:
        groups = min(DEFAULT_GN_GROUPS, num_channels)
        while num_channels % groups:
            groups -= 1
        return groups
    if groups < 1 or num_channels % groups:
        raise CatalogueError(f"gn groups={groups} does not divide a layer with {num_channels} channels")
    return groups


def check_variant(norm: str, params: dict[str, int | None], sites: list[NormSite]) -> None:
    """Raise CatalogueError with an actionable message if `norm` cannot be built on `sites`."""
    info = NORMS.get(norm)
    if info is None:
        raise unknown_choice("norm", norm, sorted(NORMS))
    given = {k for k, v in params.items() if v is not None}
    extra = given - set(info.params)
    if extra:
        allowed = ", ".join(info.params) or "no parameters"
        raise CatalogueError(f"norm '{norm}' does not take {', '.join(sorted(extra))} (takes {allowed})")
    if info.needs_spatial and not all(s.spatial for s in sites):
        raise CatalogueError(f"norm '{norm}' needs spatial positions; use it with 'cnn' or 'resnet', not 'mlp'")
    if norm == "gn":
        for site in sites:
            try:
                resolve_groups(site.channels, params.get("groups"), params.get("group_size"))
            except CatalogueError as e:
                raise CatalogueError(f"{e} (layer '{site.layer}')") from None


def variant_label(norm: str, params: dict[str, int | None]) -> str:
    """Stable human label of a variant, e.g. 'gn(16)' or 'gn(size=8)'."""
    if norm == "gn":
        if params.get("groups") is not None:
            return f"gn({params['groups']})"
        if params.get("group_size") is not None:
            return f"gn(size={params['group_size']})"
    return norm
