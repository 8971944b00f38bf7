"""Run packing: the device side of the engine. Several runs of one job stacked and trained as one.

Runs whose networks compute the same training step (the same batch size and variant, different seeds;
`bn_precise` trains exactly as `bn`) form a *group*. A group's parameters and buffers are stacked
along a leading model dimension (`torch.func.stack_module_state`), and one `torch.func.vmap` over
`functional_call` trains all of them at once: x is (K, B, ...), one row of samples per model, and
BatchNorm running statistics are stacked buffers updated per model. A single run is a group of one.

The step reads everything from device tensors (per-model step counters, epoch orders, augmentation
draws; the learning rate is computed from the step counter on the device) and writes everything in
place (a flat parameter buffer, momentum, statistics, a per-model loss ring), with no host sync, so
`workers.graphs.GraphedStep` can capture it once and replay it; on a CPU the same function runs
eagerly, which is how the tests check it against the plain eager oracle (tests/oracle.py).
The per-run host bookkeeping (positions, reports, outcomes) is `workers.engine.PackTrainer`'s.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from app.core.dataset_format import IGNORE_LABEL
from app.core.progress import Point
from models.hybrid_norms import switchable_mixtures
from workers.augment import Augmentation, Feed, apply_augmentation, augments, epoch_augmentation, epoch_crops
from workers.checkpoint import Checkpoint
from workers.data import DeviceData, epoch_order
from workers.diagnostics import NOISE_SAMPLE_EVERY, noise_terms
from workers.graphs import GraphedStep
from workers.precise_bn import precise_bn_batches, precise_bn_order
from workers.run_config import (
    RunConfig,
    autocast,
    build_run_model_and_init,
    lr_scales,
    make_optimizer,
    optimizer_param_names,
)
from workers.schedule import Schedule
from workers.segmentation import confusion, pixel_loss, previews
from workers.segmentation import evaluate as evaluate_segmentation

if TYPE_CHECKING:
    from workers.engine import Outcome, RunReporter

EVAL_BATCH = 1024  # validation samples per forward, over all the group's models


def train_signature(cfg: RunConfig) -> str:
    """Runs with equal signatures run the same training computation, so they stack into one vmap group.
    `bn_precise` trains exactly as `bn` (only its evaluation statistics are recomputed per run)."""
    norm, params = cfg.norm, dict(cfg.norm_params)
    if norm == "bn_precise":
        norm = "bn"
        params.pop("precise_samples", None)
    return json.dumps([cfg.batch_size, norm, params], sort_keys=True)


@dataclass
class Member:
    """One run of a pack: its host-side position and bookkeeping (the device state lives in its group)."""

    index: int
    cfg: RunConfig
    sched: Schedule
    reporter: RunReporter
    carry: Checkpoint | None  # training state between groups, None while in a group
    epoch: int = 0
    batch: int = 0
    step: int = 0
    elapsed_before: float = 0.0  # wall time of earlier attempts
    started: float = 0.0  # perf_counter() when this attempt started
    window_from: int = 0  # first step of the current loss window
    window_start: float = 0.0
    last_report: float = 0.0
    points: list[Point] = field(default_factory=list)
    result: Outcome | BaseException | None = None
    transfer: dict[str, Any] | None = None  # what its `init` transferred, once its network was built
    preview: dict[str, Any] | None = None  # segmentation: its predicted mask of one validation image, at the end
    finals: dict[str, float] | None = None  # resumed from a final checkpoint: the metrics it ended with

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.started

    def resume_from(self, ckpt: Checkpoint) -> None:
        if ckpt.step != ckpt.epoch * self.sched.per_epoch + ckpt.batch:
            raise ValueError(f"checkpoint position {ckpt.epoch}/{ckpt.batch}/{ckpt.step} is not this budget's")
        self.epoch, self.batch, self.step = ckpt.epoch, ckpt.batch, ckpt.step
        self.elapsed_before = ckpt.elapsed
        self.window_from = ckpt.step - len(ckpt.window)
        self.finals = ckpt.final_metrics


class Probe:
    """Forward pre-hooks on a group's BatchNorm layers. Inside the vmapped forward they see one model's
    input and (through functional_call) its own running statistics, and append what the current
    mode asks for: BN batch-statistics noise, or the per-batch statistics precise BN averages."""

    def __init__(self, base: nn.Module) -> None:
        named = [(n, m) for n, m in base.named_modules() if isinstance(m, _BatchNorm) and m.track_running_stats]
        self.names = [n for n, _ in named]
        self.layers = [m for _, m in named]
        self.mode: str | None = None
        self.out: list[tuple[torch.Tensor, torch.Tensor]] = []
        for m in self.layers:
            m.register_forward_pre_hook(self._hook)

    def __bool__(self) -> bool:
        return bool(self.layers)

    @torch.no_grad()
    def _hook(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        if self.mode is None or not module.training:
            return
        assert isinstance(module, _BatchNorm)
        if self.mode == "noise":
            assert module.running_mean is not None and module.running_var is not None
            self.out.append(noise_terms(inputs[0], module.running_mean, module.running_var))
        else:  # "precise": the batch mean and unbiased variance BatchNorm folds into its running averages
            x = inputs[0].detach().float()
            var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=1)
            self.out.append((mean, var))


class PackGroup:
    """K runs with one training signature, stacked; owns the device state and the vmapped step."""

    def __init__(
        self, members: list[Member], data: DeviceData, device: torch.device, graphs_off: str | None = None
    ) -> None:
        self.members, self.data, self.device, self.graphs_off = members, data, device, graphs_off
        self.cfg, self.sched = members[0].cfg, members[0].sched  # what the group's runs share
        self.k = len(members)
        self.vmap_one = False  # a group of one steps without vmap (tests switch this to compare)
        self.gathered_loss = False  # the loss from log_softmax and gather (while a vmapped CPU step runs)
        self.segmentation = data.kind == "segmentation"  # per-pixel classes: logits (B, K, H, W), masks (B, H, W)
        self.confusion: dict[str, torch.Tensor] = {}  # segmentation: per split, (K models, classes, classes)
        self._stack_models()
        self._init_positions()
        self._build_steps()

    def _stack_models(self) -> None:
        """The members' networks as one flat parameter buffer (and momentum) plus stacked buffers."""
        k, device = self.k, self.device
        models = []
        for m in self.members:
            model, m.transfer = build_run_model_and_init(m.cfg, self.data, device)
            if m.carry is not None:
                model.load_state_dict(m.carry.model)
            model.train()
            models.append(model)
        self.shadow = models[0]  # a real module: state_dict layout, optimizer format
        self.base = copy.deepcopy(models[0]).to("meta")  # functional_call's structure
        self.base.train()
        self.probe = Probe(self.base)
        self.batch_stats = any(getattr(m, "running_mean", None) is not None for m in self.base.modules())
        stacked_params, stacked_buffers = stack_module_state(models)  # type: ignore[arg-type]

        # Parameters live in one flat buffer, each as a contiguous (K, *shape) block, so the optimizer
        # is a handful of kernels over the whole pack and each block is a leaf autograd can target.
        # Blocks follow the optimizer's order: weight-decayed (>1-D) parameters first, so decay is one
        # add over a prefix of the buffer.
        self.names = optimizer_param_names(self.shadow)
        shapes = {n: tuple(p.shape) for n, p in self.shadow.named_parameters()}
        sizes = [math.prod(shapes[n]) for n in self.names]
        self.flat = torch.empty(k * sum(sizes), device=device)
        self.mom = torch.zeros_like(self.flat)
        self.params: dict[str, torch.Tensor] = {}
        self.mom_views: dict[str, torch.Tensor] = {}
        at = self.decayed = 0
        for name, n in zip(self.names, sizes, strict=True):
            self.params[name] = self.flat[at : at + k * n].view(k, *shapes[name])
            self.mom_views[name] = self.mom[at : at + k * n].view(k, *shapes[name])
            at += k * n
            if len(shapes[name]) > 1:
                self.decayed = at
        # Runs that start at one position stay in step: one learning rate for all. Otherwise (a resumed
        # run next to fresh ones) each run's rate is spread over its parameters with `owner`.
        self.lockstep = len({m.step for m in self.members}) == 1
        self.owner = None
        if not self.lockstep:
            self.owner = torch.cat([torch.arange(k, device=device).repeat_interleave(n) for n in sizes])
        # Per-parameter learning-rate multipliers (fine-tuning's backbone_lr_mult), spread over the flat buffer.
        scales = lr_scales(self.shadow, self.cfg)
        self.lr_scale: torch.Tensor | None = None
        if scales:
            self.lr_scale = torch.cat(
                [
                    torch.full((k * n,), scales.get(name, 1.0), device=device)
                    for name, n in zip(self.names, sizes, strict=True)
                ]
            )
        with torch.no_grad():
            for name in self.names:
                self.params[name].copy_(stacked_params[name])
        for view in self.params.values():
            view.requires_grad_(True)
        self.param_list = [self.params[n] for n in self.names]
        # On a CPU the step gathers gradients into a buffer of the flat layout (a GPU step concatenates them,
        # as it always did, inside its CUDA graph).
        self.grad_views: list[torch.Tensor] | None = None
        if device.type == "cpu":
            self.grad = torch.empty_like(self.flat)
            self.grad_views = [
                self.grad[p.storage_offset() : p.storage_offset() + p.numel()].view(p.shape) for p in self.param_list
            ]
        self.buffers = {name: b.detach().clone() for name, b in stacked_buffers.items()}
        for i, m in enumerate(self.members):
            if m.carry is None:
                continue
            for idx, st in m.carry.optimizer["state"].items():
                buf = st.get("momentum_buffer")
                if buf is not None:
                    self.mom_views[self.names[int(idx)]][i].copy_(buf)

    def _init_positions(self) -> None:
        """Per-model training position and bookkeeping, all on the device, from each member's carry."""
        k, device, cfg = self.k, self.device, self.cfg
        b, per_epoch = cfg.batch_size, self.sched.per_epoch
        self.window = max(1, min(cfg.log_every_steps, per_epoch))  # longest loss window between checks
        self.step = torch.tensor([m.step for m in self.members], dtype=torch.long, device=device)
        self.arange_b = torch.arange(b, device=device)
        self.orders = torch.zeros(k, per_epoch * b, dtype=torch.long, device=device)
        self.augmenting = augments(cfg.augment, self.data.kind)
        self.feed = Feed.of(cfg.input, self.data.input_shape, self.data.kind)
        crops = self.feed is not None and self.feed.random_crop
        self.cy = torch.zeros(k, per_epoch * b if crops else 0, dtype=torch.long, device=device)
        self.cx = torch.zeros_like(self.cy)
        self.flip = torch.zeros(k, per_epoch * b, dtype=torch.bool, device=device)
        self.dy = torch.zeros(k, per_epoch * b, dtype=torch.long, device=device)
        self.dx = torch.zeros(k, per_epoch * b, dtype=torch.long, device=device)
        self.epoch_loss = torch.zeros(k, device=device)
        self.ring = torch.zeros(k, self.window, device=device)
        self.grad_norm = torch.zeros(k, device=device)
        self.noise = torch.zeros(k, 3, device=device)  # sums of mean noise, var noise; hook calls
        for i, m in enumerate(self.members):
            if m.epoch < self.sched.epochs:
                self.load_epoch(i)
            if m.carry is not None:
                self.epoch_loss[i] = m.carry.epoch_loss
                window = m.carry.window
                for j, v in enumerate(window):
                    self.ring[i, (m.step - len(window) + j) % self.window] = v
                if m.carry.noise is not None:
                    self.noise[i] = torch.tensor(m.carry.noise, dtype=torch.float32)
            m.carry = None

    def _build_steps(self) -> None:
        """The step, one GraphedStep per combination of the occasional extras (BN-noise sampling every few
        steps, the grad norm at each logging step), captured when first needed; they share one memory
        pool, since they replay one after another on the group's stream."""
        device = self.device
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" and self.graphs_off is None else None
        pool = torch.cuda.graph_pool_handle() if self.stream is not None else None
        self.steps: dict[tuple[bool, bool], GraphedStep] = {}
        for noise in (False, True):
            for gradnorm in (False, True):
                self.steps[(noise, gradnorm)] = GraphedStep(
                    functools.partial(self.train_step, noise, gradnorm),
                    device,
                    self.state,
                    f"{self.label} step{' +noise' if noise else ''}{' +grad_norm' if gradnorm else ''}",
                    stream=self.stream,
                    pool=pool,
                    off=self.graphs_off,
                )

    @property
    def label(self) -> str:
        return f"{self.cfg.norm} pack of {self.k} at batch {self.cfg.batch_size}"

    def state(self) -> list[torch.Tensor]:
        """Every tensor the step mutates."""
        return [
            self.flat,
            self.mom,
            *self.buffers.values(),
            self.step,
            self.epoch_loss,
            self.ring,
            self.grad_norm,
            self.noise,
        ]

    def load_epoch(self, i: int) -> None:
        """Data order and augmentation draws of model i's current epoch, into its rows."""
        m, n = self.members[i], self.orders.shape[1]
        self.orders[i].copy_(epoch_order(m.cfg.seed, m.epoch, m.cfg.budget["train_size"], n).to(self.device))
        if self.augmenting:
            aug = epoch_augmentation(m.cfg.augment, m.cfg.seed, m.epoch, n, self.data.kind, self.device)
            assert aug is not None
            if aug.flip is not None:
                self.flip[i].copy_(aug.flip)
            if aug.dy is not None and aug.dx is not None:
                self.dy[i].copy_(aug.dy)
                self.dx[i].copy_(aug.dx)
        crops = epoch_crops(self.feed, m.cfg.seed, m.epoch, n, self.device) if self.feed is not None else None
        if crops is not None:
            self.cy[i].copy_(crops[0])
            self.cx[i].copy_(crops[1])

    # -- the step ----------------------------------------------------------------------------
    def lr(self) -> torch.Tensor:
        """Each model's learning rate for its next step, from its step counter."""
        return self.sched.device_lr(self.step)

    def batch_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each model's next batch, gathered by its own order at its own position: (K, B, ...)."""
        data, augment = self.data, self.cfg.augment
        cols = (self.step % self.sched.per_epoch).unsqueeze(1) * self.sched.batch_size + self.arange_b
        idx = self.orders.gather(1, cols)
        xb = data.x_train[idx]
        if self.augmenting:
            padding = int(augment.get("crop_padding", 0))
            aug = Augmentation(
                self.flip.gather(1, cols).flatten() if augment.get("hflip") else None,
                self.dy.gather(1, cols).flatten() if padding else None,
                self.dx.gather(1, cols).flatten() if padding else None,
                padding,
            )
            xb = apply_augmentation(xb.flatten(0, 1), aug).view(xb.shape)
            if self.segmentation:  # the masks take their images' flips and crops; padding is ignored
                yb = data.y_train[idx]
                masks = apply_augmentation(yb.flatten(0, 1).unsqueeze(1), aug, fill=IGNORE_LABEL)
                return self._fed_train(data.prepare(xb), cols), masks.view(yb.shape)
        return self._fed_train(data.prepare(xb), cols), data.y_train[idx]

    def _fed_train(self, x: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """A normalized training batch (K, B, ...) resized and (randomly) cropped as the job's `input` says."""
        if self.feed is None:
            return x
        random = self.feed.random_crop
        fed = self.feed.train(
            x.flatten(0, 1),
            self.cy.gather(1, cols).flatten() if random else None,
            self.cx.gather(1, cols).flatten() if random else None,
        )
        return fed.view(*x.shape[:2], *fed.shape[1:])

    def fed(self, x: torch.Tensor) -> torch.Tensor:
        """A raw evaluation (or statistics) batch as the network sees it: normalized, resized, centre-cropped."""
        x = self.data.prepare(x)
        if self.feed is None:
            return x
        out = self.feed.eval(x.flatten(0, x.dim() - 4))  # any leading dims: (N, ...) or (K, B, ...)
        return out.view(*x.shape[:-3], *out.shape[1:])

    def _forward(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor) -> Any:
        return functional_call(self.base, (params, buffers), (x,))

    def _loss(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor, y: Any) -> Any:
        logits = self._forward(params, buffers, x)
        if self.segmentation:  # masked log_softmax/gather over the class dim 1, on every device
            return pixel_loss(logits, y)
        if self.gathered_loss:  # cross_entropy's arithmetic (fp32, mean over the batch) from ops vmap batches natively
            return -F.log_softmax(logits.float(), -1).gather(-1, y.unsqueeze(-1)).mean()
        return F.cross_entropy(logits, y)

    def _loss_and_noise(
        self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.probe.out = []
        loss = self._loss(params, buffers, x, y)
        terms, self.probe.out = self.probe.out, []
        return loss, torch.stack([t[0] for t in terms]).sum(), torch.stack([t[1] for t in terms]).sum()

    def _each(self, fn: Callable[..., Any], x: torch.Tensor, y: torch.Tensor) -> Any:
        """fn(params, buffers, x, y) for every model: one vmapped call; for a group of one, a plain call
        on model 0's views (the same arithmetic, without vmap's per-op dispatch, which on a CPU costs a
        single run a third of its speed). Results have the leading model dimension either way."""
        if self.k > 1 or self.vmap_one:
            # On a CPU, vmap runs cross_entropy through a Python decomposition, a tenth of a small model's step;
            # log_softmax and gather have batching rules (the same loss to round-off; a GPU step is unchanged).
            self.gathered_loss = self.device.type == "cpu"
            try:
                return vmap(fn)(self.params, self.buffers, x, y)
            finally:
                self.gathered_loss = False
        params = {name: p[0] for name, p in self.params.items()}
        buffers = {name: b[0] for name, b in self.buffers.items()}  # views: in-place statistics updates land
        out = fn(params, buffers, x[0], y[0])
        return tuple(t.unsqueeze(0) for t in out) if isinstance(out, tuple) else out.unsqueeze(0)

    def train_step(self, noise: bool, gradnorm: bool) -> None:
        """One training step of every model in the group; device tensors in, device tensors out."""
        cfg = self.cfg
        with torch.no_grad():
            x, y = self.batch_inputs()
        noise = noise and bool(self.probe)
        with autocast(self.device, cfg.precision):
            if noise:
                self.probe.mode = "noise"
                try:
                    losses, d_mean, d_var = self._each(self._loss_and_noise, x, y)
                finally:
                    self.probe.mode = None
            else:
                losses = self._each(self._loss, x, y)
        grads = torch.autograd.grad(losses.sum(), self.param_list)
        with torch.no_grad():
            if self.grad_views is None:
                g = torch.cat([gr.reshape(-1) for gr in grads])
            else:  # one copy into the flat layout (cat would first copy the non-contiguous ones, then all)
                torch._foreach_copy_(self.grad_views, grads)
                g = self.grad
            if gradnorm:  # as torch.nn.utils.get_total_norm, per model, on the steps a window reports it
                per_tensor = torch.stack([torch.linalg.vector_norm(gr.flatten(1), dim=1) for gr in grads], dim=1)
                due = (self.step + 1) % cfg.log_every_steps == 0
                self.grad_norm.copy_(torch.where(due, torch.linalg.vector_norm(per_tensor, dim=1), self.grad_norm))
            # SGD with momentum (torch.optim.SGD's arithmetic): d = g + wd·p; m = μ·m + d; p -= lr·m
            if self.decayed:
                g[: self.decayed].add_(self.flat[: self.decayed], alpha=cfg.optimizer["weight_decay"])
            self.mom.mul_(cfg.optimizer["momentum"]).add_(g)
            lr = self.lr()
            lr = lr[0] if self.owner is None else lr.index_select(0, self.owner)
            if self.lr_scale is not None:
                lr = lr * self.lr_scale
            self.flat.addcmul_(self.mom, lr, value=-1.0)
            loss = losses.detach().float()
            self.epoch_loss.add_(loss)
            self.ring.scatter_(1, (self.step % self.window).unsqueeze(1), loss.unsqueeze(1))
            if noise:
                sampled = self.step % NOISE_SAMPLE_EVERY == 0
                terms = torch.stack([d_mean.float(), d_var.float(), torch.full_like(loss, len(self.probe.layers))], 1)
                self.noise.add_(torch.where(sampled.unsqueeze(1), terms, torch.zeros_like(terms)))
            self.step.add_(1)

    def launch(self) -> None:
        """Start this group's next step (on its own stream on a GPU); `join` waits for it."""
        noise = bool(self.probe) and any(m.step % NOISE_SAMPLE_EVERY == 0 for m in self.members)
        gradnorm = any((m.step + 1) % self.cfg.log_every_steps == 0 for m in self.members)
        step = self.steps[(noise, gradnorm)]
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                step()
        else:
            step()

    def join(self) -> None:
        if self.stream is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)

    @property
    def graphed(self) -> bool:
        return self.steps[(False, False)].captured

    @property
    def eager_reason(self) -> str | None:
        return self.steps[(False, False)].reason

    # -- epoch ends ----------------------------------------------------------------------------
    def read_windows(self) -> tuple[list[list[float]], list[float]]:
        """Host copies of the loss ring and grad norms (one sync)."""
        return self.ring.tolist(), self.grad_norm.tolist()

    def window_of(self, ring: list[list[float]], i: int) -> list[float]:
        m = self.members[i]
        return [ring[i][s % self.window] for s in range(m.window_from, m.step)]

    @torch.no_grad()
    def evaluate(self, split: str = "val") -> tuple[list[float], list[float]]:
        """Accuracy and mean loss of every model on the validation (or test) split, in eval mode (running
        statistics)."""
        data, k = self.data, self.k
        xs, ys = (data.x_val, data.y_val) if split == "val" else (data.x_test, data.y_test)
        assert xs is not None and ys is not None, f"no {split} split"
        if self.segmentation:  # pixel accuracy and loss; the confusion matrices give the IoU metrics
            self.base.eval()
            try:
                fwd = vmap(self._forward, in_dims=(0, 0, None))
                acc, loss, self.confusion[split] = evaluate_segmentation(
                    fwd, self.params, self.buffers, self.fed, xs, ys, k, data.num_classes
                )
                if split == "val" and all(m.epoch + 1 == self.sched.epochs for m in self.members):
                    shown = previews(fwd, self.params, self.buffers, self.fed, xs, ys)
                    for m, p in zip(self.members, shown, strict=True):
                        m.preview = p
            finally:
                self.base.train()
            return acc, loss
        correct = torch.zeros(k, dtype=torch.long, device=self.device)
        loss_sum = torch.zeros(k, device=self.device)
        chunk = max(128, EVAL_BATCH // k)
        self.base.eval()
        try:
            fwd = vmap(self._forward, in_dims=(0, 0, None))
            for i in range(0, len(xs), chunk):
                x = self.fed(xs[i : i + chunk])
                y = ys[i : i + chunk]
                logits = fwd(self.params, self.buffers, x)
                n = logits.shape[1]
                loss_sum += F.cross_entropy(logits.flatten(0, 1), y.repeat(k), reduction="none").view(k, n).sum(1)
                correct += (logits.argmax(2) == y).sum(1)
        finally:
            self.base.train()
        n = len(xs)
        return [c / n for c in correct.tolist()], [v / n for v in loss_sum.tolist()]

    def repeat(
        self,
        fn: Callable[[], None],
        scratch: dict[str, torch.Tensor],
        counters: list[torch.Tensor],
        times: int,
        what: str,
    ) -> None:
        """Call `fn` `times` times, replayed from one CUDA graph where that pays. `fn` updates `scratch`
        (copies of the group's buffers) and `counters` (tensors that start at zero); capturing runs `fn`
        once, so both are put back before the counted calls."""
        run = GraphedStep(
            fn,
            self.device,
            lambda: [*scratch.values(), *counters],
            f"{self.label} {what}",
            verify=False,
            off=self.graphs_off or ("too few batches" if times <= 2 else None),
        )
        if not run.tried:
            run()
            for name, t in self.buffers.items():
                scratch[name].copy_(t)
            for t in counters:
                t.zero_()
        for _ in range(times):
            run()

    @torch.no_grad()
    def train_mode_accuracy(self) -> list[float]:
        """Validation accuracy of every model with batch statistics (train-mode norms), in batches of the
        training size: its gap to eval-mode accuracy is BatchNorm's train/test discrepancy. Runs on
        scratch copies of the running statistics (which BRN's forward reads), so they stay untouched."""
        data, b, k = self.data, self.sched.batch_size, self.k
        if self.segmentation:
            return self._train_mode_pixel_accuracy()
        scratch = {name: t.clone() for name, t in self.buffers.items()}
        correct = torch.zeros(k, dtype=torch.long, device=self.device)
        pos = torch.zeros((), dtype=torch.long, device=self.device)
        fwd = vmap(self._forward, in_dims=(0, 0, None))

        def one_batch() -> None:
            idx = pos * b + self.arange_b
            logits = fwd(self.params, scratch, self.fed(data.x_val[idx]))
            correct.add_((logits.argmax(2) == data.y_val[idx]).sum(1))
            pos.add_(1)

        n_val = len(data.x_val)
        full, rest = divmod(n_val, b)
        seen = full * b
        if full:
            self.repeat(one_batch, scratch, [correct, pos], full, "train-mode eval")
        if rest and not (self.batch_stats and rest < 2 <= b):
            logits = fwd(self.params, scratch, self.fed(data.x_val[full * b :]))
            correct += (logits.argmax(2) == data.y_val[full * b :]).sum(1)
            seen += rest
        return [c / max(seen, 1) for c in correct.tolist()]

    @torch.no_grad()
    def refresh_precise_bn(self, at: list[int]) -> None:
        """Precise BN (workers.precise_bn) for the `bn_precise` models among `at` (indices into the group):
        their running statistics become the equal-weight average of per-batch statistics over the plan's
        training samples, in batches of the run's size, without augmentation."""
        data, b, device = self.data, self.sched.batch_size, self.device
        counts = [precise_bn_batches(m.cfg, data.kind) if i in at else 0 for i, m in enumerate(self.members)]
        batches = max(counts)
        if batches == 0 or not self.probe:
            return
        orders = torch.zeros(self.k, batches * b, dtype=torch.long, device=device)
        for i, nb in enumerate(counts):
            if nb:
                orders[i, : nb * b].copy_(precise_bn_order(self.members[i].cfg, self.members[i].epoch, nb).to(device))
        n_batches = torch.tensor(counts, device=device)
        scratch = {name: t.clone() for name, t in self.buffers.items()}
        sums = [
            (
                torch.zeros(self.k, layer.num_features, device=device),
                torch.zeros_like(self.buffers[f"{n}.running_var"]),
            )
            for n, layer in zip(self.probe.names, self.probe.layers, strict=True)
        ]
        pos = torch.zeros((), dtype=torch.long, device=device)

        def stats(params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor) -> Any:
            self.probe.out = []
            self._forward(params, buffers, x)
            out, self.probe.out = self.probe.out, []
            return [t[0] for t in out], [t[1] for t in out]

        vstats = vmap(stats)

        def one_batch() -> None:
            idx = orders.gather(1, (pos * b + self.arange_b).expand(self.k, b))
            self.probe.mode = "precise"
            try:
                means, variances = vstats(self.params, scratch, self.fed(data.x_train[idx]))
            finally:
                self.probe.mode = None
            live = (pos < n_batches).unsqueeze(1)
            for (mean_sum, var_sum), mean, var in zip(sums, means, variances, strict=True):
                mean_sum.add_(torch.where(live, mean, torch.zeros_like(mean)))
                var_sum.add_(torch.where(live, var, torch.zeros_like(var)))
            pos.add_(1)

        self.repeat(one_batch, scratch, [*[t for pair in sums for t in pair], pos], batches, "precise BN")
        for i, nb in enumerate(counts):
            if not nb:
                continue
            for name, (mean_sum, var_sum) in zip(self.probe.names, sums, strict=True):
                self.buffers[f"{name}.running_mean"][i].copy_(mean_sum[i] / nb)
                self.buffers[f"{name}.running_var"][i].copy_(var_sum[i] / nb)

    @torch.no_grad()
    def _train_mode_pixel_accuracy(self) -> list[float]:
        """Segmentation's train_mode_accuracy: pixel accuracy with batch statistics, batch by batch (eagerly)."""
        data, b = self.data, self.sched.batch_size
        scratch = {name: t.clone() for name, t in self.buffers.items()}
        fwd = vmap(self._forward, in_dims=(0, 0, None))
        full, rest = divmod(len(data.x_val), b)
        spans = [(j * b, (j + 1) * b) for j in range(full)]
        if rest and not (self.batch_stats and rest < 2 <= b):
            spans.append((full * b, len(data.x_val)))
        cm = torch.zeros(self.k, data.num_classes, data.num_classes, dtype=torch.long, device=self.device)
        for lo, hi in spans:
            logits = fwd(self.params, scratch, self.fed(data.x_val[lo:hi]))
            cm += confusion(logits.argmax(2), data.y_val[lo:hi], data.num_classes)
        return (cm.diagonal(dim1=1, dim2=2).sum(1) / cm.sum((1, 2)).clamp(min=1)).tolist()

    def mixtures(self, i: int) -> dict[str, dict[str, float]]:
        """Model i's learned Switchable Normalization shares per layer (empty without that norm)."""
        return switchable_mixtures(self.base, {name: p[i] for name, p in self.params.items()})

    def checkpoint(self, i: int, ring: list[list[float]] | None = None) -> Checkpoint:
        """Model i's training state (`ring`: a host copy of the loss ring, when the caller has one)."""
        m = self.members[i]
        model: dict[str, torch.Tensor] = {}
        for key in self.shadow.state_dict():
            source = self.params[key] if key in self.params else self.buffers[key]
            model[key] = source[i].detach().clone()
        optimizer = make_optimizer(self.shadow, self.cfg.optimizer, m.sched.lr_after(m.step)).state_dict()
        optimizer["state"] = {
            j: {"momentum_buffer": self.mom_views[name][i].detach().clone()} for j, name in enumerate(self.names)
        }
        return Checkpoint(
            model=model,
            optimizer=optimizer,
            epoch=m.epoch,
            batch=m.batch,
            step=m.step,
            epoch_loss=float(self.epoch_loss[i]),
            window=self.window_of(self.ring.tolist() if ring is None else ring, i),
            elapsed=m.elapsed(),
            torch_rng=torch.get_rng_state(),
            noise=self.noise[i].tolist(),
        )
