"""Fine-tuning: uploaded pretrained weights (a torchvision state dict) into a network built with any norm of the
zoo, saying what transferred and what did not (and why); the classifier head re-initialised, seeded."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from app.core import catalogue
from models.norms import is_norm_layer

__all__ = ["HEAD_SEED_OFFSET", "head_generator", "head_parameter_names", "load_pretrained"]

_STATS = ("running_mean", "running_var", "num_batches_tracked")
# The head's generator seed is the run's seed plus this: independent of the torch seed the network was built
# with, so every variant of one seed starts from the same head whatever its norm drew (nothing, by design).
HEAD_SEED_OFFSET = 7_777_777


def head_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed + HEAD_SEED_OFFSET)


def head_parameter_names(model: nn.Module, arch: str) -> set[str]:
    """The re-initialised classifier's parameter names (the rest is the pretrained backbone)."""
    head = catalogue.ARCHS[arch].head
    return {n for n, _ in model.named_parameters() if n.startswith(head + ".")}


def _upload_norm(arch: str, state: Mapping[str, torch.Tensor]) -> str:
    """Which norm the uploaded network was trained with: BatchNorm if it carries running statistics; otherwise
    the network's own affine-only norm (LayerNorm for ConvNeXt, GroupNorm for the BatchNorm networks)."""
    if any(k.endswith(".running_mean") for k in state):
        return "bn"
    return "ln_channel" if arch == "convnext_tiny" else "gn"


def _affine_transfers(upload_norm: str, norm: str) -> bool:
    """A norm's affine is meaningful only with the normalization it was learned under."""
    if upload_norm == "bn":
        return norm in catalogue.BN_FAMILY
    if upload_norm == "gn":
        return norm in ("gn", "gn_ws")
    return norm == upload_norm


@torch.no_grad()
def load_pretrained(
    model: nn.Module, arch: str, norm: str, state: Mapping[str, torch.Tensor], *, seed: int
) -> dict[str, Any]:
    """Copy the uploaded `state` into `model` (built for `norm`) and re-initialise its classifier head from a
    generator seeded by `seed`. Returns what was transferred, for the run's environment and the report.

    Backbone weights (convolutions, linear layers, ConvNeXt's layer scales) always transfer; the first
    convolution is summed over RGB for grayscale data. Norm affines transfer to the norm they were learned
    with (BatchNorm's to the BatchNorm family; GroupNorm's to `gn`/`gn_ws`; ConvNeXt's LayerNorm to
    `ln_channel`); BatchNorm running statistics to the BatchNorm family. Raises ValueError when a tensor does
    not fit, or when a norm that keeps pretrained statistics (`bn_frozen`, `bn_eval`) gets none.
    """
    from models.torchvision_nets import adapt_first_conv, first_conv_name, head_module, init_head

    info = catalogue.ARCHS[arch]
    if not info.torchvision:
        raise ValueError(f"weights can only be loaded into torchvision networks, not {arch!r}")
    own = model.state_dict()
    norm_modules = {name for name, m in model.named_modules() if is_norm_layer(m)}
    upload_norm = _upload_norm(arch, state)
    affine = _affine_transfers(upload_norm, norm)
    bn_family = norm in catalogue.BN_FAMILY
    first_conv = first_conv_name(arch) + ".weight"
    in_channels = own[first_conv].shape[1]
    upload_title = {"bn": "bn", "gn": "gn", "ln_channel": "ln"}[upload_norm]
    copied: dict[str, int] = {}

    def take(what: str, key: str, value: torch.Tensor) -> None:
        target = own[key]
        if key == first_conv:
            value = adapt_first_conv(value, in_channels)
            if in_channels != 3:
                what = f"first conv summed over RGB for {in_channels}-channel input"
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(f"uploaded {key} has shape {tuple(value.shape)}; the network's is {tuple(target.shape)}")
        target.copy_(value.to(target.dtype))
        copied[what] = copied.get(what, 0) + 1

    for key, value in state.items():
        prefix, _, leaf = key.rpartition(".")
        if prefix == info.head or key not in own:
            continue
        if prefix not in norm_modules:
            take("conv weights" if value.dim() == 4 else "backbone weights", key, value)
        elif leaf in _STATS:
            if bn_family and leaf != "num_batches_tracked":
                take("bn statistics", key, value)
        elif affine:
            take(f"{upload_title} affine", key, value)
    if norm in ("bn_frozen", "bn_eval") and "bn statistics" not in copied:
        raise ValueError(f"{norm} keeps pretrained BatchNorm statistics, and the uploaded weights have none")

    head = head_module(model, arch)
    init_head(head, arch, head_generator(seed))
    checked = _check_one_backbone_tensor(own, state, skip=first_conv, head=info.head, norm_modules=norm_modules)
    not_transferred = []
    if upload_norm == "bn" and not bn_family:
        not_transferred.append(
            "bn statistics: the variant's norm computes its own statistics from each sample, it has none to take"
        )
        not_transferred.append(
            "bn affine: learned to rescale BatchNorm-normalized activations; the norm starts at weight 1, bias 0"
        )
    elif upload_norm != "bn" and not affine:
        not_transferred.append(
            f"{upload_title} affine: learned under {upload_title}; the variant's norm starts at weight 1, bias 0"
        )
    return {
        "transferred": sorted(copied),
        "tensors": dict(sorted(copied.items())),
        "not_transferred": not_transferred,
        "upload_norm": upload_title,
        "head": f"re-initialised for {head.out_features} classes (seeded by the run's seed, the same for every variant)",
        "checked": checked,
    }


def _check_one_backbone_tensor(
    own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], *, skip: str, head: str, norm_modules: set[str]
) -> dict[str, Any] | None:
    """Evidence that the network starts from the upload: the first backbone tensor copied as it is (not the
    adapted first conv, a norm or the head), compared with the upload after loading, before any training."""
    for key, value in state.items():
        prefix = key.rpartition(".")[0]
        if key == skip or key not in own or prefix == head or prefix in norm_modules:
            continue
        loaded = own[key]
        return {
            "parameter": key,
            "equals_upload": bool(torch.equal(loaded, value.to(loaded.dtype))),
            "sum": float(loaded.double().sum()),
        }
    return None
