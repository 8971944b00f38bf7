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
from models.precise_bn import precise_bn_samples, recompute_bn_stats
from workers.data import DeviceData, augment, epoch_order
from workers.diagnostics import BatchStatNoise

EVAL_BATCH = 1024
REPORT_EVERY_S = 2.0
NOISE_SAMPLE_EVERY = 10  # steps between BN batch-statistics noise samples


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


@dataclass
class Point:
    step: int
    epoch: float
    name: str
    value: float


@dataclass
class Progress:
    step: int
    epoch: int  # completed epochs
    samples: int


class RunReporter(Protocol):
    def report(self, points: list[Point], progress: Progress, checkpoint: dict[str, Any] | None = None) -> None:
        """Persist points, progress and (optionally) a checkpoint; raises to abort when the claim was lost."""

    def stop_reason(self) -> str | None:
        """`cancelled` or `shutdown` once training must stop, else None; called every step, so cheap."""


@dataclass
class Outcome:
    status: str  # succeeded | diverged | cancelled | interrupted (checkpointed for another worker)
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


def refresh_precise_bn(model: nn.Module, data: DeviceData, cfg: RunConfig, epoch: int) -> None:
    """`bn_precise`: replace the running averages by statistics over a fixed number of training
    samples, in batches of the run's size (Wu & Johnson 2021); a no-op for every other norm."""
    wanted = precise_bn_samples(model)
    if wanted is None:
        return
    n = min(wanted, cfg.budget["train_size"])
    n -= n % cfg.batch_size
    if n < cfg.batch_size or cfg.batch_size < 2 and data.kind == "tabular":
        return
    order = epoch_order(cfg.seed + 1_000_003, epoch, cfg.budget["train_size"], n).to(data.x_train.device)
    recompute_bn_stats(model, (data.prepare(data.x_train[idx]) for idx in order.split(cfg.batch_size)))


@torch.no_grad()
def train_mode_accuracy(model: nn.Module, data: DeviceData, batch_size: int) -> float:
    """Validation accuracy with batch statistics (train-mode norms), in batches of the training size:
    its gap to eval-mode accuracy is BatchNorm's train/test discrepancy. Running stats are untouched."""
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    batch_stats = any(getattr(m, "running_mean", None) is not None for m in model.modules())
    correct = seen = 0
    for x, y in zip(data.x_val.split(batch_size), data.y_val.split(batch_size), strict=True):
        if batch_stats and len(x) < 2 <= batch_size:
            continue  # a lone leftover sample has no batch statistics
        correct += int((model(data.prepare(x)).argmax(1) == y).sum())
        seen += len(x)
    model.load_state_dict(saved)
    return correct / max(seen, 1)


