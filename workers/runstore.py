"""The database side of one run: claim with a fencing token, heartbeat, write progress, finish.

Every write after the claim is conditional on (run id, attempt, status running), so a worker
that lost its claim changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from app.tables import Job, MetricPoint, Run, utcnow
from workers.engine import Point, Progress


class StaleAttempt(RuntimeError):
    """This worker's claim on the run was superseded; it must stop writing."""


@dataclass(frozen=True)
class Claim:
    run_id: str
    attempt: int
    checkpoint_uri: str | None


def claim_run(session: Session, run_id: str, worker: str, lease_seconds: float, max_attempts: int) -> Claim | None:
    """Take a queued run, or a running one whose lease expired; bump its attempt (the fencing token)."""
    now = utcnow()
    expired = (Run.status == "running") & (Run.lease_expires_at < now) & (Run.attempt < max_attempts)
    row = session.execute(
        update(Run)
        .where(Run.id == run_id, (Run.status == "queued") | expired)
        .values(
            status="running",
            attempt=Run.attempt + 1,
            worker=worker,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            started_at=now,
        )
        .returning(Run.attempt, Run.checkpoint_uri)
    ).first()
    session.commit()
    return None if row is None else Claim(run_id, int(row[0]), row[1])


def owned(run_id: str, attempt: int) -> Any:
    return (Run.id == run_id) & (Run.attempt == attempt) & (Run.status == "running")


def renew_lease(session: Session, run_id: str, attempt: int, lease_seconds: float) -> bool | None:
    """Extend the lease; returns the job's cancel flag, or None when this attempt lost the run."""
    row = session.execute(
        update(Run)
        .where(owned(run_id, attempt))
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
        .returning(Run.job_id)
    ).first()
    if row is None:
        session.commit()
        return None
    cancel = session.scalar(select(Job.cancel_requested).where(Job.id == row[0]))
    session.commit()
    return bool(cancel)


def _insert_for(session: Session) -> Any:
    return postgresql.insert if session.get_bind().dialect.name == "postgresql" else sqlite.insert


def record_progress(
    session: Session,
    run_id: str,
    attempt: int,
    points: list[Point],
    progress: Progress,
    *,
    lease_seconds: float,
    checkpoint_uri: str | None = None,
) -> None:
    """Renew the lease, store progress and upsert points in one transaction, or raise StaleAttempt."""
    values: dict[str, Any] = {
        "steps_done": progress.step,
        "epochs_done": progress.epoch,
        "samples_seen": progress.samples,
        "lease_expires_at": utcnow() + timedelta(seconds=lease_seconds),
    }
    if checkpoint_uri is not None:
        values["checkpoint_uri"] = checkpoint_uri
    if session.execute(update(Run).where(owned(run_id, attempt)).values(**values).returning(Run.id)).first() is None:
        session.rollback()
        raise StaleAttempt(f"run {run_id} attempt {attempt} no longer holds the run")
    if points:
        insert = _insert_for(session)
        rows = [{"run_id": run_id, "step": p.step, "epoch": p.epoch, "name": p.name, "value": p.value} for p in points]
        stmt = insert(MetricPoint).values(rows)
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
    row = session.execute(update(Run).where(owned(run_id, attempt)).values(**values).returning(Run.id)).first()
    session.commit()
    return row is not None


def release_run(session: Session, run_id: str, attempt: int, reason: str) -> bool:
    """Hand the run back to the queue (graceful shutdown, out of memory); it resumes from its checkpoint."""
    row = session.execute(
        update(Run)
        .where(owned(run_id, attempt))
        .values(status="queued", lease_expires_at=None, published_at=utcnow(), error=reason)
        .returning(Run.id)
    ).first()
    session.commit()
    return row is not None


def mark_published(session: Session, run_ids: list[str]) -> None:
    session.execute(update(Run).where(Run.id.in_(run_ids)).values(published_at=utcnow()))
    session.commit()
