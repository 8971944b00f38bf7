"""The training engine: every claimed set of runs of one job trains here as a pack; a single run is a
pack of one. Pure of the database and Celery, so tests and benchmarks drive it directly.

`PackTrainer` keeps each run's host-side life (its position, loss window, reports, checkpoints and
outcome) and steps the device groups of `workers.packing`, which hold the stacked state and the
vmapped (and, on a GPU, CUDA-graphed) step. A run that diverges, is cancelled, stops or loses its
claim leaves the pack at that step boundary; the others are re-stacked from their states and go on.
tests/oracle.py is the plain eager single-run loop the tests check this engine against.
"""

from __future__ import annotations

import functools
import logging
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from app.core.progress import Point, Progress
from app.core.run_states import CANCELLED_BY_USER, SHUT_DOWN, RunStatus
from workers.checkpoint import Checkpoint
from workers.data import DeviceData
from workers.epoch_metrics import epoch_metrics
from workers.graphs import graphs_unavailable
from workers.packing import Member, PackGroup, train_signature
from workers.run_config import RunConfig
from workers.schedule import Schedule
from workers.segmentation import iou_metrics

__all__ = [
    "Outcome",
    "PackTrainer",
    "Point",
    "Progress",
    "RunConfig",
    "RunReporter",
    "environment",
    "train",
]

log = logging.getLogger(__name__)

REPORT_EVERY_S = 2.0
SHARED_FIELDS = ("arch", "budget", "model", "optimizer", "augment", "log_every_steps", "precision", "input", "init")


class RunReporter(Protocol):
    def report(self, points: list[Point], progress: Progress, checkpoint: Checkpoint | None = None) -> None:
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


Result = Outcome | BaseException
OnDone = Callable[[int, Result], None]


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


