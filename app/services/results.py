"""Results of a job computed from what is in the database: per-run finals, per-cell summaries, curves."""

from __future__ import annotations

import statistics
from collections import defaultdict

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.schemas.results import CellSummary, Curves, CurveSeries, Results, RunResult, Stat
from app.schemas.runs import MetricPointOut
from app.tables import TERMINAL_STATES, Job, MetricPoint, Run


def job_runs(session: Session, job: Job) -> list[Run]:
    stmt = select(Run).where(Run.job_id == job.id).order_by(Run.batch_size, Run.variant_index, Run.seed)
    return list(session.scalars(stmt))


def _run_result(run: Run) -> RunResult:
    final = run.final_metrics or {}
    env = run.environment or {}
    return RunResult(
        run_id=run.id,
        variant=run.variant,
        batch_size=run.batch_size,
        seed=run.seed,
        status=run.status,
        val_acc=final.get("val_acc"),
        val_loss=final.get("val_loss"),
        train_loss=final.get("train_loss"),
        steps=run.steps_done,
        samples_seen=run.samples_seen,
        wall_time_s=run.wall_time_s,
        images_per_s=final.get("images_per_s"),
        device=env.get("device"),
        torch_version=env.get("torch"),
        error=run.error,
    )


def _stat(values: list[float]) -> Stat:
    if not values:
        return Stat(mean=None, std=None)
    return Stat(mean=statistics.fmean(values), std=statistics.stdev(values) if len(values) > 1 else None)


def build_results(session: Session, job: Job, status: str) -> Results:
    runs = job_runs(session, job)
    results = [_run_result(r) for r in runs]
    variants = list(dict.fromkeys(r.variant for r in sorted(runs, key=lambda r: r.variant_index)))
    batch_sizes = list(job.spec["batch_sizes"])
    cells: dict[tuple[str, int], list[RunResult]] = defaultdict(list)
    for r in results:
        cells[(r.variant, r.batch_size)].append(r)
    summaries = []
    for b in batch_sizes:
        for v in variants:
            members = cells.get((v, b), [])
            ok = [r for r in members if r.status == "succeeded"]
            summaries.append(
                CellSummary(
                    variant=v,
                    batch_size=b,
                    n=len(ok),
                    n_total=len(members),
                    diverged=sum(r.status == "diverged" for r in members),
                    val_acc=_stat([r.val_acc for r in ok if r.val_acc is not None]),
                    val_loss=_stat([r.val_loss for r in ok if r.val_loss is not None]),
                    train_loss=_stat([r.train_loss for r in ok if r.train_loss is not None]),
                )
            )
    complete = all(r.status in TERMINAL_STATES for r in runs)
    consumed = {r.samples_seen for r in runs if r.status == "succeeded"}
    notes = []
    if not complete:
        notes.append("partial: some runs are still queued or running; numbers will change")
    if len(consumed) > 1:
        notes.append(f"unequal budgets: succeeded runs consumed {sorted(consumed)} samples")
    diverged = sum(r.status == "diverged" for r in runs)
    if diverged:
        notes.append(f"{diverged} run(s) diverged (NaN/inf loss); they count as failures of their variant")
    return Results(
        job_id=job.id,
        status=status,
        complete=complete,
        variants=variants,
        batch_sizes=batch_sizes,
        budget_equal=len(consumed) <= 1,
        notes=notes,
        runs=results,
        cells=summaries,
    )


def downsample(points: list[MetricPointOut], max_points: int) -> list[MetricPointOut]:
    """Evenly spaced points that always keep the first and the last."""
    if len(points) <= max_points:
        return points
    if max_points == 1:
        return [points[-1]]
    last = len(points) - 1
    idx = sorted({round(i * last / (max_points - 1)) for i in range(max_points)})
    return [points[i] for i in idx]


def build_curves(session: Session, job: Job, metric: str, max_points: int | None) -> Curves:
    runs = job_runs(session, job)
    by_run: dict[str, list[MetricPointOut]] = defaultdict(list)
    stmt = (
        select(MetricPoint.run_id, MetricPoint.step, MetricPoint.epoch, MetricPoint.value)
        .join(Run, Run.id == MetricPoint.run_id)
        .where(Run.job_id == job.id, MetricPoint.name == metric)
        .order_by(MetricPoint.run_id, MetricPoint.step)
    )
    for run_id, step, epoch, value in session.execute(stmt):
        by_run[run_id].append(MetricPointOut(step=step, epoch=epoch, value=value))
    series = [
        CurveSeries(
            run_id=r.id,
            variant=r.variant,
            batch_size=r.batch_size,
            seed=r.seed,
            total_points=len(by_run[r.id]),
            points=downsample(by_run[r.id], max_points) if max_points else by_run[r.id],
        )
        for r in runs
        if by_run.get(r.id)
    ]
    return Curves(job_id=job.id, metric=metric, series=series)
