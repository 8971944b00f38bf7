"""What one run trains: its `RunConfig`, the network it builds, its optimizer's layout and precision."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from app.core import catalogue
from models import build_model
from workers.data import DeviceData


@dataclass(frozen=True)
class RunConfig:
    arch: str
    norm: str
    norm_params: dict[str, Any]
    batch_size: int
    seed: int
    budget: dict[str, int]
    model: dict[str, Any]  # depth, width, hidden
    optimizer: dict[str, Any]
    augment: dict[str, Any]
    log_every_steps: int = 50
    precision: str = "fp32"  # fp32 | bf16 (autocast of the training forward)
    input: dict[str, Any] = field(default_factory=dict)  # resize, crop, random_crop (JobSpec.input)
    # Fine-tuning: weights_id, backbone_lr_mult and `path`, the worker's local copy of the safetensors file.
    init: dict[str, Any] | None = None


def fed_shape(cfg: RunConfig, data: DeviceData) -> tuple[int, ...]:
    """The input shape the network sees: the stored one after the job's resize and crop."""
    return catalogue.fed_shape(data.input_shape, cfg.input.get("resize"), cfg.input.get("crop"))


@functools.lru_cache(maxsize=1)
def _weights(path: str) -> dict[str, torch.Tensor]:
    # The runs of a pack start from one file: read it once. safetensors, never a pickle.
    from safetensors.torch import load_file

    return load_file(path)


def build_run_model(cfg: RunConfig, data: DeviceData, device: torch.device) -> nn.Module:
    return build_run_model_and_init(cfg, data, device)[0]


def build_run_model_and_init(
    cfg: RunConfig, data: DeviceData, device: torch.device
) -> tuple[nn.Module, dict[str, Any] | None]:
    """The run's network on `device`, and what its `init` transferred (None when it trains from scratch)."""
    torch.manual_seed(cfg.seed)  # same seed, same architecture → same initial weights
    model = build_model(
        cfg.arch,
        fed_shape(cfg, data),
        data.num_classes,
        cfg.norm,
        cfg.norm_params,
        depth=cfg.model.get("depth", 20),
        width=cfg.model.get("width", 16),
        hidden=cfg.model.get("hidden"),
        levels=cfg.model.get("levels", 3),
        layers=cfg.model.get("layers", 2),
        heads=cfg.model.get("heads", 4),
    )
    transfer = None
    if cfg.init is not None:
        from models.transfer import load_pretrained

        transfer = load_pretrained(model, cfg.arch, cfg.norm, _weights(str(cfg.init["path"])), seed=cfg.seed)
        transfer = {"weights_id": cfg.init.get("weights_id"), **transfer}
        mult = float(cfg.init.get("backbone_lr_mult", 1.0))
        if mult != 1.0:
            transfer["backbone_lr_mult"] = mult
    return model.to(device), transfer


def lr_scales(model: nn.Module, cfg: RunConfig) -> dict[str, float]:
    """Per-parameter learning-rate multipliers (names absent: 1): the backbone's `init.backbone_lr_mult`,
    the re-initialised head's 1."""
    mult = float((cfg.init or {}).get("backbone_lr_mult", 1.0))
    if mult == 1.0:
        return {}
    from models.transfer import head_parameter_names

    head = head_parameter_names(model, cfg.arch)
    return {n: mult for n, _ in model.named_parameters() if n not in head}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast of the training forward (and loss) when the run asks for it; nothing for fp32.
    No weight cache, so the same context is safe inside a CUDA graph capture."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise ValueError(f"unknown precision {precision!r}; expected fp32 or bf16")
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)


def make_optimizer(model: nn.Module, opt: dict[str, Any], lr: float) -> torch.optim.Optimizer:
    # No weight decay on biases and norm scales/shifts (all 1-D parameters).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": opt["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=opt["momentum"])


def optimizer_param_names(model: nn.Module) -> list[str]:
    """Parameter names in the order `make_optimizer` numbers them in its state_dict."""
    named = list(model.named_parameters())
    return [n for n, p in named if p.ndim > 1] + [n for n, p in named if p.ndim <= 1]
