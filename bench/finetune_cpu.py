"""Fine-tuning evidence on CPU (issue 12): a torchvision ResNet-18 with BatchNorm pretrained on one generated image
set, saved as safetensors, then fine-tuned on a *different* generated set with `bn`, `bn_frozen`, `bn_eval` and `gn`
(GroupNorm from the same convolutions) at batch sizes 2, 4, 16, 3 seeds.

No real pretrained weights can be downloaded here (no internet beyond package registries), so the "pretrained"
network is trained by this script on set A: 10 classes of oriented, coloured gratings (32×32 RGB). Set B is 4
classes of filled shapes (disc, square, triangle, cross) at random positions, sizes and bright colours on dark
plain backgrounds: a different task whose early features (edges) the pretraining can help with. (A first version
with textured backgrounds stayed at chance, 25%, for every variant and also in a plain torch loop; see RESULTS.)

The fine-tuning goes through the service's own path, minus HTTP and Postgres: the upload checks
(app.ingest.safetensors_check against the resnet18 manifest, app.ingest.ingest_file for the images with a test
split), the worker's loader, the engine (workers.engine.PackTrainer with the job's `init`: backbone and BN state
per variant, seeded head; each variant × batch size is one pack of its 3 seeds, as the service plans them) and the
service's statistics (app.services.results.build_results: 95% intervals, paired tests against bn, verdicts).

    OMP_NUM_THREADS=1 .venv/bin/python bench/finetune_cpu.py [--epochs 3] [--out bench/results/finetune_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.core.arch_manifests import manifest  # noqa: E402
from app.core.budget import resolve_budget  # noqa: E402
from app.ingest.safetensors_check import check_weights_file  # noqa: E402
from app.schemas.jobs import OptimizerSpec  # noqa: E402
from bench.grid_results import canonical_file, grid_results, mean_pm, train_grid  # noqa: E402
from workers.data import load_device_data  # noqa: E402
from workers.engine import RunConfig  # noqa: E402

VARIANTS = [("bn", "bn"), ("bn_frozen", "bn_frozen"), ("bn_eval", "bn_eval"), ("gn(32)", "gn")]
BATCHES = [2, 4, 16]
SEEDS = [0, 1, 2]
SIZE = 32


def generated_set(n: int, seed: int, classes: int, draw: Callable[..., np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """`n` RGB images of SIZE×SIZE with labels drawn uniformly from `classes`; `draw(rng, k, yy, xx)` paints one of
    class k (yy, xx: the pixel grid) with the same random generator, in order."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    y = rng.integers(0, classes, n)
    x = np.empty((n, SIZE, SIZE, 3), np.uint8)
    for i, k in enumerate(y):
        x[i] = draw(rng, k, yy, xx).clip(0, 255)
    return x, y.astype(np.int64)


