"""The training engine: one run on a fixed sample budget, reporting through a `RunReporter`.

Pure of the database and Celery, so tests and benchmarks drive it directly.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from app.budget import steps_per_epoch
from models import build_model
from workers.data import DeviceData, augment, epoch_order

EVAL_BATCH = 1024


@dataclass(frozen=True)
class RunConfig:
    arch: str
    norm: str
    norm_params: dict[str, int]
    batch_size: int
    seed: int
    budget: dict[str, int]
    model: dict[str, Any]  # depth, width, hidden
    optimizer: dict[str, Any]
    augment: dict[str, Any]
    log_every_steps: int = 50


@dataclass
class Point:
    step: int
    epoch: float
    name: str
    value: float


class RunReporter(Protocol):
    def report(self, points: list[Point], *, step: int, epoch: int, samples: int) -> None:
        """Persist points and progress; may raise to abort (e.g. a stale attempt)."""

    def should_stop(self) -> bool:
        """True once the run was cancelled."""


@dataclass
class Outcome:
    status: str  # succeeded | diverged | cancelled
    final_metrics: dict[str, float] = field(default_factory=dict)
    steps: int = 0
    samples: int = 0
    wall_time_s: float = 0.0
    error: str | None = None


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["device"] = f"{device} ({torch.cuda.get_device_name(device)})"
        env["cuda"] = torch.version.cuda
    return env


def scaled_lr(opt: dict[str, Any], batch_size: int) -> float:
    ratio = batch_size / opt["reference_batch_size"]
    scale = {"linear": ratio, "sqrt": math.sqrt(ratio), "none": 1.0}[opt["lr_scaling"]]
    return float(opt["lr"] * scale)


def lr_at(step: int, total: int, warmup: int, base: float, schedule: str) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    if schedule == "constant":
        return base
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, opt: dict[str, Any], lr: float) -> torch.optim.Optimizer:
    # No weight decay on biases and norm scales/shifts (all 1-D parameters).
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": opt["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=lr, momentum=opt["momentum"])


@torch.no_grad()
def evaluate(model: nn.Module, data: DeviceData) -> tuple[float, float]:
    model.eval()
    correct = 0
    loss_sum = torch.zeros((), device=data.x_val.device)
    for i in range(0, len(data.x_val), EVAL_BATCH):
        x = data.prepare(data.x_val[i : i + EVAL_BATCH])
        y = data.y_val[i : i + EVAL_BATCH]
        logits = model(x)
        loss_sum += F.cross_entropy(logits, y, reduction="sum")
        correct += int((logits.argmax(1) == y).sum())
    model.train()
    n = len(data.x_val)
    return correct / n, float(loss_sum) / n


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


def batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Consecutive slices of the epoch's order: batch sizes differ only in how they cut one stream."""
    return list(order.split(batch_size))


def train(cfg: RunConfig, data: DeviceData, device: torch.device, reporter: RunReporter) -> Outcome:
    model = build_run_model(cfg, data, device)
    model.train()
    base_lr = scaled_lr(cfg.optimizer, cfg.batch_size)
    optimizer = make_optimizer(model, cfg.optimizer, base_lr)
    per_epoch = steps_per_epoch(cfg.budget, cfg.batch_size)
    epochs = cfg.budget["epochs"]
    total = per_epoch * epochs
    warmup = round(cfg.optimizer["warmup_epochs"] * per_epoch)
    aug_gen = torch.Generator().manual_seed(cfg.seed * 7919 + 1)
    is_image = data.kind == "image"
    log_every = cfg.log_every_steps
    step = 0
    start = time.perf_counter()
    window: list[torch.Tensor] = []

    for epoch in range(epochs):
        order = epoch_order(cfg.seed, epoch, cfg.budget["train_size"], per_epoch * cfg.batch_size).to(device)
        epoch_loss = torch.zeros((), device=device)
        points: list[Point] = []
        for i, idx in enumerate(batches(order, cfg.batch_size)):
            xb = data.x_train[idx]
            if is_image and (cfg.augment.get("hflip") or cfg.augment.get("crop_padding")):
                xb = augment(xb, bool(cfg.augment.get("hflip")), int(cfg.augment.get("crop_padding", 0)), aug_gen)
            lr = lr_at(step, total, warmup, base_lr, cfg.optimizer["schedule"])
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss = F.cross_entropy(model(data.prepare(xb)), data.y_train[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            detached = loss.detach()
            epoch_loss += detached
            window.append(detached)
            if step % log_every == 0 or i == per_epoch - 1:
                losses = torch.stack(window)
                finite = torch.isfinite(losses)
                if not bool(finite.all()):
                    bad = step - len(window) + int((~finite).nonzero()[0, 0]) + 1
                    reporter.report(points, step=step, epoch=epoch, samples=step * cfg.batch_size)
                    return Outcome(
                        "diverged",
                        steps=step,
                        samples=step * cfg.batch_size,
                        wall_time_s=time.perf_counter() - start,
                        error=f"training loss became non-finite at step {bad} (epoch {epoch + 1})",
                    )
                if step % log_every == 0:
                    points.append(Point(step, step / per_epoch, "train_loss_step", float(losses.mean())))
                window = []
                if reporter.should_stop():
                    reporter.report(points, step=step, epoch=epoch, samples=step * cfg.batch_size)
                    return Outcome(
                        "cancelled",
                        steps=step,
                        samples=step * cfg.batch_size,
                        wall_time_s=time.perf_counter() - start,
                        error="cancelled by user",
                    )
        val_acc, val_loss = evaluate(model, data)
        elapsed = time.perf_counter() - start
        finals = {
            "val_acc": val_acc,
            "val_loss": val_loss,
            "train_loss": float(epoch_loss) / per_epoch,
            "lr": lr,
            "images_per_s": step * cfg.batch_size / elapsed,
        }
        points += [Point(step, float(epoch + 1), name, value) for name, value in finals.items()]
        reporter.report(points, step=step, epoch=epoch + 1, samples=step * cfg.batch_size)
        if not math.isfinite(val_loss):
            return Outcome(
                "diverged",
                steps=step,
                samples=step * cfg.batch_size,
                wall_time_s=elapsed,
                error=f"validation loss became non-finite after epoch {epoch + 1}",
            )

    wall = time.perf_counter() - start
    finals["images_per_s"] = step * cfg.batch_size / wall
    return Outcome("succeeded", final_metrics=finals, steps=step, samples=step * cfg.batch_size, wall_time_s=wall)
