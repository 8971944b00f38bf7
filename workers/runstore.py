"""The database side of one run: claim with a fencing token, write progress and points, finish.

Every write after the claim is conditional on (run id, attempt, status running), so a worker
that lost its claim changes nothing.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from sqlalchemy import Engine, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.tables import Job, MetricPoint, Run, utcnow
from workers.engine import Point

LEASE = timedelta(seconds=120)


class StaleAttempt(RuntimeError):
    """This worker's claim on the run was superseded; it must stop writing."""


def claim_run(session: Session, run_id: str, worker: str) -> int | None:
    """Take a queued run (or one whose lease expired); return the new attempt, or None."""
    now = utcnow()
    claimable = (Run.status == "queued") | ((Run.status == "running") & (Run.lease_expires_at < now))
    row = session.execute(
        update(Run)
        .where(Run.id == run_id, claimable)
        .values(
            status="running",
            attempt=Run.attempt + 1,
            worker=worker,
            lease_expires_at=now + LEASE,
            started_at=now,
        )
        .returning(Run.attempt)
    ).first()
    session.commit()
    return None if row is None else int(row[0])


def _upsert(engine: Engine) -> Any:
    return postgresql.insert if engine.dialect.name == "postgresql" else sqlite.insert


def record_progress(
    session: Session, run_id: str, attempt: int, points: list[Point], *, step: int, epoch: int, samples: int
) -> None:
    """Renew the lease, store progress and upsert points in one transaction, or raise StaleAttempt."""
    owned = session.execute(
        update(Run)
        .where(Run.id == run_id, Run.attempt == attempt, Run.status == "running")
        .values(steps_done=step, epochs_done=epoch, samples_seen=samples, lease_expires_at=utcnow() + LEASE)
        .returning(Run.id)
    ).first()
    if owned is None:
        session.rollback()
        raise StaleAttempt(f"run {run_id} attempt {attempt} no longer holds the run")
    if points:
        insert = _upsert(session.get_bind())  # type: ignore[arg-type]
        stmt = insert(MetricPoint).values(
            [{"run_id": run_id, "step": p.step, "epoch": p.epoch, "name": p.name, "value": p.value} for p in points]
        )
        stmt = stmt.on_conflict_do_update(
            index_elements=["run_id", "name", "step"], set_={"value": stmt.excluded.value, "epoch": stmt.excluded.epoch}
        )
        session.execute(stmt)
    session.commit()


def finish_run(
    session: Session,
    run_id: str,
    attempt: int,
    status: str,
    *,
    final_metrics: dict[str, Any] | None = None,
    error: str | None = None,
    steps: int | None = None,
    samples: int | None = None,
    wall_time_s: float | None = None,
    environment: dict[str, Any] | None = None,
) -> bool:
    """Move the run to a terminal state if this attempt still holds it."""
    values: dict[str, Any] = {"status": status, "finished_at": utcnow(), "lease_expires_at": None, "error": error}
    for key, value in (
        ("final_metrics", final_metrics),
        ("steps_done", steps),
        ("samples_seen", samples),
        ("wall_time_s", wall_time_s),
        ("environment", environment),
    ):
        if value is not None:
            values[key] = value
    row = session.execute(
        update(Run)
        .where(Run.id == run_id, Run.attempt == attempt, Run.status == "running")
        .values(**values)
        .returning(Run.id)
    ).first()
    session.commit()
    return row is not None


def cancel_requested(session: Session, run_id: str) -> bool:
    row = session.execute(
        select(Job.cancel_requested, Run.status).join(Run, Run.job_id == Job.id).where(Run.id == run_id)
    ).first()
    return row is None or bool(row[0]) or row[1] == "cancelled"
