"""Reading single runs for the API: one owner's run by id, and every metric point it recorded."""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.errors import NotFound
from app.schemas.runs import MetricPointOut, RunMetrics
from app.tables import MetricPoint, Run


def get_run(session: Session, owner: str, run_id: str) -> Run:
    run = session.scalars(select(Run).where(Run.id == run_id, Run.owner == owner)).first()
    if run is None:
        raise NotFound(f"run '{run_id}' not found; GET /v1/jobs/{{job_id}}/runs lists a job's runs")
    return run


def run_metrics(session: Session, run: Run) -> RunMetrics:
    """Every point of the run, grouped by metric name, each series in step order."""
    stmt = select(MetricPoint).where(MetricPoint.run_id == run.id).order_by(MetricPoint.name, MetricPoint.step)
    metrics: dict[str, list[MetricPointOut]] = defaultdict(list)
    for p in session.scalars(stmt):
        metrics[p.name].append(MetricPointOut(step=p.step, epoch=p.epoch, value=p.value))
    return RunMetrics(run_id=run.id, metrics=dict(metrics))