class Trainer:
    """Trains one run; resumable from any step through `checkpoint()` / `restore()`."""

    def __init__(self, cfg: RunConfig, data: DeviceData, device: torch.device, reporter: RunReporter) -> None:
        self.cfg, self.data, self.device, self.reporter = cfg, data, device, reporter
        self.model = build_run_model(cfg, data, device)
        self.model.train()
        self.base_lr = scaled_lr(cfg.optimizer, cfg.batch_size)
        self.optimizer = make_optimizer(self.model, cfg.optimizer, self.base_lr)
        self.per_epoch = steps_per_epoch(cfg.budget, cfg.batch_size)
        self.epochs = cfg.budget["epochs"]
        self.total = self.per_epoch * self.epochs
        self.warmup = round(cfg.optimizer["warmup_epochs"] * self.per_epoch)
        self.aug_gen = torch.Generator().manual_seed(cfg.seed * 7919 + 1)
        self.augmenting = data.kind == "image" and bool(cfg.augment.get("hflip") or cfg.augment.get("crop_padding"))
        # Position: `batch` batches of epoch `epoch` are done; `step` counts all batches.
        self.epoch = self.batch = self.step = 0
        self.epoch_loss = torch.zeros((), device=device)
        self.window: list[torch.Tensor] = []
        self.started = self.window_start = self.last_report = time.perf_counter()
        self.elapsed_before = 0.0  # wall time of earlier attempts
        self.lr = self.base_lr
        self.grad_norm = 0.0
        self.noise = BatchStatNoise(self.model)

    # -- checkpoints -------------------------------------------------------------------------
    def checkpoint(self) -> dict[str, Any]:
        return {
            "format": 1,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "epoch_loss": float(self.epoch_loss),
            "window": [float(v) for v in self.window],
            "aug_rng": self.aug_gen.get_state(),
            "torch_rng": torch.get_rng_state(),
            "elapsed": self.elapsed(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.epoch, self.batch, self.step = int(state["epoch"]), int(state["batch"]), int(state["step"])
        self.epoch_loss = torch.tensor(state["epoch_loss"], device=self.device)
        self.window = [torch.tensor(v, device=self.device) for v in state["window"]]
        self.aug_gen.set_state(state["aug_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.elapsed_before = float(state["elapsed"])

    # -- the loop ----------------------------------------------------------------------------
    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def progress(self) -> Progress:
        return Progress(self.step, self.epoch, self.step * self.cfg.batch_size)

    def outcome(self, status: str, error: str | None = None, finals: dict[str, float] | None = None) -> Outcome:
        return Outcome(status, finals or {}, self.step, self.step * self.cfg.batch_size, self.elapsed(), error)

    def run(self) -> Outcome:
        self.started = self.window_start = self.last_report = time.perf_counter()
        finals: dict[str, float] = {}
        while self.epoch < self.epochs:
            order = epoch_order(
                self.cfg.seed, self.epoch, self.cfg.budget["train_size"], self.per_epoch * self.cfg.batch_size
            )
            points: list[Point] = []
            for idx in batches(order.to(self.device), self.cfg.batch_size)[self.batch :]:
                self.train_step(idx)
                if self.step % self.cfg.log_every_steps == 0 or self.batch == self.per_epoch:
                    diverged = self.check_window(points)
                    if diverged:
                        self.reporter.report(points, self.progress())
                        return self.outcome("diverged", diverged)
                    if time.perf_counter() - self.last_report > REPORT_EVERY_S and self.batch < self.per_epoch:
                        self.reporter.report(points, self.progress())  # live progress inside long epochs
                        points = []
                        self.last_report = time.perf_counter()
                stop = self.reporter.stop_reason()
                if stop == "cancelled":
                    self.reporter.report(points, self.progress())
                    return self.outcome("cancelled", "cancelled by user")
                if stop == "shutdown" and self.batch < self.per_epoch:
                    self.reporter.report(points, self.progress(), self.checkpoint())
                    return self.outcome("interrupted", "worker shut down; resumes from its checkpoint")
            finals = self.end_epoch(points)
            if not math.isfinite(finals["val_loss"]):
                return self.outcome("diverged", f"validation loss became non-finite after epoch {self.epoch}")
        return self.outcome("succeeded", finals=finals)

    def train_step(self, idx: torch.Tensor) -> None:
        cfg = self.cfg
        xb = self.data.x_train[idx]
        if self.augmenting:
            xb = augment(xb, bool(cfg.augment.get("hflip")), int(cfg.augment.get("crop_padding", 0)), self.aug_gen)
        self.lr = lr_at(self.step, self.total, self.warmup, self.base_lr, cfg.optimizer["schedule"])
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.noise.active = bool(self.noise) and self.step % NOISE_SAMPLE_EVERY == 0
        loss = F.cross_entropy(self.model(self.data.prepare(xb)), self.data.y_train[idx])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if (self.step + 1) % cfg.log_every_steps == 0:
            self.grad_norm = float(
                torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters() if p.grad is not None])
            )
        self.optimizer.step()
        self.step += 1
        self.batch += 1
        detached = loss.detach()
        self.epoch_loss += detached
        self.window.append(detached)

    def check_window(self, points: list[Point]) -> str | None:
        """Every few steps: find a non-finite loss, and log the window's mean loss and timing."""
        losses = torch.stack(self.window)
        finite = torch.isfinite(losses)
        if not bool(finite.all()):
            bad = self.step - len(self.window) + int((~finite).nonzero()[0, 0]) + 1
            return f"training loss became non-finite at step {bad} (epoch {self.epoch + 1})"
        if self.step % self.cfg.log_every_steps == 0:
            now = time.perf_counter()
            at = self.epoch + self.batch / self.per_epoch
            step_ms = (now - self.window_start) * 1000 / len(self.window)
            points += [
                Point(self.step, at, "train_loss_step", float(losses.mean())),
                Point(self.step, at, "grad_norm", self.grad_norm),
                Point(self.step, at, "step_time_ms", step_ms),
            ]
            self.window_start = now
        self.window = []
        return None

    def end_epoch(self, points: list[Point]) -> dict[str, float]:
        refresh_precise_bn(self.model, self.data, self.cfg, self.epoch)
        val_acc, val_loss = evaluate(self.model, self.data)
        self.epoch += 1
        self.batch = 0
        finals = {
            "val_acc": val_acc,
            "val_loss": val_loss,
            "train_loss": float(self.epoch_loss) / self.per_epoch,
            "lr": self.lr,
            "images_per_s": self.step * self.cfg.batch_size / max(self.elapsed(), 1e-9),
            **self.noise.pop(),
        }
        if self.epoch == self.epochs:
            finals["val_acc_train_mode"] = train_mode_accuracy(self.model, self.data, self.cfg.batch_size)
        points += [Point(self.step, float(self.epoch), name, value) for name, value in finals.items()]
        self.epoch_loss = torch.zeros((), device=self.device)
        self.reporter.report(points, self.progress(), self.checkpoint() if self.epoch < self.epochs else None)
        return finals


def train(
    cfg: RunConfig, data: DeviceData, device: torch.device, reporter: RunReporter, resume: dict[str, Any] | None = None
) -> Outcome:
    trainer = Trainer(cfg, data, device, reporter)
    if resume is not None:
        trainer.restore(resume)
    return trainer.run()
