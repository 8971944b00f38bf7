"""The database side of one run: claim with a fencing token, heartbeat, write progress, finish.

Every write after the claim is conditional on (run id, attempt, status running), so a worker
that lost its claim changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_, select, update
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


def claim_values(worker: str, lease_seconds: float, now: datetime) -> dict[str, Any]:
    """What claiming a run writes: running, the next attempt (the fencing token), this worker, a fresh lease."""
    return {
        "status": "running",
        "attempt": Run.attempt + 1,
        "worker": worker,
        "lease_expires_at": now + timedelta(seconds=lease_seconds),
        "started_at": now,
    }


def claim_run(session: Session, run_id: str, worker: str, lease_seconds: float, max_attempts: int) -> Claim | None:
    """Take a queued run, or a running one whose lease expired; bump its attempt (the fencing token)."""
    now = utcnow()
    expired = (Run.status == "running") & (Run.lease_expires_at < now) & (Run.attempt < max_attempts)
    row = session.execute(
        update(Run)
        .where(Run.id == run_id, (Run.status == "queued") | expired)
        .values(**claim_values(worker, lease_seconds, now))
        .returning(Run.attempt, Run.checkpoint_uri)
    ).first()
    session.commit()
    return None if row is None else Claim(run_id, int(row[0]), row[1])


def claim_pack_mates(session: Session, run_id: str, worker: str, lease_seconds: float, limit: int) -> list[Claim]:
    """Claim up to `limit` more queued runs that can train in one pack with `run_id` (already claimed):
    the same job and batch size. Runs of `run_id`'s own variant come first (they stack into one vmap
    group), then the job's other variants in spec order, seeds in order. Each claim bumps that run's
    attempt and takes its own lease, exactly as `claim_run` does for a queued run; the conditional
    update (and SKIP LOCKED on Postgres) means two workers never claim the same run."""
    if limit <= 0:
        return []
    lead = session.execute(select(Run.job_id, Run.batch_size, Run.variant).where(Run.id == run_id)).first()
    if lead is None:
        return []
    job_id, batch_size, variant = lead
    pick = (
        select(Run.id)
        .where(Run.job_id == job_id, Run.batch_size == batch_size, Run.status == "queued", Run.id != run_id)
        .order_by((Run.variant == variant).desc(), Run.variant_index, Run.seed, Run.id)
        .limit(limit)
    )
    if session.get_bind().dialect.name == "postgresql":
        pick = pick.with_for_update(skip_locked=True)  # held until commit: a concurrent claimer skips them
    ids = list(session.scalars(pick))
    if not ids:
        session.commit()
        return []
    now = utcnow()
    rows = session.execute(
        update(Run)
        .where(Run.id.in_(ids), Run.status == "queued")
        .values(**claim_values(worker, lease_seconds, now))
        .returning(Run.id, Run.attempt, Run.checkpoint_uri)
    ).all()
    session.commit()
    claimed = {str(r[0]): Claim(str(r[0]), int(r[1]), r[2]) for r in rows}
    return [claimed[i] for i in ids if i in claimed]


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


def renew_leases(session: Session, claims: list[tuple[str, int]], lease_seconds: float) -> dict[str, bool | None]:
    """`renew_lease` for several (run id, attempt) claims in one statement: each run's job cancel flag,
    or None for a run this attempt no longer holds."""
    out: dict[str, bool | None] = {run_id: None for run_id, _ in claims}
    if not claims:
        return out
    rows = session.execute(
        update(Run)
        .where(or_(*(owned(run_id, attempt) for run_id, attempt in claims)))
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds))
        .returning(Run.id, Run.job_id)
    ).all()
    jobs = {job_id for _, job_id in rows}
    cancel: dict[str, bool] = {}
    if jobs:
        for job_id, flag in session.execute(select(Job.id, Job.cancel_requested).where(Job.id.in_(jobs))):
            cancel[job_id] = bool(flag)
    session.commit()
    for run_id, job_id in rows:
        out[run_id] = bool(cancel.get(job_id))
    return out


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
