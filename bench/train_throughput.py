"""Steps/s of NormBench's training engine against a tutorial-style loop, side by side in one run.

The naive loop is what a tutorial writes: a DataLoader over a TensorDataset of float tensors,
shuffling, eager PyTorch, torch's default thread count. Ours is `workers.engine.Trainer`: the
dataset resident as uint8 on the device, batches sliced by index, one normalization per batch.

    .venv/bin/python bench/train_throughput.py [--arch cnn] [--steps 600] [--out bench/results/throughput.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from app.budget import holdout_size, resolve_budget
from app.services.builtin import digits_dataset
from app.services.ingest import save_canonical
from workers.data import DeviceData, load_device_data
from workers.engine import RunConfig, Trainer, build_run_model

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


class NullReporter:
    def report(self, *args: object, **kwargs: object) -> None:
        pass

    def stop_reason(self) -> None:
        return None


def naive_steps_per_s(cfg: RunConfig, data: DeviceData, steps: int) -> float:
    model = build_run_model(cfg, data, torch.device("cpu"))
    x = (data.x_train.float() - data.mean) / data.std  # a tutorial normalizes the whole set up front
    loader = DataLoader(TensorDataset(x, data.y_train), batch_size=cfg.batch_size, shuffle=True, drop_last=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    done, start = 0, 0.0
    while done < steps + 20:
        for xb, yb in loader:
            if done == 20:  # warm-up excluded
                start = time.perf_counter()
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            done += 1
            if done == steps + 20:
                break
    return steps / (time.perf_counter() - start)


def engine_steps_per_s(cfg: RunConfig, data: DeviceData, steps: int) -> float:
    trainer = Trainer(cfg, data, torch.device("cpu"), NullReporter())
    trainer.epochs = 10**6  # run by steps, not by budget
    order = torch.randperm(len(data.x_train))
    idx = [order[(i * cfg.batch_size) % (len(order) - cfg.batch_size) :][: cfg.batch_size] for i in range(steps + 20)]
    for i in idx[:20]:
        trainer.train_step(i)
    start = time.perf_counter()
    for i in idx[20:]:
        trainer.train_step(i)
        trainer.reporter.stop_reason()
        if trainer.step % cfg.log_every_steps == 0:
            trainer.check_window([])
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="cnn", choices=sorted(MODEL))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    ds = digits_dataset()
    path = Path(tempfile.mkdtemp()) / "digits.npz"
    save_canonical(ds, path)
    val = holdout_size(ds.num_samples, 0.1)
    budget = resolve_budget(ds.num_samples - val, val, 1, [2, 8, 32])
    data = load_device_data(path, budget, torch.device("cpu"))
    default_threads = torch.get_num_threads()
    rows = []
    for norm in ("bn", "gn"):
        for batch in (2, 8, 32):
            cfg = RunConfig(args.arch, norm, {}, batch, 0, budget, MODEL[args.arch], OPT, {}, 50)
            torch.set_num_threads(default_threads)
            naive = naive_steps_per_s(cfg, data, args.steps)
            torch.set_num_threads(1 if batch <= 8 else default_threads)
            ours = engine_steps_per_s(cfg, data, args.steps)
            rows.append(
                {"norm": norm, "batch": batch, "naive_steps_s": naive, "engine_steps_s": ours, "ratio": ours / naive}
            )
    torch.set_num_threads(default_threads)
    env = {
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "threads": default_threads,
        "arch": args.arch,
        "steps": args.steps,
    }
    print(f"{args.arch} on digits, torch {torch.__version__}, {default_threads} threads available")
    print(f"{'norm':<6}{'batch':>6}{'naive steps/s':>16}{'engine steps/s':>16}{'ratio':>8}")
    for r in rows:
        print(
            f"{r['norm']:<6}{r['batch']:>6}{r['naive_steps_s']:>16.0f}{r['engine_steps_s']:>16.0f}{r['ratio']:>7.2f}×"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"env": env, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
