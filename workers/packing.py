"""Run packing: several runs of one job trained together in one process.

Runs whose networks compute the same training step (the same batch size and variant, different seeds;
`bn_precise` trains exactly as `bn`) form a *group*. A group's parameters and buffers are stacked
along a leading model dimension (`torch.func.stack_module_state`), and one `torch.func.vmap` over
`functional_call` trains all of them at once: x is (K, B, ...), one row of samples per model, and
BatchNorm running statistics are stacked buffers updated per model. A pack may hold several groups
(the variants of a batch size, and several batch sizes, each on its own `Schedule`); every loop
iteration steps each unfinished group once. On a GPU each group's step is one CUDA graph, replayed on
its own stream. (The worker packs one batch size at a time: on an H100 the groups' graphs barely
overlap, so mixing batch sizes measured no faster; bench/RESULTS.md.)

Every packed run keeps what a single run has: its own data order and augmentation draws (functions
of its seed), learning-rate position, loss window, metrics, checkpoints (the `Trainer` format, so
either engine resumes the other's), reporter and outcome. A run that diverges, is cancelled, stops
or loses its claim leaves the pack at that step boundary; the others are re-stacked from their
states and go on.

The step reads everything from device tensors (per-model step counters, epoch orders, augmentation
draws; the learning rate is computed from the step counter on the device) and writes everything in
place (a flat parameter buffer, momentum, statistics, a per-model loss ring), with no host sync, so
`workers.graphs.GraphedStep` can capture it once and replay it; on a CPU the same function runs
eagerly, which is how the tests check it against `Trainer`.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap
from torch.nn.modules.batchnorm import _BatchNorm

from app.core.budget import steps_per_epoch
from models import create_norm_layer
from workers.data import DeviceData, epoch_order
from workers.engine import (
    EVAL_BATCH,
    NOISE_SAMPLE_EVERY,
    REPORT_EVERY_S,
    Outcome,
    Point,
    Progress,
    RunConfig,
    RunReporter,
    apply_augmentation,
    autocast,
    build_run_model,
    epoch_augmentation,
    lr_at,
    make_optimizer,
    optimizer_param_names,
    scaled_lr,
)
from workers.graphs import GraphedStep, graphs_unavailable

log = logging.getLogger(__name__)

NOISE_EPS = 1e-5  # as workers.diagnostics
SHARED_FIELDS = ("arch", "budget", "model", "optimizer", "augment", "log_every_steps", "precision")
Result = Outcome | BaseException
OnDone = Callable[[int, Result], None]


def train_signature(cfg: RunConfig) -> str:
    """Runs with equal signatures run the same training computation, so they stack into one vmap group.
    `bn_precise` trains exactly as `bn` (only its evaluation statistics are recomputed per run)."""
    norm, params = cfg.norm, dict(cfg.norm_params)
    if norm == "bn_precise":
        norm = "bn"
        params.pop("precise_samples", None)
    return json.dumps([cfg.batch_size, norm, params], sort_keys=True)


@dataclass(frozen=True)
class Schedule:
    """One batch size's step budget and learning-rate schedule: a pack may hold several batch sizes,
    each group trains on its own (as `Trainer` does for a single run)."""

    batch_size: int
    per_epoch: int
    epochs: int
    warmup: int
    base_lr: float
    schedule: str

    @property
    def total(self) -> int:
        return self.per_epoch * self.epochs

    @classmethod
    def of(cls, cfg: RunConfig) -> Schedule:
        per_epoch = steps_per_epoch(cfg.budget, cfg.batch_size)
        return cls(
            cfg.batch_size,
            per_epoch,
            cfg.budget["epochs"],
            round(cfg.optimizer["warmup_epochs"] * per_epoch),
            scaled_lr(cfg.optimizer, cfg.batch_size),
            cfg.optimizer["schedule"],
        )


def check_packable(cfgs: Sequence[RunConfig]) -> None:
    """Packed runs share the network, budget, optimizer, augmentation and precision (not the batch size:
    each batch size is its own group)."""
    first = cfgs[0]
    for cfg in cfgs[1:]:
        for name in SHARED_FIELDS:
            if getattr(cfg, name) != getattr(first, name):
                raise ValueError(f"runs cannot be packed: they differ in {name}")


def precise_samples_of(cfg: RunConfig) -> int | None:
    if cfg.norm != "bn_precise":
        return None
    layer = create_norm_layer("bn_precise", 1, **cfg.norm_params)
    return int(getattr(layer, "precise_samples"))  # noqa: B009 (a PreciseBatchNorm attribute)


def noise_terms(module: _BatchNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`workers.diagnostics.BatchStatNoise`'s per-layer terms, for one model's input."""
    assert module.running_mean is not None and module.running_var is not None
    x = x.detach().float()
    dims = [0, *range(2, x.dim())]
    mean, var = x.mean(dims), x.var(dims, unbiased=False)
    std = (module.running_var + NOISE_EPS).sqrt()
    d_mean = ((mean - module.running_mean).abs() / std).mean()
    d_var = ((var - module.running_var).abs() / (module.running_var + NOISE_EPS)).mean()
    return d_mean, d_var


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
            self.out.append(noise_terms(module, inputs[0]))
        else:  # "precise": the batch mean and unbiased variance BatchNorm folds into its running averages
            x = inputs[0].detach().float()
            var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], correction=1)
            self.out.append((mean, var))


