"""Model-steps/s of NormBench's engine against a tutorial-style loop, side by side in one run (CPU).

naive   what a tutorial writes: a DataLoader over a TensorDataset of float tensors, shuffling,
        eager PyTorch, torch.optim.SGD
engine  `workers.engine.Trainer`, one run: uint8 data resident on the device, batches sliced by
        index, one normalization per batch, the real loop with its bookkeeping
pack K  `workers.packing.PackTrainer`: K runs (seeds) stacked with torch.func.vmap in one process,
        the same loop the worker uses with NORMBENCH_PACK_SIZE=K; reported as model-steps/s

    .venv/bin/python bench/train_throughput.py [--arch cnn|mlp] [--steps 600] [--k 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from app.core.budget import holdout_size, resolve_budget  # noqa: E402
from app.services.builtin import digits_dataset  # noqa: E402
from app.core.dataset_format import save_canonical  # noqa: E402
from workers.data import DeviceData, load_device_data  # noqa: E402
from workers.engine import Point, Progress, RunConfig, Trainer, build_run_model  # noqa: E402
from workers.packing import PackTrainer  # noqa: E402

OPT = {
    "lr": 0.1,
    "reference_batch_size": 32,
    "lr_scaling": "linear",
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "warmup_epochs": 0,
    "schedule": "constant",
}
MODEL = {"mlp": {"hidden": [256, 256]}, "cnn": {"width": 16}}
WARMUP = 30


class Timer:
    """Ends the run after WARMUP + n steps and times the last n (the first member's clock)."""

    def __init__(self, n: int, clock: bool) -> None:
        self.n, self.clock, self.calls, self.t0, self.t1 = n, clock, 0, 0.0, 0.0

    def report(self, points: list[Point], progress: Progress, checkpoint: dict[str, Any] | None = None) -> None:
        pass

    def stop_reason(self) -> str | None:
        self.calls += 1
        if self.clock and self.calls == WARMUP:
            self.t0 = time.perf_counter()
        if self.clock and self.calls == WARMUP + self.n:
            self.t1 = time.perf_counter()
        return "cancelled" if self.calls >= WARMUP + self.n else None

    def steps_per_s(self) -> float:
        return self.n / max(self.t1 - self.t0, 1e-9)


def naive_steps_per_s(cfg: RunConfig, data: DeviceData, steps: int) -> float:
    model = build_run_model(cfg, data, torch.device("cpu"))
    x = (data.x_train.float() - data.mean) / data.std  # a tutorial normalizes the whole set up front
    loader = DataLoader(TensorDataset(x, data.y_train), batch_size=cfg.batch_size, shuffle=True, drop_last=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    done, start = 0, 0.0
    while done < steps + WARMUP:
        for xb, yb in loader:
            if done == WARMUP:
                start = time.perf_counter()
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            done += 1
            if done == steps + WARMUP:
                break
    return steps / (time.perf_counter() - start)


def engine_steps_per_s(cfg: RunConfig, data: DeviceData, steps: int) -> float:
    timer = Timer(steps, clock=True)
    Trainer(cfg, data, torch.device("cpu"), timer).run()
    return timer.steps_per_s()


def pack_model_steps_per_s(cfg: RunConfig, data: DeviceData, steps: int, k: int) -> float:
    timers = [Timer(steps, clock=i == 0) for i in range(k)]
    PackTrainer([replace(cfg, seed=s) for s in range(k)], data, torch.device("cpu"), timers).run()
    return k * timers[0].steps_per_s()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="cnn", choices=sorted(MODEL))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--k", type=int, default=4, help="runs per pack")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    ds = digits_dataset()
    path = Path(tempfile.mkdtemp()) / "digits.npz"
    save_canonical(ds, path)
    val = holdout_size(ds.num_samples, 0.1)
    budget = resolve_budget(ds.num_samples - val, val, 100, [2, 8, 32])
    data = load_device_data(path, budget, torch.device("cpu"))
    rows = []
    for norm in ("bn", "gn"):
        for batch in (2, 8, 32):
            cfg = RunConfig(args.arch, norm, {}, batch, 0, budget, MODEL[args.arch], OPT, {}, 50)
            naive = naive_steps_per_s(cfg, data, args.steps)
            single = engine_steps_per_s(cfg, data, args.steps)
            packed = pack_model_steps_per_s(cfg, data, args.steps, args.k)
            rows.append(
                {
                    "norm": norm,
                    "batch": batch,
                    "naive": naive,
                    "engine": single,
                    "pack": packed,
                    "engine_ratio": single / naive,
                    "pack_ratio": packed / naive,
                }
            )
    env = {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "threads": torch.get_num_threads(),
        "arch": args.arch,
        "steps": args.steps,
        "k": args.k,
        "command": " ".join(sys.argv),
    }
    print(f"{args.arch} on digits, torch {torch.__version__}, {torch.get_num_threads()} threads; model-steps/s")
    print(f"{'norm':<6}{'batch':>6}{'naive':>9}{'engine':>9}{'ratio':>8}{f'pack K={args.k}':>11}{'ratio':>8}")
    for r in rows:
        print(
            f"{r['norm']:<6}{r['batch']:>6}{r['naive']:>9.0f}{r['engine']:>9.0f}{r['engine_ratio']:>7.2f}×"
            f"{r['pack']:>11.0f}{r['pack_ratio']:>7.2f}×"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"env": env, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
