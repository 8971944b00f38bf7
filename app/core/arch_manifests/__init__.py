"""Torch-free manifests of the torchvision architectures' state dicts (key, shape, dtype, role), written by
scripts/make_arch_manifests.py: what the API checks uploaded weights against."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Literal

Role = Literal["param", "norm", "stat", "head"]


@dataclass(frozen=True)
class TensorSpec:
    """One state-dict entry of the network as torchvision builds it (ImageNet-1k head, its default norms).

    role: `param` (a convolution/linear weight or bias, or ConvNeXt's layer scale), `norm` (a norm layer's
    affine weight or bias; GroupNorm has the same names and shapes), `stat` (a BatchNorm running statistic;
    GroupNorm has none), `head` (the last classifier layer: its first dimension is the number of classes)."""

    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name: F32 for tensors, I64 for num_batches_tracked
    role: Role


@dataclass(frozen=True)
class ArchManifest:
    arch: str
    source: str
    num_classes: int
    norm_layers: tuple[str, ...]
    head: tuple[str, ...]
    parameters: int
    tensors: dict[str, TensorSpec]

    def keys(self, *roles: Role) -> list[str]:
        return [k for k, t in self.tensors.items() if t.role in roles]

    @property
    def has_batch_norm(self) -> bool:
        return bool(self.keys("stat"))


def manifest_archs() -> tuple[str, ...]:
    """Architectures with a manifest, i.e. those weights can be uploaded for."""
    return tuple(
        sorted(p.name.removesuffix(".json") for p in resources.files(__package__).iterdir() if p.name.endswith(".json"))
    )


@cache
def manifest(arch: str) -> ArchManifest:
    """The manifest of `arch`; ValueError naming the known ones for any other name."""
    if arch not in manifest_archs():
        raise ValueError(f"no weights can be uploaded for arch {arch!r}; use one of {', '.join(manifest_archs())}")
    raw = json.loads(resources.files(__package__).joinpath(f"{arch}.json").read_text())
    # The JSON's keys are the fields (written by scripts/make_arch_manifests.py); its lists become tuples.
    tensors = {name: TensorSpec(tuple(t["shape"]), t["dtype"], t["role"]) for name, t in raw.pop("tensors").items()}
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()}
    return ArchManifest(**fields, tensors=tensors)
