"""Model-steps/s of NormBench's engine against the best plain PyTorch loop, side by side in one run (CPU).

naive   the best plain loop: the training set normalized once and resident in memory, batches taken by
        tensor indexing, eager module forward, cross-entropy, backward, torch.optim.SGD
engine  one run through `workers.engine.PackTrainer` (a pack of one, what the worker runs for a single
        run): uint8 data resident on the device, one normalization per batch, the real loop with its
        bookkeeping (loss window, BN-noise sampling, reports)
pack K  K runs (seeds) stacked with torch.func.vmap in one process, the same loop the worker uses with
        NORMBENCH_PACK_SIZE=K; reported as model-steps/s

Each is measured at every thread count of --threads (default: 1 and torch's default) and the best is
shown with its thread count: on a small CPU a second thread often slows a small model down (threads
contend for the cores), so a baseline at torch's default threads would flatter the engine.

    .venv/bin/python bench/train_throughput.py [--arch cnn|mlp] [--steps 600] [--k 4] [--threads 1,2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from app.core.budget import holdout_size, resolve_budget  # noqa: E402
from app.core.dataset_format import save_canonical  # noqa: E402
from app.schemas.jobs import OptimizerSpec  # noqa: E402
from app.services.builtin import digits_dataset  # noqa: E402
from workers.checkpoint import Checkpoint  # noqa: E402
from workers.data import DeviceData, epoch_order, load_device_data  # noqa: E402
from workers.engine import PackTrainer, Point, Progress, RunConfig  # noqa: E402
from workers.run_config import build_run_model  # noqa: E402

# The schema's defaults (lr 0.1 at batch 32, linear scaling, momentum 0.9, weight decay 5e-4), constant rate.
OPT = OptimizerSpec(warmup_epochs=0, schedule="constant").model_dump()
MODEL = {"mlp": {"hidden": [256, 256]}, "cnn": {"width": 16}}
WARMUP = 30


class Timer:
    """Ends the run after WARMUP + n steps and times the last n (the first member's clock)."""

    def __init__(self, n: int, clock: bool) -> None:
        self.n, self.clock, self.calls, self.t0, self.t1 = n, clock, 0, 0.0, 0.0

    def report(self, points: list[Point], progress: Progress, checkpoint: Checkpoint | None = None) -> None:
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
    x = data.prepare(data.x_train)  # normalized once, up front
    order = epoch_order(cfg.seed, 0, len(x), len(x))
    per_epoch = len(order) // cfg.batch_size
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    start = 0.0
    for i in range(WARMUP + steps):
        if i == WARMUP:
            start = time.perf_counter()
        at = (i % per_epoch) * cfg.batch_size
        idx = order[at : at + cfg.batch_size]
        loss = F.cross_entropy(model(x[idx]), data.y_train[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps / (time.perf_counter() - start)


def pack_model_steps_per_s(cfg: RunConfig, data: DeviceData, steps: int, k: int) -> float:
    timers = [Timer(steps, clock=i == 0) for i in range(k)]
    PackTrainer([replace(cfg, seed=s) for s in range(k)], data, torch.device("cpu"), timers).run()
    return k * timers[0].steps_per_s()


def best(measure: Callable[[], float], threads: list[int]) -> tuple[float, int]:
    """The best rate over the thread counts, and the thread count that gave it."""
    rates = []
    for n in threads:
        torch.set_num_threads(n)
        rates.append((measure(), n))
    return max(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="cnn", choices=sorted(MODEL))
    parser.add_argument("--steps", type=int, default=600)
    parser.add_argument("--k", type=int, default=4, help="runs per pack")
    parser.add_argument("--threads", default=None, help="comma-separated thread counts (default: 1 and torch's)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    default_threads = torch.get_num_threads()
    threads = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, default_threads})

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
            naive, naive_t = best(lambda cfg=cfg: naive_steps_per_s(cfg, data, args.steps), threads)
            single, single_t = best(lambda cfg=cfg: pack_model_steps_per_s(cfg, data, args.steps, 1), threads)
            packed, packed_t = best(lambda cfg=cfg: pack_model_steps_per_s(cfg, data, args.steps, args.k), threads)
            rows.append(
                {
                    "norm": norm,
                    "batch": batch,
                    "naive": naive,
                    "naive_threads": naive_t,
                    "engine": single,
                    "engine_threads": single_t,
                    "pack": packed,
                    "pack_threads": packed_t,
                    "engine_ratio": single / naive,
                    "pack_ratio": packed / naive,
                }
            )
            print(rows[-1], flush=True)
    env = {
        "torch": torch.__version__,
        "machine": platform.machine(),
        "default_threads": default_threads,
        "threads_tried": threads,
        "arch": args.arch,
        "steps": args.steps,
        "k": args.k,
        "command": " ".join(sys.argv),
    }
    print(f"\n{args.arch} on digits, torch {torch.__version__}, threads tried {threads}; model-steps/s (threads)")
    print(f"{'norm':<6}{'batch':>6}{'naive':>12}{'engine':>12}{'ratio':>8}{f'pack K={args.k}':>12}{'ratio':>8}")
    for r in rows:
        print(
            f"{r['norm']:<6}{r['batch']:>6}{r['naive']:>8.0f} ({r['naive_threads']})"
            f"{r['engine']:>8.0f} ({r['engine_threads']}){r['engine_ratio']:>7.2f}×"
            f"{r['pack']:>8.0f} ({r['pack_threads']}){r['pack_ratio']:>7.2f}×"
        )
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"env": env, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
