"""Segmentation evidence (issue 13 §1): U-Net with bn, gn and switchable at batch 1, 2, 8, 3 seeds, on CPU.

The generated shapes-and-textures set (bench/make_shapes_seg.py: 240 RGB images of 32×32, 4 classes, masks known)
goes through the service's own path: the upload parser (app.ingest) to the canonical file, the worker's loader
(workers.data.load_device_data: 48 held-out validation images), the engine (workers.engine.PackTrainer: each
variant × batch size is one pack of its 3 seeds, as the service plans them) with the fixed budget (every run sees
the same samples in the same order), and the service's statistics (app.services.results.build_results: mean IoU
per cell with 95% intervals, paired tests against bn, Holm, verdicts), fed the runs' finals instead of database rows.

    OMP_NUM_THREADS=1 .venv/bin/python bench/seg_grid.py [--epochs 6] [--lr 0.4] [--out bench/results/seg_grid.json]

The optimizer is the spec's SGD (momentum 0.9, weight decay 5e-4, cosine, 1 warm-up epoch, linear scaling from
batch 32) with `lr` 0.4 at batch 32: 0.1 at batch 8, 0.0125 at batch 1. U-Net width 8, 2 levels.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.core.budget import resolve_budget  # noqa: E402
from app.schemas.jobs import OptimizerSpec  # noqa: E402
from bench.grid_results import canonical_file, grid_results, mean_pm, train_grid  # noqa: E402
from bench.make_shapes_seg import CLASS_NAMES, shapes  # noqa: E402
from workers.data import load_device_data  # noqa: E402
from workers.engine import RunConfig  # noqa: E402

VARIANTS = [("bn", "bn", {}), ("gn(4)", "gn", {"groups": 4}), ("switchable", "switchable", {})]
BATCHES = [1, 2, 8]
SEEDS = [0, 1, 2]


def dataset(tmp: Path) -> tuple[Path, int]:
    x, y = shapes(240, 32, seed=0)
    raw = tmp / "shapes.npz"
    np.savez(raw, x=x, y=y, class_names=np.asarray(CLASS_NAMES))
    path, canonical = canonical_file(raw)
    return path, canonical.num_samples


def train_unets(path: Path, n: int, epochs: int, lr: float) -> list[SimpleNamespace]:
    val = 48
    budget = resolve_budget(n - val, val, epochs, BATCHES)
    data = load_device_data(path, budget, torch.device("cpu"))
    opt = {**OptimizerSpec().model_dump(), "lr": lr}

    def config(variant: int, batch: int, seed: int) -> RunConfig:
        _, norm, params = VARIANTS[variant]
        return RunConfig("unet", norm, params, batch, seed, budget, {"width": 8, "levels": 2}, opt, {}, 50)

    return train_grid([v[0] for v in VARIANTS], BATCHES, SEEDS, data, config, "val_miou", "mIoU")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--quick", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--lr", type=float, default=0.4)
    p.add_argument("--out", type=Path, default=Path("bench/results/seg_grid.json"))
    a = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        path, n = dataset(Path(tmp))
        runs = train_unets(path, n, a.epochs, a.lr)
    res = grid_results(runs, "seg-grid", BATCHES, SEEDS, "segmentation")
    print(f"\nmetric: {res.metric}; wall {time.perf_counter() - t0:.0f} s")
    print("| variant | " + " | ".join(f"batch {b}" for b in BATCHES) + " |")
    print("|---|" + "---|" * len(BATCHES))
    for v in res.variants:
        cells = {c.batch_size: c.val_acc for c in res.cells if c.variant == v}
        text = [mean_pm(cells[b]) for b in BATCHES]
        print(f"| {v} | " + " | ".join(text) + " |")
    print("\nVerdicts:")
    for v in res.verdicts:
        print("-", v)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(
        json.dumps(
            {
                "epochs": a.epochs,
                "lr_at_32": a.lr,
                "wall_s": time.perf_counter() - t0,
                "torch_threads": torch.get_num_threads(),
                "runs": [
                    {k: getattr(r, k) for k in ("variant", "batch_size", "seed", "status", "final_metrics")}
                    for r in runs
                ],
                "results": res.model_dump(mode="json"),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
