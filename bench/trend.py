"""The seed's headline on data that does not saturate: BN vs BN-precise vs GN vs LN by batch size.

scikit-learn's `digits` saturates near 99.5% for every variant, so this uses a harder dataset made
offline by scikit-learn's `make_classification` (10 classes, 64 features of which 24 informative,
2 clusters per class, 2% label noise, fixed seed) and the MLP 64→256→256→10 — fully connected
layers are where BN normalizes over the fewest values. Calls the training engine directly.

    .venv/bin/python bench/trend.py [--epochs 5] [--seeds 3] [--procs 2] [--out bench/results/trend.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from app.core.budget import holdout_size, resolve_budget  # noqa: E402
from app.core.dataset_format import CanonicalDataset, save_canonical  # noqa: E402
from app.schemas.jobs import OptimizerSpec  # noqa: E402
from app.services.statistics import summarize  # noqa: E402

VARIANTS = [("bn", {}), ("bn_precise", {}), ("gn", {"groups": 16}), ("ln", {})]
BATCHES = [2, 4, 8, 16, 32]
OPT = OptimizerSpec().model_dump()  # the job spec's defaults


def make_dataset(path: Path) -> None:
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=6000,
        n_features=64,
        n_informative=24,
        n_redundant=8,
        n_classes=10,
        n_clusters_per_class=2,
        class_sep=1.5,
        flip_y=0.02,
        random_state=0,
    )
    save_canonical(
        CanonicalDataset("tabular", x.astype(np.float32), y.astype(np.int64), [str(i) for i in range(10)]), path
    )


def one_run(args: tuple[str, str, dict, int, int, dict]) -> dict:
    import torch

    from workers.data import load_device_data
    from workers.engine import RunConfig, train

    path, norm, params, batch, seed, budget = args
    torch.set_num_threads(1)

    class Quiet:
        def report(self, *a: object, **k: object) -> None:
            pass

        def stop_reason(self) -> None:
            return None

    data = load_device_data(Path(path), budget, torch.device("cpu"))
    cfg = RunConfig("mlp", norm, params, batch, seed, budget, {"hidden": [256, 256]}, OPT, {}, 100)
    out = train(cfg, data, torch.device("cpu"), Quiet())
    return {
        "norm": norm,
        "batch": batch,
        "seed": seed,
        "status": out.status,
        "val_acc": out.final_metrics.get("val_acc"),
        "samples": out.samples,
        "wall_s": out.wall_time_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--procs", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    path = Path(tempfile.mkdtemp()) / "hard.npz"
    make_dataset(path)
    n = 6000
    val = holdout_size(n, 0.2)
    budget = resolve_budget(n - val, val, args.epochs, BATCHES)
    work = [
        (str(path), norm, params, b, s, budget) for b in BATCHES for norm, params in VARIANTS for s in range(args.seeds)
    ]
    started = time.monotonic()
    with ProcessPoolExecutor(args.procs) as pool:
        rows = list(pool.map(one_run, work))
    wall = time.monotonic() - started
    print(
        f"make_classification (6000×64, 10 classes), MLP 64-256-256-10, {args.epochs} epochs, {args.seeds} seeds, "
        f"{budget['total_samples']} samples per run; {wall:.0f}s"
    )
    header = f"{'norm':<12}" + "".join(f"{'batch ' + str(b):>20}" for b in BATCHES)
    print("final validation accuracy, mean ± 95% CI half-width (diverged runs noted)")
    print(header)
    table = {}
    for norm, _ in VARIANTS:
        line = f"{norm:<12}"
        for b in BATCHES:
            cell = [r for r in rows if r["norm"] == norm and r["batch"] == b]
            accs = [r["val_acc"] for r in cell if r["status"] == "succeeded"]
            s = summarize(accs)
            half = None if s.ci_high is None or s.mean is None else s.ci_high - s.mean
            text = "—" if s.mean is None else f"{s.mean * 100:.1f}" + ("" if half is None else f" ± {half * 100:.1f}")
            if len(accs) < len(cell):
                text += f" ({len(cell) - len(accs)} div)"
            table[f"{norm}@{b}"] = {"mean": s.mean, "ci_low": s.ci_low, "ci_high": s.ci_high, "n": s.n}
            line += f"{text:>20}"
        print(line)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps(
                {"epochs": args.epochs, "seeds": args.seeds, "wall_s": wall, "cells": table, "runs": rows}, indent=2
            )
        )


if __name__ == "__main__":
    main()
