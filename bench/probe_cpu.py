"""Probe figures on this CPU (issue 12 §3): step time, images/s and traced peak memory of one ResNet-18 run per
variant (bn, bn_frozen, bn_eval, gn) at batch sizes 2..32, and the largest batch that fits the worker budget.

The measurement is the worker's own (workers.probe: measure_variant / summarize / limits_for, the code the
`normbench.probe` task runs), on the generated shapes set of bench/finetune_cpu.py (256 RGB images of 32×32,
fed at `--resize`), without the API and Postgres around it.

    OMP_NUM_THREADS=1 .venv/bin/python bench/probe_cpu.py [--resize 64] [--max-batch 32] [--steps 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from app.config import Settings  # noqa: E402
from app.core.dataset_format import save_canonical  # noqa: E402
from app.ingest import ingest_file  # noqa: E402
from app.schemas.probes import ProbeRequest  # noqa: E402
from bench.finetune_cpu import shapes  # noqa: E402
from workers.data import load_device_data  # noqa: E402
from workers.probe import limits_for, measure_variant, summarize  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--resize", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("bench/results/probe_cpu.json"))
    a = p.parse_args()
    torch.set_num_threads(1)
    spec = ProbeRequest.model_validate(
        {
            "dataset_id": "shapes",
            "model": {"arch": "resnet18"},
            "variants": [{"norm": n} for n in ("bn", "bn_frozen", "bn_eval", "gn")],
            "input": {"resize": a.resize},
            "max_batch_size": a.max_batch,
            "steps": a.steps,
            "pack_size": 1,
        }
    )
    budget = {"train_size": 224, "val_size": 32}
    with tempfile.TemporaryDirectory() as tmp:
        x, y = shapes(256, seed=0)
        np.savez(Path(tmp) / "s.npz", x=x, y=y)
        save_canonical(ingest_file(Path(tmp) / "s.npz", "s.npz"), Path(tmp) / "c.npz")
        data = load_device_data(Path(tmp) / "c.npz", budget, torch.device("cpu"))
    device = torch.device("cpu")
    limits = limits_for(Settings(), device, spec, 1)
    rows = []
    for v in spec.expanded_variants():
        rows += measure_variant(spec, v, budget, data, device, limits)
    res = summarize(spec, rows, limits)
    print(f"resnet18 at {a.resize}×{a.resize}, 1 thread; limit {res['memory_limit_bytes'] / 2**30:.0f} GiB")
    print("| variant | batch | step s | images/s | traced run memory MiB | fits |")
    print("|---|---|---|---|---|---|")
    for m in rows:
        mib = "—" if m["run_bytes"] is None else f"{m['run_bytes'] / 2**20:.0f}"
        print(
            f"| {m['variant']} | {m['batch_size']} | {m['step_s']:.3f} | {m['images_per_s']:.1f} | {mib} | {m['fits']} |"
        )
    print(f"affordable: {res['affordable_batch_size']}; auto → {res['auto_batch_sizes']}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"resize": a.resize, "threads": 1, **res}, indent=1))


if __name__ == "__main__":
    main()
