"""Issue 7: how close does NormBench get to the GPU's limit on a grid of small-batch runs?

Parts, side by side in one process on one device, then a table (printed last):

  check   graph vs eager on the device: the same packed ResNet-20 steps with CUDA graphs and without,
          from the same state (max parameter difference); packed vs single-run training of the same runs
          (validation accuracy, train loss). GPU-only checks live here, not in pytest, where they would
          only ever be skipped.
  steps   model-steps/s of a CIFAR ResNet-20 (`bn`, `gn`) at batch 2, 8, 32:
            naive   the ordinary eager loop (module forward, cross-entropy, backward, torch.optim.SGD)
            graph   our engine, one run, the step captured in a CUDA graph
            pack    our engine, K runs (seeds) stacked with torch.func.vmap, eager
            pack+g  our engine, K runs stacked and captured in one CUDA graph
          plus one run at batch 128 (graph) for the images/s ceiling. Engine figures come from the real
          training loop (`PackTrainer.run`: per-run bookkeeping, BN-noise sampling, loss checks), timed
          between two device syncs after warm-up.
  grid    wall time of a 60-run job (bn, gn, ln, bn_precise × batch 2, 4, 8, 16, 32 × 3 seeds), 1 epoch of a
          generated CIFAR-sized set (50,000 uint8 32×32×3 images, 10 classes), trained as one worker trains
          it: packs of up to --grid-pack runs of one batch size (the worker's NORMBENCH_PACK_SIZE, 32 on
          CUDA), in the order the worker claims them, one after another.
  grid_mixed       the experiment of letting a pack hold several batch sizes (the engine can; the worker
          does not, since it measured no faster).
  sequential       runs one after another in the plain eager loop (tests/oracle.py's `Trainer`: what a worker
          did before packing)
          over the grid, extrapolated from a timed slice of every cell unless --naive-full runs it all
          (about an hour on an H100).

    python bench/gpu_grid.py                       # on the GPU; writes $OUT/gpu_grid.json (or --out)
    python bench/gpu_grid.py --quick --device cpu  # tiny sizes, runs anywhere (CI smoke test)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.core.budget import resolve_budget  # noqa: E402
from app.schemas.jobs import OptimizerSpec  # noqa: E402
from tests.oracle import Trainer, evaluate  # noqa: E402
from workers.checkpoint import Checkpoint  # noqa: E402
from workers.data import DeviceData, epoch_order  # noqa: E402
from workers.engine import Outcome, PackTrainer, Point, Progress, RunConfig  # noqa: E402
from workers.graphs import snapshot  # noqa: E402
from workers.run_config import build_run_model  # noqa: E402
from workers.schedule import scaled_lr  # noqa: E402

# The schema's defaults (lr 0.1 at batch 32, linear scaling, momentum 0.9, weight decay 5e-4, cosine), a short warm-up.
OPT = OptimizerSpec(warmup_epochs=0.2).model_dump()
MODEL = {"arch": "resnet", "depth": 20, "width": 16}
VARIANTS: list[tuple[str, dict[str, Any]]] = [("bn", {}), ("gn", {"groups": 8}), ("ln", {}), ("bn_precise", {})]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Null:
    def report(self, points: list[Point], progress: Progress, checkpoint: Checkpoint | None = None) -> None:
        pass

    def stop_reason(self) -> str | None:
        return None


class Timer:
    """A reporter that ends the run after warm-up + n steps and times the n steps between two syncs."""

    def __init__(self, device: torch.device, warmup: int, n: int, clock: bool) -> None:
        self.device, self.warmup, self.n, self.clock = device, warmup, n, clock
        self.calls, self.t0, self.t1 = 0, 0.0, 0.0

    def report(self, points: list[Point], progress: Progress, checkpoint: Checkpoint | None = None) -> None:
        pass

    def stop_reason(self) -> str | None:
        self.calls += 1
        if self.clock and self.calls in (self.warmup, self.warmup + self.n):
            sync(self.device)
            if self.calls == self.warmup:
                self.t0 = time.perf_counter()
            else:
                self.t1 = time.perf_counter()
        return "cancelled" if self.calls >= self.warmup + self.n else None

    def steps_per_s(self) -> float:
        return self.n / max(self.t1 - self.t0, 1e-9)


def synthetic_cifar(n: int, n_val: int, device: torch.device, hw: int = 32) -> DeviceData:
    """n uint8 3×hw×hw images in 10 classes: a smooth random template per class, scaled, shifted and
    buried in smooth per-image clutter plus pixel noise. The clutter is what makes it hard (pixel noise
    alone averages away): logistic regression on 8×8-pooled images scores about 68% on it, so one epoch
    leaves room for the variants to differ. (The first H100 run used pixel noise only, and every run
    reached 100%.)"""
    rng = np.random.default_rng(20261126)

    def smooth(shape: tuple[int, ...]) -> np.ndarray:
        coarse = torch.from_numpy(rng.normal(0, 1, size=(*shape, 3, 4, 4)).astype(np.float32))
        return torch.nn.functional.interpolate(coarse, size=(hw, hw), mode="bilinear").numpy()

    templates = smooth((10,))
    y = rng.integers(0, 10, size=n)
    x = templates[y] * rng.uniform(0.5, 1.5, size=(n, 1, 1, 1)).astype(np.float32)
    x += 3.0 * smooth((n,))
    x += rng.normal(0, 1.0, size=x.shape).astype(np.float32)
    shifts = rng.integers(-3, 4, size=(n, 2))
    for s in range(-3, 4):  # cheap per-image shifts: roll rows, then columns, in groups
        rows = shifts[:, 0] == s
        x[rows] = np.roll(x[rows], s, axis=2)
        cols = shifts[:, 1] == s
        x[cols] = np.roll(x[cols], s, axis=3)
    images = np.clip(x * 12 + 128, 0, 255).astype(np.uint8)
    xt = torch.from_numpy(images[n_val:]).to(device)
    scaled = xt.float()
    mean = scaled.mean(dim=(0, 2, 3)).view(1, -1, 1, 1)
    std = scaled.std(dim=(0, 2, 3)).view(1, -1, 1, 1)
    return DeviceData(
        "image",
        xt,
        torch.from_numpy(y[n_val:]).to(device),
        torch.from_numpy(images[:n_val]).to(device),
        torch.from_numpy(y[:n_val]).to(device),
        mean,
        std,
        (3, hw, hw),
        10,
    )


def budget_for(data: DeviceData, batch_sizes: list[int], epochs: int = 1) -> dict[str, int]:
    return resolve_budget(len(data.x_train), len(data.x_val), epochs, batch_sizes)


def cfg_for(norm: str, params: dict[str, Any], batch: int, seed: int, budget: dict[str, int]) -> RunConfig:
    return RunConfig("resnet", norm, params, batch, seed, budget, MODEL, OPT, {}, 50)


# -- steps -------------------------------------------------------------------------------------------
def naive_steps_per_s(cfg: RunConfig, data: DeviceData, device: torch.device, warmup: int, n: int) -> float:
    """The ordinary eager loop: module forward, cross-entropy, backward, torch.optim.SGD (foreach)."""
    model = build_run_model(cfg, data, device)
    opt = torch.optim.SGD(model.parameters(), lr=scaled_lr(OPT, cfg.batch_size), momentum=0.9, weight_decay=5e-4)
    order = epoch_order(cfg.seed, 0, len(data.x_train), len(data.x_train)).to(device)
    per_epoch = len(order) // cfg.batch_size
    t0 = 0.0
    for i in range(warmup + n):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        at = (i % per_epoch) * cfg.batch_size
        idx = order[at : at + cfg.batch_size]
        loss = F.cross_entropy(model(data.prepare(data.x_train[idx])), data.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    sync(device)
    return n / (time.perf_counter() - t0)


def engine_steps_per_s(
    cfgs: list[RunConfig], data: DeviceData, device: torch.device, warmup: int, n: int, graphs: bool
) -> tuple[float, dict[str, Any]]:
    """Steps/s of the real pack loop for these runs (model-steps/s = K × this)."""
    reporters = [Timer(device, warmup, n, clock=i == 0) for i in range(len(cfgs))]
    trainer = PackTrainer(cfgs, data, device, reporters, graphs=graphs)
    trainer.run()
    return reporters[0].steps_per_s(), trainer.execution()


def measure_steps(args: argparse.Namespace, data: DeviceData, device: torch.device) -> list[dict[str, Any]]:
    budget = budget_for(data, [128])
    rows = []
    for norm, params in VARIANTS[:2]:
        for batch in args.batches:
            base = cfg_for(norm, params, batch, 0, budget)
            row: dict[str, Any] = {"norm": norm, "batch": batch, "k": args.k}
            row["naive"] = naive_steps_per_s(base, data, device, args.warmup, args.steps)
            print("  naive", norm, batch, f"{row['naive']:.0f} steps/s", flush=True)
            v, info = engine_steps_per_s([base], data, device, args.warmup, args.steps, graphs=True)
            row["graph"], row["graph_info"] = v, info
            print("  graph", norm, batch, f"{v:.0f} steps/s", info, flush=True)
            seeds = [replace(base, seed=s) for s in range(args.k)]
            v, info = engine_steps_per_s(seeds, data, device, args.warmup, max(5, args.steps // 4), graphs=False)
            row["pack_eager"] = v * args.k
            print("  pack eager", norm, batch, f"{row['pack_eager']:.0f} model-steps/s", flush=True)
            v, info = engine_steps_per_s(seeds, data, device, args.warmup, args.steps, graphs=True)
            row["pack_graph"], row["pack_info"] = v * args.k, info
            print("  pack graph", norm, batch, f"{row['pack_graph']:.0f} model-steps/s", info, flush=True)
            if batch == min(args.batches) and args.k_big:
                seeds = [replace(base, seed=s) for s in range(args.k_big)]
                v, info = engine_steps_per_s(seeds, data, device, args.warmup, args.steps, graphs=True)
                row["pack_graph_big"], row["k_big"] = v * args.k_big, args.k_big
                print(
                    "  pack graph", norm, batch, f"K={args.k_big}: {v * args.k_big:.0f} model-steps/s", info, flush=True
                )
            rows.append(row)
    for norm, params in VARIANTS[:2]:
        big = cfg_for(norm, params, args.big_batch, 0, budget)
        v, info = engine_steps_per_s([big], data, device, args.warmup, args.steps, graphs=True)
        rows.append({"norm": norm, "batch": args.big_batch, "k": 1, "graph": v, "graph_info": info})
        print("  graph", norm, args.big_batch, f"{v:.0f} steps/s = {v * args.big_batch:.0f} images/s", flush=True)
    return rows


# -- check -------------------------------------------------------------------------------------------
def check(args: argparse.Namespace, data: DeviceData, device: torch.device) -> dict[str, Any]:
    """Graph replay vs eager from the same state, and packed vs single runs, on this device."""
    out: dict[str, Any] = {}
    budget = budget_for(data, [8])
    cfgs = [cfg_for(n, p, 8, s, budget) for n, p in [("bn", {}), ("brn", {}), ("gn", {"groups": 8})] for s in (0, 1)]
    states = {}
    for graphs in (False, True):
        trainer = PackTrainer(cfgs, data, device, [Null() for _ in cfgs], graphs=graphs)
        trainer.regroup(trainer.members)
        for _ in range(args.check_steps):  # BN-noise and grad-norm variants included (steps 0, 10, ...)
            for g in trainer.groups:
                g.launch()
            for g in trainer.groups:
                g.join()
            for m in trainer.members:
                m.step += 1
        sync(device)
        states[graphs] = [snapshot(g.state()) for g in trainer.groups]
        out[f"execution_graphs_{graphs}"] = trainer.execution()
    diffs = []
    for eager_state, graph_state in zip(states[False], states[True], strict=True):
        for a, b in zip(eager_state, graph_state, strict=True):
            if a.is_floating_point():
                diffs.append(float((a.double() - b.double()).abs().nan_to_num(float("inf")).max()))
            else:
                diffs.append(0.0 if torch.equal(a, b) else float("inf"))
    out["graph_vs_eager_max_abs_diff"] = max(diffs)
    print(f"  graph vs eager after {args.check_steps} steps: max |Δ| = {max(diffs):.3g}", out, flush=True)

    # Packed vs single: the same runs trained to the end, packed (graphs) and one by one (the eager oracle).
    small = DeviceData(
        data.kind,
        data.x_train[: args.check_samples],
        data.y_train[: args.check_samples],
        data.x_val,
        data.y_val,
        data.mean,
        data.std,
        data.input_shape,
        data.num_classes,
    )
    budget = budget_for(small, [8])
    runs = [cfg_for("gn", {"groups": 8}, 8, s, budget) for s in range(2)]
    runs += [cfg_for("bn", {}, 8, 0, budget), cfg_for("bn_precise", {}, 8, 1, budget)]
    packed = PackTrainer(runs, small, device, [Null() for _ in runs]).run()
    rows = []
    for cfg, p in zip(runs, packed, strict=True):
        s = Trainer(cfg, small, device, Null()).run()
        assert isinstance(p, Outcome)
        rows.append(
            {
                "run": f"{cfg.norm} seed {cfg.seed}",
                "val_acc": [s.final_metrics["val_acc"], p.final_metrics["val_acc"]],
                "train_loss": [s.final_metrics["train_loss"], p.final_metrics["train_loss"]],
            }
        )
        print("  single vs packed", rows[-1], flush=True)
    out["single_vs_packed"] = rows
    return out


# -- grid --------------------------------------------------------------------------------------------
def grid_cfgs(args: argparse.Namespace, data: DeviceData) -> list[RunConfig]:
    """The job's runs in the order the API creates them: batch size, variant, seed."""
    budget = budget_for(data, args.grid_batches)
    return [cfg_for(n, p, b, s, budget) for b in args.grid_batches for n, p in VARIANTS for s in range(args.seeds)]