@dataclass
class Member:
    """One packed run: its host-side position and bookkeeping (the device state lives in its group)."""

    index: int
    cfg: RunConfig
    sched: Schedule
    reporter: RunReporter
    carry: dict[str, Any] | None  # training state between groups (a checkpoint), None while in a group
    epoch: int = 0
    batch: int = 0
    step: int = 0
    elapsed_before: float = 0.0
    window_from: int = 0  # first step of the current loss window
    window_start: float = 0.0
    last_report: float = 0.0
    points: list[Point] = field(default_factory=list)
    result: Result | None = None


class PackGroup:
    """K runs with one training signature, stacked; owns the device state and the vmapped step."""

    def __init__(self, pack: PackTrainer, members: list[Member]) -> None:
        self.pack, self.members = pack, members
        self.cfg, self.sched = members[0].cfg, members[0].sched  # what the group's runs share
        data, device, cfg = pack.data, pack.device, self.cfg
        self.k = k = len(members)
        models = []
        for m in members:
            model = build_run_model(m.cfg, data, device)
            if m.carry is not None:
                model.load_state_dict(m.carry["model"])
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
        self.lockstep = len({m.step for m in members}) == 1
        self.owner = None
        if not self.lockstep:
            self.owner = torch.cat([torch.arange(k, device=device).repeat_interleave(n) for n in sizes])
        with torch.no_grad():
            for name in self.names:
                self.params[name].copy_(stacked_params[name])
        for view in self.params.values():
            view.requires_grad_(True)
        self.param_list = [self.params[n] for n in self.names]
        self.buffers = {name: b.detach().clone() for name, b in stacked_buffers.items()}
        opt_names = optimizer_param_names(self.shadow)
        for i, m in enumerate(members):
            if m.carry is None:
                continue
            for idx, st in m.carry["optimizer"]["state"].items():
                buf = st.get("momentum_buffer")
                if buf is not None:
                    self.mom_views[opt_names[int(idx)]][i].copy_(buf)
        del models, stacked_params, stacked_buffers

        # Per-model training position and bookkeeping, all on the device.
        b, per_epoch = cfg.batch_size, self.sched.per_epoch
        self.window = max(1, min(cfg.log_every_steps, per_epoch))  # longest loss window between checks
        self.step = torch.tensor([m.step for m in members], dtype=torch.long, device=device)
        self.arange_b = torch.arange(b, device=device)
        self.orders = torch.zeros(k, per_epoch * b, dtype=torch.long, device=device)
        self.augmenting = data.kind == "image" and bool(cfg.augment.get("hflip") or cfg.augment.get("crop_padding"))
        self.flip = torch.zeros(k, per_epoch * b, dtype=torch.bool, device=device)
        self.dy = torch.zeros(k, per_epoch * b, dtype=torch.long, device=device)
        self.dx = torch.zeros(k, per_epoch * b, dtype=torch.long, device=device)
        self.epoch_loss = torch.zeros(k, device=device)
        self.ring = torch.zeros(k, self.window, device=device)
        self.grad_norm = torch.zeros(k, device=device)
        self.noise = torch.zeros(k, 3, device=device)  # sums of mean noise, var noise; hook calls
        for i, m in enumerate(members):
            if m.epoch < self.sched.epochs:
                self.load_epoch(i)
            if m.carry is not None:
                self.epoch_loss[i] = float(m.carry["epoch_loss"])
                window = [float(v) for v in m.carry["window"]]
                for j, v in enumerate(window):
                    self.ring[i, (m.step - len(window) + j) % self.window] = v
                if "noise" in m.carry:
                    self.noise[i] = torch.tensor(m.carry["noise"], dtype=torch.float32)
            m.carry = None

        self.stream = torch.cuda.Stream(device) if device.type == "cuda" and pack.graphs else None
        pool = torch.cuda.graph_pool_handle() if self.stream is not None else None
        # One graph per combination of the occasional extras (BN-noise sampling every few steps, the
        # grad norm at each logging step), captured when first needed; they share one memory pool,
        # since they replay one after another on the group's stream.
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
                    off=pack.graphs_off,
                )

    @property
    def label(self) -> str:
        cfg = self.members[0].cfg
        return f"{cfg.norm} pack of {self.k} at batch {cfg.batch_size}"

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
        m, pack = self.members[i], self.pack
        order = epoch_order(m.cfg.seed, m.epoch, m.cfg.budget["train_size"], self.orders.shape[1])
        self.orders[i].copy_(order.to(pack.device))
        if self.augmenting:
            aug = epoch_augmentation(m.cfg, m.epoch, pack.data.kind, pack.device)
            assert aug is not None
            if aug.flip is not None:
                self.flip[i].copy_(aug.flip)
            if aug.dy is not None and aug.dx is not None:
                self.dy[i].copy_(aug.dy)
                self.dx[i].copy_(aug.dx)

    # -- the step ----------------------------------------------------------------------------
    def lr(self) -> torch.Tensor:
        """Each model's learning rate for its next step, from its step counter (as `engine.lr_at`)."""
        sched = self.sched
        s = self.step.double()
        base, warmup = sched.base_lr, sched.warmup
        if sched.schedule == "constant":
            after = torch.full_like(s, base)
        else:
            progress = (s - warmup) / max(1, sched.total - warmup)
            after = base * 0.5 * (1.0 + torch.cos(math.pi * progress))
        lr = torch.where(s < warmup, base * (s + 1) / max(warmup, 1), after) if warmup > 0 else after
        return lr.float()

    def batch_inputs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each model's next batch, gathered by its own order at its own position: (K, B, ...)."""
        pack = self.pack
        data = pack.data
        cols = (self.step % self.sched.per_epoch).unsqueeze(1) * self.sched.batch_size + self.arange_b
        idx = self.orders.gather(1, cols)
        xb = data.x_train[idx]
        if self.augmenting:
            padding = int(pack.cfg.augment.get("crop_padding", 0))
            flip = self.flip.gather(1, cols).flatten() if pack.cfg.augment.get("hflip") else None
            dy = self.dy.gather(1, cols).flatten() if padding else None
            dx = self.dx.gather(1, cols).flatten() if padding else None
            xb = apply_augmentation(xb.flatten(0, 1), flip, dy, dx, padding).view(xb.shape)
        return data.prepare(xb), data.y_train[idx]

    def _forward(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor) -> Any:
        return functional_call(self.base, (params, buffers), (x,))

    def _loss(self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor, y: Any) -> Any:
        return F.cross_entropy(self._forward(params, buffers, x), y)

    def _loss_and_noise(
        self, params: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.probe.out = []
        loss = self._loss(params, buffers, x, y)
        terms, self.probe.out = self.probe.out, []
        return loss, torch.stack([t[0] for t in terms]).sum(), torch.stack([t[1] for t in terms]).sum()

    def train_step(self, noise: bool, gradnorm: bool) -> None:
        """One training step of every model in the group; device tensors in, device tensors out."""
        pack = self.pack
        with torch.no_grad():
            x, y = self.batch_inputs()
        noise = noise and bool(self.probe)
        with autocast(pack.device, pack.cfg.precision):
            if noise:
                self.probe.mode = "noise"
                try:
                    losses, d_mean, d_var = vmap(self._loss_and_noise)(self.params, self.buffers, x, y)
                finally:
                    self.probe.mode = None
            else:
                losses = vmap(self._loss)(self.params, self.buffers, x, y)
        grads = torch.autograd.grad(losses.sum(), self.param_list)
        with torch.no_grad():
            g = torch.cat([gr.reshape(-1) for gr in grads])
            if gradnorm:  # as torch.nn.utils.get_total_norm, per model, on the steps a window reports it
                per_tensor = torch.stack([torch.linalg.vector_norm(gr.flatten(1), dim=1) for gr in grads], dim=1)
                due = (self.step + 1) % pack.cfg.log_every_steps == 0
                self.grad_norm.copy_(torch.where(due, torch.linalg.vector_norm(per_tensor, dim=1), self.grad_norm))
            # SGD with momentum (torch.optim.SGD's arithmetic): d = g + wd·p; m = μ·m + d; p -= lr·m
            if self.decayed:
                g[: self.decayed].add_(self.flat[: self.decayed], alpha=pack.cfg.optimizer["weight_decay"])
            self.mom.mul_(pack.cfg.optimizer["momentum"]).add_(g)
            lr = self.lr()
            lr = lr[0] if self.owner is None else lr.index_select(0, self.owner)
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
        pack = self.pack
        noise = bool(self.probe) and any(m.step % NOISE_SAMPLE_EVERY == 0 for m in self.members)
        gradnorm = any((m.step + 1) % pack.cfg.log_every_steps == 0 for m in self.members)
        step = self.steps[(noise, gradnorm)]
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(pack.device))
            with torch.cuda.stream(self.stream):
                step()
        else:
            step()

    def join(self) -> None:
        if self.stream is not None:
            torch.cuda.current_stream(self.pack.device).wait_stream(self.stream)

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
    def evaluate(self) -> tuple[list[float], list[float]]:
        """Validation accuracy and mean loss of every model, in eval mode (as engine.evaluate)."""
        data, k = self.pack.data, self.k
        correct = torch.zeros(k, dtype=torch.long, device=self.pack.device)
        loss_sum = torch.zeros(k, device=self.pack.device)
        chunk = max(128, EVAL_BATCH // k)
        self.base.eval()
        try:
            fwd = vmap(self._forward, in_dims=(0, 0, None))
            for i in range(0, len(data.x_val), chunk):
                x = data.prepare(data.x_val[i : i + chunk])
                y = data.y_val[i : i + chunk]
                logits = fwd(self.params, self.buffers, x)
                n = logits.shape[1]
                loss_sum += F.cross_entropy(logits.flatten(0, 1), y.repeat(k), reduction="none").view(k, n).sum(1)
                correct += (logits.argmax(2) == y).sum(1)
        finally:
            self.base.train()
        n_val = len(data.x_val)
        return [c / n_val for c in correct.tolist()], [v / n_val for v in loss_sum.tolist()]

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
        pack = self.pack
        run = GraphedStep(
            fn,
            pack.device,
            lambda: [*scratch.values(), *counters],
            f"{self.label} {what}",
            verify=False,
            off=pack.graphs_off or ("too few batches" if times <= 2 else None),
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
        """engine.train_mode_accuracy for every model: validation in batches of the training size with
        batch statistics, on scratch copies of the running statistics (which BRN's forward reads)."""
        pack = self.pack
        data, b, k = pack.data, self.sched.batch_size, self.k
        scratch = {name: t.clone() for name, t in self.buffers.items()}
        correct = torch.zeros(k, dtype=torch.long, device=pack.device)
        pos = torch.zeros((), dtype=torch.long, device=pack.device)
        fwd = vmap(self._forward, in_dims=(0, 0, None))

        def one_batch() -> None:
            idx = pos * b + self.arange_b
            logits = fwd(self.params, scratch, data.prepare(data.x_val[idx]))
            correct.add_((logits.argmax(2) == data.y_val[idx]).sum(1))
            pos.add_(1)

        n_val = len(data.x_val)
        full, rest = divmod(n_val, b)
        seen = full * b
        if full:
            self.repeat(one_batch, scratch, [correct, pos], full, "train-mode eval")
        if rest and not (self.batch_stats and rest < 2 <= b):
            logits = fwd(self.params, scratch, data.prepare(data.x_val[full * b :]))
            correct += (logits.argmax(2) == data.y_val[full * b :]).sum(1)
            seen += rest
        return [c / max(seen, 1) for c in correct.tolist()]

    @torch.no_grad()
    def refresh_precise_bn(self, at: list[int]) -> None:
        """engine.refresh_precise_bn for the `bn_precise` models among `at` (indices into the group):
        their running statistics become the equal-weight average of per-batch statistics over a fixed
        number of training samples, in batches of the run's size, without augmentation."""
        pack = self.pack
        data, b = pack.data, self.sched.batch_size
        counts = []
        for i in range(self.k):
            m = self.members[i]
            wanted = precise_samples_of(m.cfg) if i in at else None
            n = 0
            if wanted is not None:
                n = min(wanted, m.cfg.budget["train_size"])
                n -= n % b
                if n < b or b < 2 and data.kind == "tabular":
                    n = 0
            counts.append(n // b)
        batches = max(counts)
        if batches == 0 or not self.probe:
            return
        orders = torch.zeros(self.k, batches * b, dtype=torch.long, device=pack.device)
        for i, nb in enumerate(counts):
            if nb:
                m = self.members[i]
                seed, epoch, train_size = m.cfg.seed + 1_000_003, m.epoch, m.cfg.budget["train_size"]
                orders[i, : nb * b].copy_(epoch_order(seed, epoch, train_size, nb * b).to(pack.device))
        n_batches = torch.tensor(counts, device=pack.device)
        scratch = {name: t.clone() for name, t in self.buffers.items()}
        sums = [
            (
                torch.zeros(self.k, layer.num_features, device=pack.device),
                torch.zeros_like(self.buffers[f"{n}.running_var"]),
            )
            for n, layer in zip(self.probe.names, self.probe.layers, strict=True)
        ]
        pos = torch.zeros((), dtype=torch.long, device=pack.device)

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
                means, variances = vstats(self.params, scratch, data.prepare(data.x_train[idx]))
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

    def pop_noise(self, noise: list[list[float]], i: int) -> dict[str, float]:
        mean_sum, var_sum, count = noise[i]
        self.noise[i].zero_()
        if count == 0:
            return {}
        return {"bn_mean_noise": mean_sum / count, "bn_var_noise": var_sum / count}

    def checkpoint(self, i: int, ring: list[list[float]] | None = None) -> dict[str, Any]:
        """Model i's state in `Trainer.checkpoint()`'s format (plus its BN-noise sums)."""
        m, pack = self.members[i], self.pack
        model: dict[str, torch.Tensor] = {}
        for key in self.shadow.state_dict():
            source = self.params[key] if key in self.params else self.buffers[key]
            model[key] = source[i].detach().clone()
        opt_names = optimizer_param_names(self.shadow)
        template = make_optimizer(self.shadow, pack.cfg.optimizer, pack.lr_of(m)).state_dict()
        template["state"] = {
            j: {"momentum_buffer": self.mom_views[name][i].detach().clone()} for j, name in enumerate(opt_names)
        }
        if ring is None:
            ring = self.ring.tolist()
        return {
            "format": 2,
            "model": model,
            "optimizer": template,
            "epoch": m.epoch,
            "batch": m.batch,
            "step": m.step,
            "epoch_loss": float(self.epoch_loss[i]),
            "window": self.window_of(ring, i),
            "torch_rng": torch.get_rng_state(),
            "elapsed": pack.elapsed(m),
            "noise": self.noise[i].tolist(),
        }


class PackTrainer:
    """Trains compatible runs together; each keeps its own reporter, checkpoints and outcome.

    `run()` returns one result per run, in order: its `Outcome`, or the exception its reporter
    raised (the run lost its claim, or the database went away); `on_done` hears each as it happens.
    """

    def __init__(
        self,
        cfgs: Sequence[RunConfig],
        data: DeviceData,
        device: torch.device,
        reporters: Sequence[RunReporter],
        resumes: Sequence[dict[str, Any] | None] | None = None,
        *,
        graphs: bool | None = None,
        on_done: OnDone | None = None,
    ) -> None:
        if not cfgs or len(cfgs) != len(reporters):
            raise ValueError("a pack needs one reporter per run, and at least one run")
        check_packable(cfgs)
        self.cfg, self.data, self.device, self.on_done = cfgs[0], data, device, on_done
        # Why steps run eagerly (None: captured in CUDA graphs, unless a capture fails).
        self.graphs_off = graphs_unavailable(device) if graphs is None or graphs else "switched off"
        self.graphs = self.graphs_off is None
        if self.graphs:
            torch.backends.cudnn.benchmark = True  # algorithms are picked during the warm-up before capture
        self.schedules = {c.batch_size: Schedule.of(c) for c in cfgs}
        self.report_every = max(REPORT_EVERY_S, 0.25 * len(cfgs))  # K runs write K rows per report
        resumes = list(resumes) if resumes is not None else [None] * len(cfgs)
        self.members = [
            Member(i, c, self.schedules[c.batch_size], r, s)
            for i, (c, r, s) in enumerate(zip(cfgs, reporters, resumes, strict=True))
        ]
        for m in self.members:
            if m.carry is not None:
                m.epoch, m.batch, m.step = int(m.carry["epoch"]), int(m.carry["batch"]), int(m.carry["step"])
                if m.step != m.epoch * m.sched.per_epoch + m.batch:
                    raise ValueError(f"checkpoint position {m.epoch}/{m.batch}/{m.step} is not this budget's")
                m.elapsed_before = float(m.carry["elapsed"])
                m.window_from = m.step - len(m.carry["window"])
        self.groups: list[PackGroup] = []
        self.grouped: tuple[int, ...] = ()
        self.started = time.perf_counter()
        self.largest_group = 0
        self.graphed_groups = 0
        self.eager_reasons: set[str] = set()

    # -- per-run bookkeeping ---------------------------------------------------------------------
    def elapsed(self, m: Member) -> float:
        return m.elapsed_before + time.perf_counter() - self.started

    def lr_of(self, m: Member) -> float:
        """The rate of m's last step (the base rate before any), as Trainer.lr."""
        sched = m.sched
        if m.step == 0:
            return sched.base_lr
        return lr_at(m.step - 1, sched.total, sched.warmup, sched.base_lr, sched.schedule)

    def progress(self, m: Member) -> Progress:
        return Progress(m.step, m.epoch, m.step * m.cfg.batch_size)

    def outcome(
        self, m: Member, status: str, error: str | None = None, finals: dict[str, float] | None = None
    ) -> Outcome:
        return Outcome(status, finals or {}, m.step, m.step * m.cfg.batch_size, self.elapsed(m), error)

    def finish(self, m: Member, result: Result) -> None:
        m.result = result
        if self.on_done is not None:
            try:
                self.on_done(m.index, result)
            except Exception:
                log.exception("recording the end of packed run %s failed", m.index)

    def call(self, m: Member, fn: Callable[[], Any]) -> tuple[bool, Any]:
        """Run a reporter call for m; an exception (claim lost, database gone) ends m, not the pack."""
        try:
            return True, fn()
        except Exception as e:
            self.finish(m, e)
            return False, None

    def report(self, m: Member, checkpoint: dict[str, Any] | None = None) -> bool:
        """m's points and progress (and checkpoint) to its reporter; False when that ended m."""
        ok, _ = self.call(m, functools.partial(m.reporter.report, m.points, self.progress(m), checkpoint))
        return ok

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> list[Result]:
        self.started = time.perf_counter()
        for m in self.members:
            m.window_start = m.last_report = self.started
            if m.epoch >= m.sched.epochs:
                self.finish(m, self.outcome(m, "succeeded"))
        while True:
            active = [m for m in self.members if m.result is None]
            if not active:
                break
            self.regroup(active)
            for g in self.groups:
                g.launch()
            for g in self.groups:
                g.join()
            for m in active:
                m.step += 1
                m.batch += 1
            self.after_step(active)
        self.retire_groups()
        results = [m.result for m in self.members]
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

    def regroup(self, active: list[Member]) -> None:
        """(Re)stack the active runs into groups when the set changed. Groups whose runs are all still
        active go on untouched (their CUDA graphs too); a group that lost runs is re-stacked from its
        survivors' states."""
        key = tuple(m.index for m in active)
        if key == self.grouped:
            return
        kept = [g for g in self.groups if all(m.result is None for m in g.members)]
        changed = [g for g in self.groups if g not in kept]
        for g in changed:
            ring = g.ring.tolist()
            for i, m in enumerate(g.members):
                if m.result is None:
                    m.carry = g.checkpoint(i, ring)
        self.retire_groups(changed)
        placed = {m.index for g in kept for m in g.members}
        by_signature: dict[str, list[Member]] = {}
        for m in active:
            if m.index not in placed:
                by_signature.setdefault(train_signature(m.cfg), []).append(m)
        fresh = [PackGroup(self, members) for members in by_signature.values()]
        self.groups = kept + fresh
        self.grouped = key
        self.largest_group = max(self.largest_group, *(g.k for g in self.groups))
        if fresh:
            log.info("pack of %d runs in %d group(s): %s", len(active), len(self.groups), [g.label for g in fresh])

    def retire_groups(self, groups: list[PackGroup] | None = None) -> None:
        """Drop these groups (all, by default), keeping what ran graphed or eagerly and why."""
        retiring = self.groups if groups is None else groups
        for g in retiring:
            if g.graphed:
                self.graphed_groups += 1
            elif g.eager_reason:
                self.eager_reasons.add(g.eager_reason)
        self.groups = [g for g in self.groups if g not in retiring]

    def group_of(self, m: Member) -> tuple[PackGroup, int]:
        for g in self.groups:
            for i, other in enumerate(g.members):
                if other is m:
                    return g, i
        raise KeyError(m.index)

    def after_step(self, active: list[Member]) -> None:
        cfg = self.cfg
        due = [m for m in active if m.step % cfg.log_every_steps == 0 or m.batch == m.sched.per_epoch]
        host: dict[int, tuple[list[list[float]], list[float]]] = {}
        for m in due:
            g, i = self.group_of(m)
            if id(g) not in host:
                host[id(g)] = g.read_windows()
            ring, norms = host[id(g)]
            if self.check_window(m, g.window_of(ring, i), norms[i]):
                continue
        for m in active:
            if m.result is not None:
                continue
            ok, stop = self.call(m, m.reporter.stop_reason)
            if not ok:
                continue
            if stop == "cancelled":
                if self.report(m):
                    self.finish(m, self.outcome(m, "cancelled", "cancelled by user"))
            elif stop == "shutdown" and m.batch < m.sched.per_epoch:
                g, i = self.group_of(m)
                ckpt = g.checkpoint(i)
                if self.report(m, ckpt):
                    self.finish(m, self.outcome(m, "interrupted", "worker shut down; resumes from its checkpoint"))
        ends = [m for m in active if m.result is None and m.batch == m.sched.per_epoch]
        if ends:
            self.end_epochs(ends)

    def check_window(self, m: Member, window: list[float], grad_norm: float) -> bool:
        """Trainer.check_window for m; True when m diverged (and is finished)."""
        cfg = self.cfg
        bad = next((j for j, v in enumerate(window) if not math.isfinite(v)), None)
        if bad is not None:
            step = m.step - len(window) + bad + 1
            error = f"training loss became non-finite at step {step} (epoch {m.epoch + 1})"
            if self.report(m):
                self.finish(m, self.outcome(m, "diverged", error))
            return True
        now = time.perf_counter()
        if m.step % cfg.log_every_steps == 0 and window:
            at = m.epoch + m.batch / m.sched.per_epoch
            mean = float(torch.tensor(window, dtype=torch.float32).mean())
            m.points += [
                Point(m.step, at, "train_loss_step", mean),
                Point(m.step, at, "grad_norm", grad_norm),
                Point(m.step, at, "step_time_ms", (now - m.window_start) * 1000 / len(window)),
            ]
            m.window_start = now
        m.window_from = m.step
        live = now - m.last_report > self.report_every and m.batch < m.sched.per_epoch
        if live and self.report(m):
            m.points = []
            m.last_report = time.perf_counter()
        return False

    def end_epochs(self, ends: list[Member]) -> None:
        """Trainer.end_epoch for every run that just finished an epoch, one group at a time."""
        for g in self.groups:
            at = [i for i, m in enumerate(g.members) if m in ends]
            if not at:
                continue
            g.refresh_precise_bn(at)
            val_acc, val_loss = g.evaluate()
            last = [i for i in at if g.members[i].epoch + 1 == g.sched.epochs]
            train_mode = g.train_mode_accuracy() if last else []
            noise = g.noise.tolist()
            epoch_loss = g.epoch_loss.tolist()
            for i in at:
                m = g.members[i]
                m.epoch += 1
                m.batch = 0
                finals = {
                    "val_acc": val_acc[i],
                    "val_loss": val_loss[i],
                    "train_loss": epoch_loss[i] / g.sched.per_epoch,
                    "lr": self.lr_of(m),
                    "images_per_s": m.step * g.sched.batch_size / max(self.elapsed(m), 1e-9),
                    **g.pop_noise(noise, i),
                }
                if m.epoch == g.sched.epochs:
                    finals["val_acc_train_mode"] = train_mode[i]
                m.points += [Point(m.step, float(m.epoch), name, value) for name, value in finals.items()]
                g.epoch_loss[i] = 0.0
                if m.epoch < g.sched.epochs:
                    g.load_epoch(i)
                ckpt = g.checkpoint(i) if m.epoch < g.sched.epochs else None
                if not self.report(m, ckpt):
                    continue
                m.points = []
                if not math.isfinite(finals["val_loss"]):
                    self.finish(
                        m, self.outcome(m, "diverged", f"validation loss became non-finite after epoch {m.epoch}")
                    )
                elif m.epoch == g.sched.epochs:
                    self.finish(m, self.outcome(m, "succeeded", finals=finals))

    # -- what ran ------------------------------------------------------------------------------
    def execution(self) -> dict[str, Any]:
        """How this pack ran, for each run's recorded environment."""
        graphed = self.graphed_groups + sum(g.graphed for g in self.groups)
        reasons = self.eager_reasons | {g.eager_reason for g in self.groups if not g.graphed and g.eager_reason}
        info: dict[str, Any] = {
            "engine": "pack",
            "pack_runs": len(self.members),
            "largest_group": self.largest_group,
            "cuda_graph": graphed > 0 and not reasons,
        }
        if reasons:
            info["eager_reason"] = "; ".join(sorted(reasons))
        return info