def check_packable(cfgs: Sequence[RunConfig]) -> None:
    """Packed runs share the network, budget, optimizer, augmentation and precision (not the batch size:
    each batch size is its own group)."""
    first = cfgs[0]
    for cfg in cfgs[1:]:
        for name in SHARED_FIELDS:
            if getattr(cfg, name) != getattr(first, name):
                raise ValueError(f"runs cannot be packed: they differ in {name}")


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
        resumes: Sequence[Checkpoint | None] | None = None,
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
                m.resume_from(m.carry)
        self.groups: list[PackGroup] = []
        self.grouped: tuple[int, ...] = ()
        self.started = time.perf_counter()
        self.largest_group = 0
        self.graphed_groups = 0
        self.eager_reasons: set[str] = set()

    # -- per-run bookkeeping ---------------------------------------------------------------------
    def progress(self, m: Member) -> Progress:
        return Progress(m.step, m.epoch, m.step * m.cfg.batch_size)

    def outcome(
        self, m: Member, status: str, error: str | None = None, finals: dict[str, float] | None = None
    ) -> Outcome:
        return Outcome(status, finals or {}, m.step, m.step * m.cfg.batch_size, m.elapsed(), error)

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

    def report(self, m: Member, checkpoint: Checkpoint | None = None) -> bool:
        """m's points and progress (and checkpoint) to its reporter; False when that ended m."""
        ok, _ = self.call(m, functools.partial(m.reporter.report, m.points, self.progress(m), checkpoint))
        return ok

    # -- the loop ------------------------------------------------------------------------------
    def run(self) -> list[Result]:
        self.started = time.perf_counter()
        for m in self.members:
            m.started = m.window_start = m.last_report = self.started
            if m.epoch >= m.sched.epochs:  # its training ended before its result was committed: record it
                self.finish(m, self.outcome(m, RunStatus.SUCCEEDED, finals=m.finals))
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
        fresh = [PackGroup(members, self.data, self.device, self.graphs_off) for members in by_signature.values()]
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
                    self.finish(m, self.outcome(m, RunStatus.CANCELLED, CANCELLED_BY_USER))
            elif stop == "shutdown" and m.batch < m.sched.per_epoch:
                g, i = self.group_of(m)
                ckpt = g.checkpoint(i)
                if self.report(m, ckpt):
                    self.finish(m, self.outcome(m, "interrupted", SHUT_DOWN))
        ends = [m for m in active if m.result is None and m.batch == m.sched.per_epoch]
        if ends:
            self.end_epochs(ends)

    def check_window(self, m: Member, window: list[float], grad_norm: float) -> bool:
        """Every few steps, for m: find a non-finite loss, and log the window's mean loss and timing; True when
        m diverged (and is finished)."""
        cfg = self.cfg
        bad = next((j for j, v in enumerate(window) if not math.isfinite(v)), None)
        if bad is not None:
            step = m.step - len(window) + bad + 1
            error = f"training loss became non-finite at step {step} (epoch {m.epoch + 1})"
            if self.report(m):
                self.finish(m, self.outcome(m, RunStatus.DIVERGED, error))
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
        """Every run that just finished an epoch: precise BN, evaluation, its epoch metrics and checkpoint."""
        for g in self.groups:
            at = [i for i, m in enumerate(g.members) if m in ends]
            if not at:
                continue
            g.refresh_precise_bn(at)
            val_acc, val_loss = g.evaluate()
            last = [i for i in at if g.members[i].epoch + 1 == g.sched.epochs]
            train_mode = g.train_mode_accuracy() if last else []
            # The test split, once, after the last epoch: reported beside validation, never used to pick.
            test = g.evaluate("test") if last and self.data.x_test is not None else None
            noise = g.noise.tolist()
            epoch_loss = g.epoch_loss.tolist()
            for i in at:
                m = g.members[i]
                m.epoch += 1
                m.batch = 0
                finals = epoch_metrics(
                    val_acc=val_acc[i],
                    val_loss=val_loss[i],
                    epoch_loss_sum=epoch_loss[i],
                    steps_per_epoch=g.sched.per_epoch,
                    lr=m.sched.lr_after(m.step),
                    samples=m.step * m.cfg.batch_size,
                    elapsed=m.elapsed(),
                    noise=noise[i],
                    val_acc_train_mode=train_mode[i] if m.epoch == g.sched.epochs else None,
                    test=(test[0][i], test[1][i]) if test is not None and m.epoch == g.sched.epochs else None,
                    mixtures=g.mixtures(i) if m.epoch == g.sched.epochs else None,
                    tokens=self.data.tokens_seen(m.cfg.seed, m.epoch, m.cfg.budget["samples_per_epoch"]),
                )
                if g.segmentation:  # mean IoU (and per class) from this epoch's confusion matrices; test's at the end
                    splits = ("val", "test") if m.epoch == g.sched.epochs else ("val",)
                    for split in (s for s in splits if s in g.confusion):
                        finals |= iou_metrics(g.confusion[split][i], split)
                g.noise[i].zero_()
                m.points += [Point(m.step, float(m.epoch), name, value) for name, value in finals.items()]
                g.epoch_loss[i] = 0.0
                if m.epoch < g.sched.epochs:
                    g.load_epoch(i)
                diverged, ended = not math.isfinite(finals["val_loss"]), m.epoch == g.sched.epochs
                ckpt = None if ended and diverged else g.checkpoint(i)
                if ckpt is not None and ended:
                    ckpt.final_metrics = finals  # a worker lost before the result lands: the next one records it
                if not self.report(m, ckpt):
                    continue
                m.points = []
                if diverged:
                    self.finish(
                        m,
                        self.outcome(m, RunStatus.DIVERGED, f"validation loss became non-finite after epoch {m.epoch}"),
                    )
                elif m.epoch == g.sched.epochs:
                    self.finish(m, self.outcome(m, RunStatus.SUCCEEDED, finals=finals))

    # -- what ran ------------------------------------------------------------------------------
    def execution(self, index: int | None = None) -> dict[str, Any]:
        """How this pack ran, for each run's recorded environment; with the run's `index`, also what its
        `init` transferred (fine-tuning)."""
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
        transfer = self.members[index].transfer if index is not None else None
        if transfer is not None:
            info["init"] = transfer
        preview = self.members[index].preview if index is not None else None
        if preview is not None:  # segmentation: one validation image, its truth and this run's predicted mask
            info["seg_preview"] = preview
        return info


def train(
    cfg: RunConfig, data: DeviceData, device: torch.device, reporter: RunReporter, resume: Checkpoint | None = None
) -> Outcome:
    """One run, as a pack of one; what its reporter raised (a lost claim) is raised here."""
    result = PackTrainer([cfg], data, device, [reporter], [resume]).run()[0]
    if isinstance(result, BaseException):
        raise result
    return result