def worker_packs(cfgs: list[RunConfig], size: int, mixed: bool) -> list[list[int]]:
    """The packs one worker with NORMBENCH_PACK_SIZE=size trains, one after another. The worker's way
    (mixed=False): the first queued run leads and its mates are runs of its batch size, its variant first
    (`app.repositories.runs.claim_pack_mates`). mixed=True, the experiment: mates come from every batch size,
    its own first, then the others smallest first."""
    variant = {n: i for i, (n, _) in enumerate(VARIANTS)}
    queued, packs = list(range(len(cfgs))), []
    while queued:
        lead = cfgs[queued[0]]

        def order(i: int, lead: RunConfig = lead) -> tuple[bool, bool, int, int, int]:
            c = cfgs[i]
            same = c.batch_size == lead.batch_size
            return (not same, not (same and c.norm == lead.norm), c.batch_size, variant[c.norm], c.seed)

        mates = [i for i in queued[1:] if mixed or cfgs[i].batch_size == lead.batch_size]
        pack = [queued[0], *sorted(mates, key=order)[: size - 1]]
        packs.append(pack)
        queued = [i for i in queued if i not in pack]
    return packs


def grid_engine(args: argparse.Namespace, data: DeviceData, device: torch.device, mixed: bool) -> dict[str, Any]:
    """Wall time of the grid trained the way one worker trains it: its packs one after another."""
    cfgs = grid_cfgs(args, data)
    packs = worker_packs(cfgs, args.grid_pack, mixed)
    per_pack: list[dict[str, Any]] = []
    accs: dict[str, list[float]] = {}
    sync(device)
    start = time.perf_counter()
    for pack in packs:
        t = time.perf_counter()
        members = [cfgs[i] for i in pack]
        results = PackTrainer(members, data, device, [Null() for _ in members]).run()
        sync(device)
        took = time.perf_counter() - t
        batches = sorted({c.batch_size for c in members})
        per_pack.append({"runs": len(members), "batch_sizes": batches, "wall_s": took})
        for cfg, r in zip(members, results, strict=True):
            assert isinstance(r, Outcome) and r.status == "succeeded", r
            accs.setdefault(f"{cfg.norm}@{cfg.batch_size}", []).append(r.final_metrics["val_acc"])
        print(f"  engine pack of {len(members)} runs at batch sizes {batches}: {took:.1f}s", flush=True)
    total = time.perf_counter() - start
    accs = {k: accs[k] for k in sorted(accs, key=lambda k: (int(k.split("@")[1]), k))}
    return {
        "pack_size": args.grid_pack,
        "mixed": mixed,
        "wall_s": total,
        "packs": per_pack,
        "val_acc": {k: sum(v) / len(v) for k, v in accs.items()},
    }


