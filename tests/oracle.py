"""The test oracle: one run trained by a plain eager loop (module forward, backward, SGD step).

Production trains every run through the pack engine (workers/engine.py); the tests check that engine
against this loop, which shares only the run's definition with it (config, model, schedule, data
order, augmentation draws, precise-BN plan, BN-noise terms, epoch metrics, checkpoint format), not the
stacked, vmapped training. Keep it simple: it is the reference, not a second engine.
"""

from __future__ import annotations

import copy
import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from app.core.progress import Point, Progress
from models.hybrid_norms import switchable_mixtures
from models.precise_bn import recompute_bn_stats
from workers.augment import Augmentation, apply_augmentation, augments, epoch_augmentation
from workers.checkpoint import Checkpoint
from workers.data import DeviceData, epoch_order
from workers.diagnostics import NOISE_SAMPLE_EVERY, noise_terms
from workers.engine import Outcome, RunReporter
from workers.epoch_metrics import epoch_metrics
from workers.precise_bn import precise_bn_batches, precise_bn_order
from workers.run_config import RunConfig, autocast, build_run_model, make_optimizer
from workers.schedule import Schedule

EVAL_BATCH = 1024


def batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Consecutive slices of the epoch's order: batch sizes differ only in how they cut one stream."""
    return list(order.split(batch_size))


class BatchStatNoise:
    """Forward pre-hooks on every BatchNorm layer summing `noise_terms` while `active` (sampled steps)."""

    def __init__(self, model: nn.Module) -> None:
        self.layers = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
        self.active = False
        self.sums = [0.0, 0.0, 0.0]  # mean noise, var noise, layer calls
        for m in self.layers:
            m.register_forward_pre_hook(self._hook)

    def __bool__(self) -> bool:
        return bool(self.layers)

    @torch.no_grad()
    def _hook(self, module: _BatchNorm, inputs: tuple[Any, ...]) -> None:
        if self.active and module.training and module.running_mean is not None and module.running_var is not None:
            d_mean, d_var = noise_terms(inputs[0], module.running_mean, module.running_var)
            self.sums = [self.sums[0] + float(d_mean), self.sums[1] + float(d_var), self.sums[2] + 1]

    def pop(self) -> list[float]:
        out, self.sums = self.sums, [0.0, 0.0, 0.0]
        return out


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


@torch.no_grad()
def train_mode_accuracy(model: nn.Module, data: DeviceData, batch_size: int) -> float:
    """Validation accuracy with batch statistics, in batches of the training size; running stats untouched."""
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


def refresh_precise_bn(model: nn.Module, data: DeviceData, cfg: RunConfig, epoch: int) -> None:
    n = precise_bn_batches(cfg, data.kind)
    if n:
        order = precise_bn_order(cfg, epoch, n).to(data.x_train.device)
        recompute_bn_stats(model, (data.prepare(data.x_train[idx]) for idx in order.split(cfg.batch_size)))


