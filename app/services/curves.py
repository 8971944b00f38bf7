"""Metric curves of a job: per-run series (shape-keeping downsampling, paging) and per-cell aggregates."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from dataclasses import asdict

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session

from app.repositories.runs import ordered_runs
from app.schemas.results import AggregatePointOut, CellCurve, CurveAggregate, Curves, CurveSeries
from app.schemas.runs import MetricPointOut, run_key
from app.services import statistics as st
from app.tables import Job, MetricPoint, Run


def _runs(session: Session, job: Job, run_id: str | None = None) -> list[Run]:
    stmt = ordered_runs(job.id)
    if run_id is not None:
        stmt = stmt.where(Run.id == run_id)
    return list(session.scalars(stmt))


def downsample(points: list[MetricPointOut], max_points: int) -> list[MetricPointOut]:
    """At most `max_points` points keeping first, last and every bucket's min and max (see statistics)."""
    return [points[i] for i in st.downsample_indices([p.value for p in points], max_points)]


def build_curves(
    session: Session,
    job: Job,
    metric: str,
    max_points: int | None,
    offset: int = 0,
    limit: int | None = None,
    run_id: str | None = None,
) -> Curves:
    """One series per run with points; `offset`/`limit` pick a window of each series (in step order)
    before downsampling, so a very long series can be read page by page at full resolution."""
    scope = (
        select(MetricPoint.run_id)
        .join(Run, Run.id == MetricPoint.run_id)
        .where(Run.job_id == job.id, MetricPoint.name == metric)
    )
    if run_id is not None:
        scope = scope.where(MetricPoint.run_id == run_id)
    totals: dict[str, int] = {
        rid: n for rid, n in session.execute(scope.add_columns(func.count()).group_by(MetricPoint.run_id))
    }
    window: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for rid, step, epoch, value in session.execute(_window(scope, offset, limit)):
        window[rid].append((step, epoch, value))
    series = [
        _series(r, totals[r.id], window.get(r.id, []), offset, max_points)
        for r in _runs(session, job, run_id)
        if totals.get(r.id)
    ]
    return Curves(
        job_id=job.id, metric=metric, max_points=max_points or None, offset=offset, limit=limit, series=series
    )


def _window(scope: Select[str], offset: int, limit: int | None) -> Select[str, int, float, float]:
    """(run id, step, epoch, value) of each run's points `offset`..`offset + limit` in step order."""
    if not offset and limit is None:
        return scope.add_columns(MetricPoint.step, MetricPoint.epoch, MetricPoint.value).order_by(
            MetricPoint.run_id, MetricPoint.step
        )
    rank = func.row_number().over(partition_by=MetricPoint.run_id, order_by=MetricPoint.step).label("rank")
    inner = scope.add_columns(MetricPoint.step, MetricPoint.epoch, MetricPoint.value, rank).subquery()
    stmt = select(inner.c.run_id, inner.c.step, inner.c.epoch, inner.c.value).where(inner.c.rank > offset)
    if limit is not None:
        stmt = stmt.where(inner.c.rank <= offset + limit)
    return stmt.order_by(inner.c.run_id, inner.c.step)


def _series(
    run: Run, total: int, rows: list[tuple[int, float, float]], offset: int, max_points: int | None
) -> CurveSeries:
    finite = [MetricPointOut(step=s, epoch=e, value=v) for s, e, v in rows if math.isfinite(v)]
    end = offset + len(rows)
    return CurveSeries(
        **run_key(run),
        total_points=total,
        window_points=len(rows),
        next_offset=end if end < total else None,
        nonfinite_points=len(rows) - len(finite),
        points=downsample(finite, max_points) if max_points else finite,
    )


def build_curve_aggregate(session: Session, job: Job, metric: str, max_points: int | None) -> CurveAggregate:
    """Per (variant, batch size): per step, mean, ±1 std band, min and max across the cell's seeds.

    Every run with points contributes (a running run up to where it is, a diverged run up to where it
    stopped); `n` on each point says how many seeds are behind it, and non-finite values are left out.
    """
    runs = _runs(session, job)
    stmt = (
        select(MetricPoint.run_id, MetricPoint.step, MetricPoint.epoch, MetricPoint.value)
        .join(Run, Run.id == MetricPoint.run_id)
        .where(Run.job_id == job.id, MetricPoint.name == metric)
        .order_by(MetricPoint.run_id, MetricPoint.step)
    )
    by_run: dict[str, list[tuple[int, float, float]]] = defaultdict(list)
    for rid, step, epoch, value in session.execute(stmt):
        by_run[rid].append((step, epoch, value))
    cells: dict[tuple[int, int], list[Run]] = defaultdict(list)
    for r in runs:
        if by_run.get(r.id):
            cells[(r.batch_size, r.variant_index)].append(r)
    out = []
    for key in sorted(cells):
        members = cells[key]
        agg = st.aggregate([by_run[r.id] for r in members])
        keep = st.downsample_indices([p.mean for p in agg], max_points or 0)
        out.append(
            CellCurve(
                variant=members[0].variant,
                batch_size=members[0].batch_size,
                seeds=sorted(r.seed for r in members),
                statuses=dict(Counter(r.status for r in members)),
                total_points=len(agg),
                points=[_agg_out(agg[i]) for i in keep],
            )
        )
    return CurveAggregate(job_id=job.id, metric=metric, max_points=max_points or None, cells=out)


def _agg_out(p: st.AggregatePoint) -> AggregatePointOut:
    lower, upper = (None, None) if p.std is None else (p.mean - p.std, p.mean + p.std)
    return AggregatePointOut(**asdict(p), lower=lower, upper=upper)