def grid_naive(args: argparse.Namespace, data: DeviceData, device: torch.device) -> dict[str, Any]:
    """The grid's runs one after another in the eager loop: run fully (--naive-full) or timed on a slice of
    every cell (steps, evaluation, train-mode evaluation, precise BN) and extrapolated to the full run."""
    budget = budget_for(data, args.grid_batches)
    total, cells = 0.0, {}
    for batch in args.grid_batches:
        for norm, params in VARIANTS:
            cfg = cfg_for(norm, params, batch, 0, budget)
            if args.naive_full:
                t = time.perf_counter()
                for s in range(args.seeds):
                    Trainer(replace(cfg, seed=s), data, device, Null()).run()
                sync(device)
                cell = time.perf_counter() - t
            else:
                cell = args.seeds * naive_run_estimate(cfg, data, device, args)
            cells[f"{norm}@{batch}"] = cell
            total += cell
            print(f"  sequential {norm}@{batch}: {cell:.1f}s", flush=True)
    return {"wall_s": total, "cells_s": cells, "extrapolated": not args.naive_full}


@torch.no_grad()
def forwards_per_s(model: torch.nn.Module, data: DeviceData, batch: int, n: int, device: torch.device) -> float:
    model.train()
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    x = data.prepare(data.x_train[:batch])
    for _ in range(3):
        model(x)
    sync(device)
    t = time.perf_counter()
    for _ in range(n):
        model(x)
    sync(device)
    model.load_state_dict(saved)
    return n / (time.perf_counter() - t)


