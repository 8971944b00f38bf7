"""What the in-process grid benches (finetune_cpu, seg_grid, text_norms) share: the upload parser's canonical file,
training a pack of runs as a worker does and a whole variant × batch-size grid that way, the service's results and
verdicts for runs they trained themselves, and a cell's `mean ± h` in points."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from app.core.dataset_format import CanonicalDataset, save_canonical
from app.ingest import ingest_file
from app.services import results as results_service

if TYPE_CHECKING:
    from workers.data import DeviceData
    from workers.engine import Outcome, RunConfig


def canonical_file(raw: Path, **ingest: Any) -> tuple[Path, CanonicalDataset]:
    """`raw` through the upload parser (`ingest`: its options), saved as the canonical file next to it."""
    canonical = ingest_file(raw, raw.name, **ingest)
    path = raw.with_name("canonical.npz")
    save_canonical(canonical, path)
    return path, canonical


class Quiet:
    """A run's reporter that records nothing and never asks the run to stop."""

    def report(self, *args: Any, **kwargs: Any) -> None:
        pass

    def stop_reason(self) -> None:
        return None


def train_pack(cfgs: list[RunConfig], data: DeviceData) -> tuple[list[Outcome], float]:
    """Train `cfgs` as one pack on the CPU, as a worker does; their outcomes (none may have raised) and the wall
    time in seconds."""
    import torch  # here, not above: text_norms --report-from only tabulates

    from workers.engine import Outcome, PackTrainer

    started = time.perf_counter()
    outs = PackTrainer(cfgs, data, torch.device("cpu"), [Quiet() for _ in cfgs]).run()
    took = time.perf_counter() - started
    for out in outs:
        assert isinstance(out, Outcome), out
    return outs, took  # type: ignore[return-value]


def train_grid(
    labels: list[str],
    batches: list[int],
    seeds: list[int],
    data: DeviceData,
    config: Callable[[int, int, int], RunConfig],
    metric: str,
    metric_name: str,
) -> list[SimpleNamespace]:
    """Each variant × batch size trained as one pack of its seeds, as the service plans them (`config(variant index,
    batch size, seed)`: a run's config); the runs as build_results reads them. Prints each pack's final `metric`."""
    runs = []
    for b in batches:
        for vi, label in enumerate(labels):
            outs, took = train_pack([config(vi, b, s) for s in seeds], data)
            runs += [run_row(label, vi, b, s, out) for s, out in zip(seeds, outs, strict=True)]
            values = ", ".join(f"{out.final_metrics.get(metric, float('nan')):.3f}" for out in outs)
            print(f"{label:>10} batch {b}: {metric_name} {values}  ({took:.0f} s)", flush=True)
    return runs


def run_row(label: str, variant_index: int, batch_size: int, seed: int, out: Any) -> SimpleNamespace:
    """A run row as build_results reads it, from an engine Outcome of the run (`label` at `batch_size`, `seed`)."""
    return SimpleNamespace(
        id=f"{label}-{batch_size}-{seed}",
        variant=label,
        variant_index=variant_index,
        batch_size=batch_size,
        seed=seed,
        status=out.status,
        final_metrics=out.final_metrics,
        environment={},
        steps_done=out.steps,
        samples_seen=out.samples,
        wall_time_s=out.wall_time_s,
        peak_memory_bytes=None,
        error=out.error,
    )


def grid_results(runs: list[SimpleNamespace], job_id: str, batches: list[int], seeds: list[int], kind: str) -> Any:
    """The service's results and verdicts for these runs (build_results reads rows; here they are given)."""
    job = SimpleNamespace(id=job_id, dataset_id="shapes", spec={"batch_sizes": batches, "seeds": seeds})
    session = SimpleNamespace(get=lambda table, key: SimpleNamespace(kind=kind))
    results_service.job_runs = lambda s, j: runs  # type: ignore[assignment]
    results_service.best_epoch_values = lambda s, j, m="val_acc": {}  # type: ignore[assignment]
    return results_service.build_results(session, job, "succeeded")  # type: ignore[arg-type]


def mean_pm(s: Any) -> str:
    """`mean ± h` in points, h the 95% t half-width t(0.975, n−1)·std/√n (unclipped)."""
    from scipy import stats as sps

    if s.mean is None:
        return "—"
    if s.std is None or s.n < 2:
        return f"{100 * s.mean:.1f}"
    return f"{100 * s.mean:.1f} ± {100 * sps.t.ppf(0.975, s.n - 1) * s.std / s.n**0.5:.1f}"
