"""Norm layer registry: catalogue norm names -> layer constructors.

Every layer takes its channel count first and works on (N, C, *) inputs, so one
constructor serves the MLP (N, C) and the CNNs (N, C, H, W). Valid names and
parameters come from `app.catalogue`, which the API validates against too.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from app import catalogue

NormLayer = Callable[[int], nn.Module]

__all__ = [
    "BatchNorm",
    "GroupNorm",
    "GroupNorm1",
    "InstanceNorm",
    "NoNorm",
    "NormLayer",
    "create_norm_layer",
    "get_norm_layer",
    "is_norm_layer",
]


class BatchNorm(_BatchNorm):
    """BatchNorm over (N, C, *) inputs: statistics per channel over the batch and all positions.

    nn.BatchNorm1d/2d differ only in the input rank they accept; accepting any rank
    lets the same `bn` constructor serve linear and conv layers.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an (N, C, *) input with at least 2 dims, got {input.dim()}D")


class GroupNorm(nn.GroupNorm):
    """GroupNorm whose group count is resolved by the catalogue from `groups` or `group_size`."""

    def __init__(
        self,
        num_channels: int,
        groups: int | None = None,
        group_size: int | None = None,
        eps: float = 1e-5,
        affine: bool = True,
    ) -> None:
        num_groups = catalogue.resolve_groups(num_channels, groups, group_size)
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)


class GroupNorm1(nn.GroupNorm):
    """LayerNorm over (C, *) of each sample, as GroupNorm with one group.

    Unlike nn.LayerNorm it keeps a per-channel (not per-element) affine, so it is
    independent of the spatial size and has the same parameters as `gn`.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__(1, num_channels, eps=eps, affine=affine)


class InstanceNorm(nn.GroupNorm):
    """InstanceNorm as GroupNorm with one channel per group.

    nn.InstanceNorm2d defaults to no affine and is rank-specific; this form has the
    same per-channel affine as `gn`/`ln`, so variants differ only in the grouping.
    """

    def __init__(self, num_channels: int, eps: float = 1e-5, affine: bool = True) -> None:
        super().__init__(num_channels, num_channels, eps=eps, affine=affine)


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
    "gn": GroupNorm,
    "ln": GroupNorm1,
    "in": InstanceNorm,
    "none": NoNorm,
}
_NORM_TYPES: tuple[type[nn.Module], ...] = tuple(_NORM_LAYERS.values())


def get_norm_layer(name: str, **params: int | None) -> NormLayer:
    """Constructor `f(num_channels) -> nn.Module` for the catalogue norm `name` with `params`.

    Raises CatalogueError for unknown names or parameters the norm does not take; a
    `gn` grouping that does not divide a layer raises when that layer is built.
    """
    if name not in _NORM_LAYERS:
        raise catalogue.unknown_choice("norm", name, sorted(catalogue.NORMS))
    # No sites yet: this checks name and parameter names; widths are checked per layer.
    catalogue.check_variant(name, params, [])
    kwargs = {k: v for k, v in params.items() if v is not None}
    for key, value in kwargs.items():
        # bool is an int subclass, but `groups=True` is surely a caller bug.
        if not isinstance(value, int) or isinstance(value, bool):
            raise catalogue.CatalogueError(f"norm '{name}' parameter {key} must be an integer, got {value!r}")
    return functools.partial(_NORM_LAYERS[name], **kwargs)


def create_norm_layer(name: str, num_channels: int, **params: int | None) -> nn.Module:
    """Norm layer `name` for `num_channels` channels."""
    return get_norm_layer(name, **params)(num_channels)


def is_norm_layer(module: nn.Module) -> bool:
    """Whether `module` is a layer built by this registry (one per catalogue norm site)."""
    return isinstance(module, _NORM_TYPES)
