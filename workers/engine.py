"""The training engine: one run on a fixed sample budget, reporting through a `RunReporter`.

Pure of the database and Celery, so tests and benchmarks drive it directly. `Trainer` is the
eager reference engine for one run; `workers.packing.PackTrainer` trains several runs of one job
and batch size at once (and captures the step in a CUDA graph) and is tested against it.
"""

from __future__ import annotations

import contextlib
import copy
import math
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from app.core.budget import steps_per_epoch
from models import build_model
from models.precise_bn import precise_bn_samples, recompute_bn_stats
from workers.data import DeviceData, epoch_order
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
    precision: str = "fp32"  # fp32 | bf16 (autocast of the training forward)


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


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast of the training forward (and loss) when the run asks for it; nothing for fp32.
    No weight cache, so the same context is safe inside a CUDA graph capture."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision != "bf16":
        raise ValueError(f"unknown precision {precision!r}; expected fp32 or bf16")
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)


@dataclass(frozen=True)
class Augmentation:
    """One epoch's random flips and crop offsets, one entry per sample position of the epoch."""

    flip: torch.Tensor | None  # bool (N,)
    dy: torch.Tensor | None  # int64 (N,)
    dx: torch.Tensor | None
    padding: int

    def slice(self, start: int, stop: int) -> Augmentation:
        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[start:stop]

        return Augmentation(cut(self.flip), cut(self.dy), cut(self.dx), self.padding)


def epoch_augmentation(cfg: RunConfig, epoch: int, kind: str, device: torch.device) -> Augmentation | None:
    """Augmentation draws for one epoch: a function of (seed, epoch) only, like the data order, so a
    resumed run and a packed run see the same crops and flips as an uninterrupted single one."""
    hflip, padding = bool(cfg.augment.get("hflip")), int(cfg.augment.get("crop_padding", 0))
    if kind != "image" or not (hflip or padding):
        return None
    n = cfg.budget["samples_per_epoch"]
    g = torch.Generator().manual_seed((cfg.seed * 7919 + 1) * 1_000_003 + epoch)
    flip = (torch.rand(n, generator=g) < 0.5).to(device) if hflip else None
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=g).to(device) if padding else None
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=g).to(device) if padding else None
    return Augmentation(flip, dy, dx, padding)


def apply_augmentation(
    x: torch.Tensor, flip: torch.Tensor | None, dy: torch.Tensor | None, dx: torch.Tensor | None, padding: int
) -> torch.Tensor:
    """Flips and padded crops of a uint8 (N, C, H, W) batch with per-sample draws already on its device;
    only device ops with static shapes, so it runs inside a CUDA graph."""
    n, c, h, w = x.shape
    if flip is not None:
        x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    if padding and dy is not None and dx is not None:
        padded = F.pad(x, (padding, padding, padding, padding))
        rows = (dy.view(n, 1) + torch.arange(h, device=x.device)).view(n, 1, h, 1)
        cols = (dx.view(n, 1) + torch.arange(w, device=x.device)).view(n, 1, 1, w)
        idx_n = torch.arange(n, device=x.device).view(n, 1, 1, 1)
        idx_c = torch.arange(c, device=x.device).view(1, c, 1, 1)
        x = padded[idx_n, idx_c, rows, cols]
    return x


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


def optimizer_param_names(model: nn.Module) -> list[str]:
    """Parameter names in the order `make_optimizer` numbers them in its state_dict."""
    named = list(model.named_parameters())
    return [n for n, p in named if p.ndim > 1] + [n for n, p in named if p.ndim <= 1]


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
        self.augmenting = data.kind == "image" and bool(cfg.augment.get("hflip") or cfg.augment.get("crop_padding"))
        self.aug: tuple[int, Augmentation | None] = (-1, None)  # (epoch, its draws)
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
        # Format 2: augmentation draws are a function of (seed, epoch), so no generator state is kept.
        # `workers.packing` writes the same format for each packed run, so either engine resumes either's.
        return {
            "format": 2,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,
            "batch": self.batch,
            "step": self.step,
            "epoch_loss": float(self.epoch_loss),
            "window": [float(v) for v in self.window],
            "torch_rng": torch.get_rng_state(),
            "elapsed": self.elapsed(),
        }

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        # A copy: SGD would adopt the checkpoint's momentum tensors and train them in place.
        self.optimizer.load_state_dict(copy.deepcopy(state["optimizer"]))
        self.epoch, self.batch, self.step = int(state["epoch"]), int(state["batch"]), int(state["step"])
        self.epoch_loss = torch.tensor(state["epoch_loss"], device=self.device)
        self.window = [torch.tensor(v, device=self.device) for v in state["window"]]
        if "torch_rng" in state:
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
        """One step on the samples `idx`, the next batch of the current epoch (position `self.batch`)."""
        cfg = self.cfg
        xb = self.data.x_train[idx]
        if self.augmenting:
            if self.aug[0] != self.epoch:
                self.aug = (self.epoch, epoch_augmentation(cfg, self.epoch, self.data.kind, self.device))
            aug = self.aug[1]
            if aug is not None:
                at = self.batch * cfg.batch_size
                cut = aug.slice(at, at + len(idx))
                xb = apply_augmentation(xb, cut.flip, cut.dy, cut.dx, cut.padding)
        self.lr = lr_at(self.step, self.total, self.warmup, self.base_lr, cfg.optimizer["schedule"])
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        self.noise.active = bool(self.noise) and self.step % NOISE_SAMPLE_EVERY == 0
        with autocast(self.device, cfg.precision):
            loss = F.cross_entropy(self.model(self.data.prepare(xb)), self.data.y_train[idx])
        self.noise.active = False  # sample training forwards only, never precise-BN or train-mode eval passes
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