class Trainer:
    """Trains one run eagerly; resumable from any step through `checkpoint()` / `restore()`."""

    def __init__(self, cfg: RunConfig, data: DeviceData, device: torch.device, reporter: RunReporter) -> None:
        self.cfg, self.data, self.device, self.reporter = cfg, data, device, reporter
        self.model = build_run_model(cfg, data, device)
        self.model.train()
        self.sched = Schedule.of(cfg)
        self.optimizer = make_optimizer(self.model, cfg.optimizer, self.sched.base_lr)
        self.per_epoch, self.epochs = self.sched.per_epoch, self.sched.epochs
        self.aug: tuple[int, Augmentation | None] = (-1, None)  # (epoch, its draws)
        # Position: `batch` batches of epoch `epoch` are done; `step` counts all batches.
        self.epoch = self.batch = self.step = 0
        self.epoch_loss = torch.zeros((), device=device)
        self.window: list[torch.Tensor] = []
        self.started = self.window_start = time.perf_counter()
        self.elapsed_before = 0.0
        self.grad_norm = 0.0
        self.noise = BatchStatNoise(self.model)

    def checkpoint(self) -> Checkpoint:
        return Checkpoint(
            model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            epoch=self.epoch,
            batch=self.batch,
            step=self.step,
            epoch_loss=float(self.epoch_loss),
            window=[float(v) for v in self.window],
            elapsed=self.elapsed(),
            torch_rng=torch.get_rng_state(),
            noise=list(self.noise.sums),
        )

    def restore(self, ckpt: Checkpoint) -> None:
        self.model.load_state_dict(ckpt.model)
        # A copy: SGD would adopt the checkpoint's momentum tensors and train them in place.
        self.optimizer.load_state_dict(copy.deepcopy(ckpt.optimizer))
        self.epoch, self.batch, self.step = ckpt.epoch, ckpt.batch, ckpt.step
        self.epoch_loss = torch.tensor(ckpt.epoch_loss, device=self.device)
        self.window = [torch.tensor(v, device=self.device) for v in ckpt.window]
        if ckpt.torch_rng is not None:
            torch.set_rng_state(ckpt.torch_rng)
        if ckpt.noise is not None:
            self.noise.sums = list(ckpt.noise)
        self.elapsed_before = ckpt.elapsed

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def outcome(self, status: str, error: str | None = None, finals: dict[str, float] | None = None) -> Outcome:
        return Outcome(status, finals or {}, self.step, self.step * self.cfg.batch_size, self.elapsed(), error)

    def progress(self) -> Progress:
        return Progress(self.step, self.epoch, self.step * self.cfg.batch_size)

    def run(self) -> Outcome:
        self.started = self.window_start = time.perf_counter()
        finals: dict[str, float] = {}
        while self.epoch < self.epochs:
            n = self.per_epoch * self.cfg.batch_size
            order = epoch_order(self.cfg.seed, self.epoch, self.cfg.budget["train_size"], n)
            points: list[Point] = []
            for idx in batches(order.to(self.device), self.cfg.batch_size)[self.batch :]:
                self.train_step(idx)
                if self.step % self.cfg.log_every_steps == 0 or self.batch == self.per_epoch:
                    diverged = self.check_window(points)
                    if diverged:
                        self.reporter.report(points, self.progress())
                        return self.outcome("diverged", diverged)
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
        cfg, data = self.cfg, self.data
        xb = data.x_train[idx]
        if augments(cfg.augment, data.kind):
            if self.aug[0] != self.epoch:
                n = self.per_epoch * cfg.batch_size
                draws = epoch_augmentation(cfg.augment, cfg.seed, self.epoch, n, data.kind, self.device)
                self.aug = (self.epoch, draws)
            assert self.aug[1] is not None
            at = self.batch * cfg.batch_size
            xb = apply_augmentation(xb, self.aug[1].slice(at, at + len(idx)))
        for group in self.optimizer.param_groups:
            group["lr"] = self.sched.lr(self.step)
        self.noise.active = bool(self.noise) and self.step % NOISE_SAMPLE_EVERY == 0
        with autocast(self.device, cfg.precision):
            loss = F.cross_entropy(self.model(data.prepare(xb)), data.y_train[idx])
        self.noise.active = False  # sample training forwards only, never precise-BN or train-mode eval passes
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if (self.step + 1) % cfg.log_every_steps == 0:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            self.grad_norm = float(torch.nn.utils.get_total_norm(grads))
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
        last = self.epoch == self.epochs
        finals = epoch_metrics(
            val_acc=val_acc,
            val_loss=val_loss,
            epoch_loss_sum=float(self.epoch_loss),
            steps_per_epoch=self.per_epoch,
            lr=self.sched.lr_after(self.step),
            samples=self.step * self.cfg.batch_size,
            elapsed=self.elapsed(),
            noise=self.noise.pop(),
            val_acc_train_mode=train_mode_accuracy(self.model, self.data, self.cfg.batch_size) if last else None,
            mixtures=switchable_mixtures(self.model) if last else None,
        )
        points += [Point(self.step, float(self.epoch), name, value) for name, value in finals.items()]
        self.epoch_loss = torch.zeros((), device=self.device)
        self.reporter.report(points, self.progress(), None if last else self.checkpoint())
        return finals


def train(
    cfg: RunConfig, data: DeviceData, device: torch.device, reporter: RunReporter, resume: Checkpoint | None = None
) -> Outcome:
    trainer = Trainer(cfg, data, device, reporter)
    if resume is not None:
        trainer.restore(resume)
    return trainer.run()
