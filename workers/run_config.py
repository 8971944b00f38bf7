"""What one run trains: its `RunConfig`, the network it builds, its optimizer's layout and precision."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

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


def build_run_model(cfg: RunConfig, data: DeviceData, device: torch.device) -> nn.Module:
    torch.manual_seed(cfg.seed)  # same seed, same architecture → same initial weights
    model = build_model(
        cfg.arch,
        data.input_shape,
        data.num_classes,
        cfg.norm,
        cfg.norm_params,
        depth=cfg.model.get("depth", 20),
        width=cfg.model.get("width", 16),
        hidden=cfg.model.get("hidden"),
    )
    return model.to(device)


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