def naive_run_estimate(cfg: RunConfig, data: DeviceData, device: torch.device, args: argparse.Namespace) -> float:
    """Seconds one sequential run of cfg takes: its steps at the timed rate plus its epoch end."""
    timer = Timer(device, args.grid_warmup, args.grid_steps, clock=True)
    trainer = Trainer(cfg, data, device, timer)
    trainer.run()
    steps = trainer.per_epoch * trainer.epochs
    model = trainer.model
    sync(device)
    t = time.perf_counter()
    evaluate(model, data)
    sync(device)
    eval_s = time.perf_counter() - t
    fwd = forwards_per_s(model, data, cfg.batch_size, max(10, args.grid_steps // 2), device)
    end_forwards = len(data.x_val) // cfg.batch_size  # train-mode evaluation after the last epoch
    if cfg.norm == "bn_precise":
        end_forwards += min(8192, len(data.x_train)) // cfg.batch_size
    return steps / timer.steps_per_s() + eval_s + end_forwards / fwd


# -- main --------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test that runs on a CPU")
    parser.add_argument(
        "--parts",
        default="check,steps,grid,sequential",
        help="comma-separated: check, steps, grid, grid_mixed, sequential",
    )
    parser.add_argument(
        "--grid-pack", type=int, default=32, help="the worker's NORMBENCH_PACK_SIZE for the grid parts (32 on CUDA)"
    )
    parser.add_argument("--k", type=int, default=None, help="runs per pack in the steps part (default 32)")
    parser.add_argument("--k-big", type=int, default=None, help="a second, larger pack at the smallest batch")
    parser.add_argument("--naive-full", action="store_true", help="run the sequential grid fully (slow)")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default $OUT/gpu_grid.json)")
    args = parser.parse_args()
    device = torch.device(args.device)
    quick = args.quick
    args.k = args.k or (4 if quick else 32)
    args.k_big = args.k_big if args.k_big is not None else (8 if quick else 64)
    args.batches = [2, 8] if quick else [2, 8, 32]
    args.big_batch = 16 if quick else 128
    args.warmup, args.steps = (3, 6) if quick else (60, 250)  # < one epoch at batch 128
    args.grid_warmup, args.grid_steps = (3, 6) if quick else (30, 150)
    args.check_steps = 12 if quick else 25
    args.check_samples = 64 if quick else 2048
    args.grid_batches = [2, 8] if quick else [2, 4, 8, 16, 32]
    args.seeds = 2 if quick else 3
    n, n_val = (288, 32) if quick else (50_000, 5_000)

    info = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({platform.processor() or platform.machine()})",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "dataset": f"generated: {n} uint8 3×32×32 images, 10 classes, {n_val} held out",
        "model": "CIFAR ResNet-20 (width 16)",
    }
    print(info, flush=True)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # for every mode alike (the engine turns it on anyway)
    t = time.perf_counter()
    data = synthetic_cifar(n, n_val, device)
    print(f"  data ready in {time.perf_counter() - t:.1f}s", flush=True)
    parts = set(args.parts.split(","))
    result: dict[str, Any] = {"info": info, "args": {k: str(v) if k == "out" else v for k, v in vars(args).items()}}
    out = args.out or (Path(os.environ["OUT"]) / "gpu_grid.json" if os.environ.get("OUT") else None)

    def save() -> None:  # after every part, so a run cut off by a time limit still leaves its numbers
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1, default=str))

    def part(name: str, fn: Any) -> None:
        print(f"{name}:", flush=True)
        t = time.perf_counter()
        try:
            fn()
        except Exception:  # record it and go on: one broken part must not cost the others' device time
            result.setdefault("errors", {})[name] = traceback.format_exc()
            print(f"{name} FAILED:\n{traceback.format_exc()}", flush=True)
        result.setdefault("part_s", {})[name] = time.perf_counter() - t
        save()

    if "check" in parts:
        part("check", lambda: result.__setitem__("check", check(args, data, device)))
    if "steps" in parts:
        part("steps", lambda: result.__setitem__("steps", measure_steps(args, data, device)))
    if "grid" in parts:
        part("grid", lambda: result.__setitem__("grid", grid_engine(args, data, device, mixed=False)))
    if "grid_mixed" in parts:
        part("grid_mixed", lambda: result.__setitem__("grid_mixed", grid_engine(args, data, device, mixed=True)))
    if "sequential" in parts:
        part("sequential", lambda: result.__setitem__("sequential", grid_naive(args, data, device)))
    print_table(result)


