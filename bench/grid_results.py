"""What the in-process grid benches (finetune_cpu, seg_grid) share: the service's results and verdicts for runs
they trained themselves, and a cell's `mean ± h` in points."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from app.services import results as results_service


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