def grating(rng: np.random.Generator, k: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    a = math.pi * k / 10
    f = rng.uniform(0.25, 0.6)
    wave = np.sin(f * (xx * math.cos(a) + yy * math.sin(a)) + rng.uniform(0, 2 * math.pi))
    tint = rng.uniform(0.3, 1.0, 3)
    return 127 + 100 * wave[..., None] * tint + rng.normal(0, 20, (SIZE, SIZE, 3))


def shape(rng: np.random.Generator, k: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    r = rng.uniform(7, 11)
    cy, cx = rng.uniform(r, SIZE - r, 2)
    dy, dx = yy - cy, xx - cx
    if k == 0:
        mask = dy**2 + dx**2 <= r**2
    elif k == 1:
        mask = (abs(dy) <= r * 0.8) & (abs(dx) <= r * 0.8)
    elif k == 2:
        mask = (dy <= r * 0.7) & (dy >= -r) & (abs(dx) <= (dy + r) * 0.6)
    else:
        mask = ((abs(dy) <= r) & (abs(dx) <= r * 0.3)) | ((abs(dx) <= r) & (abs(dy) <= r * 0.3))
    fg, bg = rng.uniform(150, 255, 3), rng.uniform(0, 90, 3)
    return np.where(mask[..., None], fg, bg) + rng.normal(0, 12, (SIZE, SIZE, 3))


def gratings(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Set A: class k = a sine grating at angle k·18°, random phase, frequency and tint, plus noise."""
    return generated_set(n, seed, 10, grating)


def shapes(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Set B: a bright disc, square, triangle or cross of random size, place and colour on a dark plain background."""
    return generated_set(n, seed, 4, shape)


def pretrain(n: int, epochs: int, out: Path) -> dict[str, Any]:
    """The user's own pretraining, outside the service: ResNet-18 (BatchNorm) on set A, saved as safetensors."""
    x, y = gratings(n, seed=100)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.25)
    yt = torch.from_numpy(y)
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None, num_classes=10)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    steps = epochs * (n // 32)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps)
    t0 = time.perf_counter()
    net.train()
    for epoch in range(epochs):
        perm = torch.randperm(n)
        for i in range(n // 32):
            idx = perm[i * 32 : (i + 1) * 32]
            loss = F.cross_entropy(net(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        print(f"pretrain epoch {epoch + 1}: last loss {loss.item():.3f}", flush=True)
    xv, yv = gratings(500, seed=101)
    net.eval()
    with torch.no_grad():
        xvt = torch.from_numpy(xv).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.25)
        acc = (net(xvt).argmax(1) == torch.from_numpy(yv)).float().mean().item()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out))
    summary = check_weights_file(out, manifest("resnet18"))  # the upload's check
    return {"set_a_val_acc": acc, "wall_s": time.perf_counter() - t0, "bn_stats": summary.has_bn_stats}


def dataset(tmp: Path, n_train: int) -> Path:
    x, y = shapes(n_train, seed=0)
    xt, yt = shapes(200, seed=1)
    raw = tmp / "shapes.npz"
    np.savez(raw, x=x, y=y, x_test=xt, y_test=yt)
    return canonical_file(raw)[0]  # the upload parser: canonical uint8 NCHW, test split kept


def finetune(path: Path, weights: Path, n_train: int, epochs: int, lr: float) -> list[SimpleNamespace]:
    val = n_train // 4
    budget = resolve_budget(n_train - val, val, epochs, BATCHES)
    data = load_device_data(path, budget, torch.device("cpu"))
    opt = {**OptimizerSpec().model_dump(), "lr": lr, "lr_scaling": "sqrt", "warmup_epochs": 0.5}
    init = {"weights_id": "pretrained-on-gratings", "backbone_lr_mult": 1.0, "path": str(weights)}

    def config(variant: int, batch: int, seed: int) -> RunConfig:
        norm = VARIANTS[variant][1]
        return RunConfig("resnet18", norm, {}, batch, seed, budget, {}, opt, {"hflip": True}, 50, init=init)

    return train_grid([v[0] for v in VARIANTS], BATCHES, SEEDS, data, config, "test_acc", "test acc")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs")
    p.add_argument("--pretrain-epochs", type=int, default=3)
    p.add_argument("--pretrain-n", type=int, default=1280)
    p.add_argument("--n-train", type=int, default=128, help="set B images (a quarter held out for validation)")
    p.add_argument("--lr", type=float, default=0.028, help="rate at batch 32, sqrt-scaled (0.01 at batch 4)")
    p.add_argument("--out", type=Path, default=Path("bench/results/finetune_cpu.json"))
    a = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        weights = Path(tmp) / "resnet18-gratings.safetensors"
        pre = pretrain(a.pretrain_n, a.pretrain_epochs, weights)
        print(f"pretrained: set A held-out accuracy {pre['set_a_val_acc']:.3f} ({pre['wall_s']:.0f} s)", flush=True)
        runs = finetune(dataset(Path(tmp), a.n_train), weights, a.n_train, a.epochs, a.lr)
    res = grid_results(runs, "finetune-cpu", BATCHES, SEEDS, "image")
    print(f"\nwall {time.perf_counter() - t0:.0f} s")
    for metric in ("test_acc", "val_acc"):
        print(f"\n{metric} (%), mean ± 95% half-width over {len(SEEDS)} seeds")
        print("| variant | " + " | ".join(f"batch {b}" for b in BATCHES) + " |")
        print("|---|" + "---|" * len(BATCHES))
        for v in res.variants:
            cells = {c.batch_size: getattr(c, metric) for c in res.cells if c.variant == v}
            print(f"| {v} | " + " | ".join(mean_pm(cells[b]) for b in BATCHES) + " |")
    print("\nVerdicts (validation accuracy):")
    for v in res.verdicts:
        print("-", v)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "args": {k: str(v) for k, v in vars(a).items()},
        "pretrain": pre,
        "wall_s": time.perf_counter() - t0,
        "runs": [
            {k: getattr(r, k) for k in ("variant", "batch_size", "seed", "status", "final_metrics")} for r in runs
        ],
        "results": res.model_dump(mode="json"),
    }
    a.out.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
