"""Token sequences (issue 13 §2 evidence): the pre-norm Transformer with ln, rmsnorm, gn and masked bn by batch size.

Data: bench/make_text_rule.py (negation rule, 3% label noise), through the real upload parser
(app.ingest: byte tokens, max_length 64). Calls the training engine directly on the CPU, the 3 seeds of each
(norm, batch) cell packed as one vmapped group as a worker would, one thread. Verdicts: each norm against `bn`
at each batch size, the service's paired tests by seed with Holm's adjustment over the family of that batch size
(app.services.statistics.decide), margin 1 accuracy point.

    .venv/bin/python bench/text_norms.py [--epochs 6] [--seeds 3] [--n 2000] [--out bench/results/text_norms.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from app.core.budget import holdout_size, resolve_budget  # noqa: E402
from app.schemas.jobs import OptimizerSpec  # noqa: E402
from app.services.statistics import decide, paired_test, summarize  # noqa: E402
from bench.grid_results import canonical_file, train_pack  # noqa: E402
from bench.make_text_rule import make_rows, write  # noqa: E402

NORMS = ["bn", "ln", "rmsnorm", "gn"]
BATCHES = [2, 8, 32]
MODEL = {"width": 32, "layers": 2, "heads": 4}
MARGIN = 1.0  # accuracy points


def make_dataset(folder: Path, n: int) -> Path:
    raw = folder / "rule.csv"
    write(raw, make_rows(n, seed=0), jsonl=False)
    return canonical_file(raw, kind="text", max_length=64)[0]


def train_cell(path: Path, norm: str, batch: int, seeds: int, budget: dict, lr: float) -> list[dict]:
    """The cell's seeds as one pack (one vmapped group), as a worker trains them."""
    import torch

    from workers.data import load_device_data
    from workers.engine import RunConfig

    data = load_device_data(path, budget, torch.device("cpu"))
    opt = OptimizerSpec(lr=lr).model_dump()
    cfgs = [RunConfig("transformer", norm, {}, batch, s, budget, MODEL, opt, {}, 100) for s in range(seeds)]
    outs, wall = train_pack(cfgs, data)
    rows = []
    for s, out in enumerate(outs):
        f = out.final_metrics
        rows.append(
            {
                "norm": norm,
                "batch": batch,
                "seed": s,
                "status": out.status,
                "val_acc": f.get("val_acc"),
                "tokens": f.get("tokens"),
                "pack_wall_s": wall,
            }
        )
    return rows


def cell_text(accs: list[float]) -> str:
    s = summarize([a * 100 for a in accs], bounds=(0.0, 100.0))
    if s.mean is None:
        return "—"
    return f"{s.mean:.1f}" + ("" if s.half_width is None else f" ± {s.half_width:.1f}")


def report(rows: list[dict], seeds: int) -> dict:
    table: dict[str, dict] = {}
    print(f"{'norm':<10}" + "".join(f"{'batch ' + str(b):>16}" for b in BATCHES))
    for norm in NORMS:
        line = f"{norm:<10}"
        for b in BATCHES:
            accs = [r["val_acc"] for r in rows if r["norm"] == norm and r["batch"] == b and r["status"] == "succeeded"]
            text = cell_text(accs)
            table[f"{norm}@{b}"] = {"text": text, "accs": accs}
            line += f"{text:>16}"
        print(line)
    verdicts: dict[str, str] = {}
    for b in BATCHES:
        by = {
            n: {r["seed"]: r["val_acc"] * 100 for r in rows if r["norm"] == n and r["batch"] == b and r["val_acc"]}
            for n in NORMS
        }
        others = [n for n in NORMS if n != "bn"]
        decisions = decide([paired_test(by[n], by["bn"]) for n in others], MARGIN, limit=100.0)
        for n, d in zip(others, decisions, strict=True):
            t = paired_test(by[n], by["bn"])
            diff = "—" if t.mean_diff is None else f"{t.mean_diff:+.1f}"
            p_adj = "—" if d.p_adjusted is None else f"{d.p_adjusted:.2f}"
            verdicts[f"{n}@{b}"] = f"{d.verdict} ({diff} points vs bn, Holm p {p_adj})"
            print(f"batch {b:>2}: {n:<8} vs bn: {verdicts[f'{n}@{b}']}")
    return {"cells": table, "verdicts": verdicts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--lr", type=float, default=0.1, help="SGD learning rate at batch 32 (scaled linearly)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--norms", default=",".join(NORMS), help="a subset, to run cells in parallel processes")
    parser.add_argument("--rows", type=Path, help="append each cell's runs to this JSON-lines file as it ends")
    parser.add_argument("--report-from", type=Path, nargs="*", help="only tabulate runs from these JSON-lines files")
    args = parser.parse_args()
    if args.report_from:
        rows = [json.loads(line) for path in args.report_from for line in path.read_text().splitlines() if line]
        out = report(rows, args.seeds)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(
                json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **out, "runs": rows}, indent=2)
            )
        return
    import torch

    torch.set_num_threads(1)
    path = make_dataset(Path(tempfile.mkdtemp()), args.n)
    val = holdout_size(args.n, 0.2)
    budget = resolve_budget(args.n - val, val, args.epochs, BATCHES)
    started = time.monotonic()
    rows = []
    for b in BATCHES:
        for norm in args.norms.split(","):
            cell = train_cell(path, norm, b, args.seeds, budget, args.lr)
            rows += cell
            if args.rows:
                with args.rows.open("a") as f:
                    f.writelines(json.dumps(r) + "\n" for r in cell)
            print(f"  {norm} batch {b}: {rows[-1]['pack_wall_s']:.0f}s", flush=True)
    wall = time.monotonic() - started
    print(
        f"negation rule ({args.n} texts, {val} held out), transformer {MODEL}, {args.epochs} epochs, "
        f"{budget['total_samples']} samples per run, lr {args.lr} at batch 32; {wall:.0f}s on one thread"
    )
    out = report(rows, args.seeds)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(
            json.dumps({"args": vars(args) | {"out": str(args.out)}, "wall_s": wall, **out, "runs": rows}, indent=2)
        )


if __name__ == "__main__":
    main()