def print_table(result: dict[str, Any]) -> None:
    info = result["info"]
    print(f"\n{info['device']} · torch {info['torch']} · {info['command']}")
    if "check" in result:
        c = result["check"]
        print(
            f"graph vs eager, same state, {result['args']['check_steps']} steps: max |Δ| {c['graph_vs_eager_max_abs_diff']:.3g}"
        )
        for r in c["single_vs_packed"]:
            print(
                f"  single vs packed {r['run']}: val_acc {r['val_acc'][0]:.4f} / {r['val_acc'][1]:.4f}, "
                f"train_loss {r['train_loss'][0]:.5f} / {r['train_loss'][1]:.5f}"
            )
    if "steps" in result:
        k = result["args"]["k"]
        print(
            f"\n{'norm':<5}{'batch':>6}{'naive':>9}{'graph':>9}{'pack':>10}{'pack+g':>10}"
            f"{'graph/naive':>13}{'pack+g/naive':>14}{'pack+g img/s':>14}   model-steps/s, pack K={k}"
        )
        big = {r["norm"]: r for r in result["steps"] if "naive" not in r}
        for r in result["steps"]:
            if "naive" not in r:
                continue
            images = r["pack_graph"] * r["batch"]
            ceiling = big[r["norm"]]["graph"] * big[r["norm"]]["batch"]
            print(
                f"{r['norm']:<5}{r['batch']:>6}{r['naive']:>9.0f}{r['graph']:>9.0f}{r['pack_eager']:>10.0f}"
                f"{r['pack_graph']:>10.0f}{r['graph'] / r['naive']:>12.1f}×{r['pack_graph'] / r['naive']:>13.1f}×"
                f"{images:>9.0f} ({images / ceiling:.0%})"
            )
        for r in result["steps"]:
            if "pack_graph_big" in r:
                images = r["pack_graph_big"] * r["batch"]
                ceiling = big[r["norm"]]["graph"] * big[r["norm"]]["batch"]
                print(
                    f"{r['norm']:<5}{r['batch']:>6}{'':>38}{r['pack_graph_big']:>10.0f}{'':>13}"
                    f"{r['pack_graph_big'] / r['naive']:>13.1f}×{images:>9.0f} ({images / ceiling:.0%})   pack K={r['k_big']}"
                )
        eager = {r[key].get("eager_reason") for r in result["steps"] for key in ("graph_info", "pack_info") if key in r}
        eager.discard(None)
        if eager:
            print(f"  (graph and pack+g ran eagerly here: {'; '.join(sorted(eager))})")
        for norm, r in big.items():
            print(
                f"{norm:<5}{r['batch']:>6}{'':>9}{r['graph']:>9.0f}   graph, one run: {r['graph'] * r['batch']:.0f} images/s "
                "(the ceiling the percentages above compare to)"
            )
    runs = len(result["args"]["grid_batches"]) * len(VARIANTS) * result["args"]["seeds"]
    seq = result.get("sequential")
    if seq is not None:
        how = "extrapolated from timed slices" if seq["extrapolated"] else "run in full"
        print(f"\ngrid ({runs} runs, 1 epoch): sequential eager runs {seq['wall_s']:.1f}s ({how})")
    for key in ("grid", "grid_mixed"):
        if key not in result:
            continue
        e = result[key]
        how = f"packs of up to {e['pack_size']} runs, " + ("batch sizes mixed" if e["mixed"] else "one batch size each")
        faster = f": {seq['wall_s'] / e['wall_s']:.1f}× faster" if seq is not None else ""
        print(f"  engine, {how}: {e['wall_s']:.1f}s{faster}")
        for p in e["packs"]:
            print(f"    {p['runs']} runs at batch sizes {p['batch_sizes']}: {p['wall_s']:.1f}s")
        print("    val_acc (mean over seeds): " + ", ".join(f"{k} {v:.3f}" for k, v in e["val_acc"].items()))
    print("part seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in result.get("part_s", {}).items()))
    for name, tb in result.get("errors", {}).items():
        print(f"{name} FAILED: {tb.strip().splitlines()[-1]}")


if __name__ == "__main__":
    main()
