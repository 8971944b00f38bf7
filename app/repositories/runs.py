"""The runs table's queries and every change of a run's status, one named function per transition.

    claim pack      queued (or running with an expired lease) → running, attempt + 1, a whole pack at once
    renew           running → running, lease extended
    record progress running → running, progress, points and checkpoint stored
    finish          running → succeeded | failed | diverged | cancelled
    release         running → queued (shutdown: resumes from its checkpoint)
    requeue         running with an expired lease → queued, or failed / cancelled
    publish         queued → queued, published_at and publish_count recorded (never-published, or due again)
    cancel queued   queued → cancelled
    retry           failed | cancelled → queued

A worker's writes are conditional on (run id, attempt, status running), so a worker whose claim was
superseded changes nothing: the attempt is the fencing token.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, Select, exists, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, aliased
from sqlalchemy.orm.util import AliasedClass

from app.core.progress import Point, Progress
from app.core.run_states import (
    ACTIVE,
    CANCELLED_BEFORE_START,
    CANCELLED_BY_USER,
    RETRYABLE,
    TERMINAL,
    RunStatus,
    worker_lost,
)
from app.repositories import publishing
from app.tables import Job, MetricPoint, Run, utcnow


class FailureClass(StrEnum):
    """Why a run ended failed (or diverged), in runs.failure_class: what a retry can and cannot change."""

    INFRASTRUCTURE = "infrastructure"  # the worker was lost on every attempt: retried up to max_attempts first
    DATA = "data"  # a data, model or code error: failed with its message, not retried
    RESOURCE = "resource"  # out of memory: failed, and a retry must change the spec or confirm (force)
    DIVERGENCE = "divergence"  # the loss became NaN/inf: a result, never retried


class StaleAttempt(RuntimeError):
    """This worker's claim on the run was superseded; it must stop writing."""


@dataclass(frozen=True)
class Claim:
    """A worker's hold on a run: the attempt it claimed (its fencing token) and where to resume from."""

    run_id: str
    attempt: int
    checkpoint_uri: str | None


@dataclass(frozen=True)
class Requeued:
    """What one pass over the expired leases did, by run id."""

    cancelled: list[str]
    failed: list[str]
    requeued: list[str]


def ordered_runs(job_id: str) -> Select[Run]:
    """A job's runs in report order: batch size, then the spec's variant order, then seed."""
    return select(Run).where(Run.job_id == job_id).order_by(Run.batch_size, Run.variant_index, Run.seed)


def _owned(run_id: str, attempt: int) -> ColumnElement[bool]:
    """The rows a worker holding `attempt` of `run_id` may still write."""
    return (Run.id == run_id) & (Run.attempt == attempt) & (Run.status == RunStatus.RUNNING)


def _expired(now: datetime) -> ColumnElement[bool]:
    return (Run.status == RunStatus.RUNNING) & (Run.lease_expires_at < now)


def _lease(lease_seconds: float) -> datetime:
    return utcnow() + timedelta(seconds=lease_seconds)


# --- claim -------------------------------------------------------------------------------------------


def _claim_values(worker: str, lease_seconds: float, now: datetime) -> dict[str, Any]:
    """What claiming a run writes: running, the next attempt (the fencing token), this worker, a fresh lease."""
    return {
        "status": RunStatus.RUNNING,
        "attempt": Run.attempt + 1,
        "worker": worker,
        "lease_expires_at": now + timedelta(seconds=lease_seconds),
        "started_at": now,
    }


def claim_pack(session: Session, run_id: str, worker: str, lease_seconds: float, max_attempts: int) -> list[Claim]:
    """Take `run_id` and every other claimable run of its pack (its job's runs with its `pack_key`) in one
    conditional update, or nothing when `run_id` itself is not claimable. Claimable: queued, or running
    with an expired lease and attempts left (its worker was lost). Each run's attempt (its fencing token)
    is bumped and it gets its own lease. One statement takes the whole pack, so two workers never split
    one: a concurrent claimer waits on the row locks, then finds the runs running and takes none. A run
    without a pack key (made before packs were planned) is claimed alone. The claims come in the pack's
    planned order (seed, then variant), so a pack trains the same way whoever claimed it."""
    now = utcnow()
    lead = session.execute(select(Run.job_id, Run.pack_key).where(Run.id == run_id)).first()
    if lead is None:
        session.commit()
        return []
    job_id, pack_key = lead
    same_pack = (Run.id == run_id) if pack_key is None else (Run.job_id == job_id) & (Run.pack_key == pack_key)
    leader = aliased(Run)
    lead_claimable = exists().where(leader.id == run_id, _claimable(leader, now, max_attempts))
    rows = session.execute(
        update(Run)
        .where(same_pack, _claimable(Run, now, max_attempts), lead_claimable)
        .values(**_claim_values(worker, lease_seconds, now))
        .returning(Run.id, Run.attempt, Run.checkpoint_uri, Run.seed, Run.variant_index)
    ).all()
    session.commit()
    return [Claim(str(r[0]), int(r[1]), r[2]) for r in sorted(rows, key=lambda r: (r[3], r[4], r[0]))]


def _claimable(run: type[Run] | AliasedClass[Run], now: datetime, max_attempts: int) -> ColumnElement[bool]:
    """Queued, or running under a lease that expired with attempts left (its worker was lost)."""
    expired = (run.status == RunStatus.RUNNING) & (run.lease_expires_at < now) & (run.attempt < max_attempts)
    return (run.status == RunStatus.QUEUED) | expired


# --- renew and record progress -----------------------------------------------------------------------


def renew_leases(session: Session, claims: list[tuple[str, int]], lease_seconds: float) -> dict[str, bool | None]:
    """Extend the leases of several (run id, attempt) claims in one statement: each run's job cancel
    flag, or None for a run this attempt no longer holds."""
    out: dict[str, bool | None] = {run_id: None for run_id, _ in claims}
    if not claims:
        return out
    rows = session.execute(
        update(Run)
        .where(or_(*(_owned(run_id, attempt) for run_id, attempt in claims)))
        .values(lease_expires_at=_lease(lease_seconds))
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
        "lease_expires_at": _lease(lease_seconds),
    }
    if checkpoint_uri is not None:
        values["checkpoint_uri"] = checkpoint_uri
    if session.execute(update(Run).where(_owned(run_id, attempt)).values(**values).returning(Run.id)).first() is None:
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


# --- finish and release ------------------------------------------------------------------------------


def finish_run(
    session: Session,
    run_id: str,
    attempt: int,
    status: RunStatus,
    *,
    final_metrics: dict[str, Any] | None = None,
    error: str | None = None,
    steps: int | None = None,
    samples: int | None = None,
    wall_time_s: float | None = None,
    environment: dict[str, Any] | None = None,
    failure_class: FailureClass | None = None,
) -> bool:
    """Move the run to a terminal state if this attempt still holds it; False when it no longer does. A failed
    run's class defaults to `data`, a diverged run's is `divergence`."""
    if status not in TERMINAL:
        raise ValueError(f"finish_run needs a terminal status, not {status!r}")
    if failure_class is None:
        failure_class = {RunStatus.FAILED: FailureClass.DATA, RunStatus.DIVERGED: FailureClass.DIVERGENCE}.get(status)
    values: dict[str, Any] = {
        "status": status,
        "finished_at": utcnow(),
        "lease_expires_at": None,
        "error": error,
        "failure_class": failure_class,
    }
    for key, value in (
        ("final_metrics", final_metrics),
        ("steps_done", steps),
        ("samples_seen", samples),
        ("wall_time_s", wall_time_s),
        ("environment", environment),
    ):
        if value is not None:
            values[key] = value
    row = session.execute(update(Run).where(_owned(run_id, attempt)).values(**values).returning(Run.id)).first()
    session.commit()
    return row is not None


def release_run(session: Session, run_id: str, attempt: int, reason: str) -> bool:
    """Hand the run back to the queue (graceful shutdown); it resumes from its checkpoint.
    Marked published: the caller publishes it at once."""
    row = session.execute(
        update(Run)
        .where(_owned(run_id, attempt))
        .values(status=RunStatus.QUEUED, lease_expires_at=None, error=reason, **_published(utcnow()))
        .returning(Run.id)
    ).first()
    session.commit()
    return row is not None


# --- the reconciler's transitions (the caller commits) -----------------------------------------------


def requeue_expired(session: Session, max_attempts: int, now: datetime) -> Requeued:
    """Runs whose worker was lost (lease expired): back to the queue, marked published (the caller
    publishes them); failed once they used up `max_attempts`; cancelled if their job was, never queued again."""

    def move(where: ColumnElement[bool], **values: Any) -> list[str]:
        rows = session.execute(update(Run).where(where).values(lease_expires_at=None, **values).returning(Run.id))
        return [str(r[0]) for r in rows]

    # In this order: a cancelled job's run is cancelled before the attempt count is looked at.
    cancelled_jobs = select(Job.id).where(Job.cancel_requested)
    cancelled = move(
        _expired(now) & Run.job_id.in_(cancelled_jobs),
        status=RunStatus.CANCELLED,
        finished_at=now,
        error=CANCELLED_BY_USER,
    )
    failed = move(
        _expired(now) & (Run.attempt >= max_attempts),
        status=RunStatus.FAILED,
        finished_at=now,
        error=worker_lost(max_attempts),
        failure_class=FailureClass.INFRASTRUCTURE,
    )
    requeued = move(_expired(now) & (Run.attempt < max_attempts), status=RunStatus.QUEUED, **_published(now))
    return Requeued(cancelled, failed, requeued)


def _published(now: datetime) -> dict[str, Any]:
    return publishing.published(Run, now)


def mark_published(session: Session, run_ids: list[str], now: datetime) -> None:
    """Record tasks sent for these runs (the caller commits)."""
    publishing.mark_published(session, Run, run_ids, now)


def count_queued_published(session: Session) -> int:
    """Queued runs whose task was sent: how many tasks the broker's queue should hold for them."""
    return int(
        session.scalar(select(func.count()).where(Run.status == RunStatus.QUEUED, Run.published_at.is_not(None))) or 0
    )


def take_unpublished(session: Session, now: datetime, limit: int) -> list[str]:
    """Up to `limit` queued runs whose task was never sent, oldest first: marked published now (the caller
    commits, then publishes)."""
    return publishing.take_unpublished(session, Run, now, limit)


def take_stale(session: Session, now: datetime, after_seconds: float, max_seconds: float, limit: int) -> list[str]:
    """Up to `limit` queued runs due a republish, the longest waiting first: marked published now (the caller
    commits, then publishes)."""
    return publishing.take_stale(session, Run, now, after_seconds, max_seconds, limit)


# --- the user's transitions --------------------------------------------------------------------------


def cancel_queued(session: Session, job_ids: Iterable[str] | Select[str]) -> list[str]:
    """End the queued runs of these jobs (a list of ids or a query of them) as cancelled; the caller
    commits. Running runs stop on their own when their heartbeat sees the job's cancel flag."""
    rows = session.execute(
        update(Run)
        .where(Run.status == RunStatus.QUEUED, Run.job_id.in_(job_ids))
        .values(status=RunStatus.CANCELLED, finished_at=utcnow(), error=CANCELLED_BEFORE_START)
        .returning(Run.id)
    )
    return [str(r[0]) for r in rows]


def count_active(session: Session, job_id: str) -> int:
    """The job's queued and running runs."""
    return int(session.scalar(select(func.count()).where(Run.job_id == job_id, Run.status.in_(ACTIVE))) or 0)


def retryable_runs(session: Session, job_id: str) -> list[str]:
    """The job's failed and cancelled runs: what a retry would queue again."""
    return list(session.scalars(select(Run.id).where(Run.job_id == job_id, Run.status.in_(RETRYABLE))))


def resource_failures(session: Session, job_id: str) -> list[tuple[str, str | None]]:
    """The job's runs that failed out of memory (class `resource`): (run id, error)."""
    rows = session.execute(
        select(Run.id, Run.error).where(
            Run.job_id == job_id, Run.status == RunStatus.FAILED, Run.failure_class == FailureClass.RESOURCE
        )
    )
    return [(str(r[0]), r[1]) for r in rows]


# What a retried run forgets of its last attempt; its attempt count and checkpoint stay.
_LAST_ATTEMPT_FORGOTTEN = {"finished_at": None, "error": None, "failure_class": None, "lease_expires_at": None}


def retry_runs(session: Session, run_ids: list[str]) -> list[str]:
    """Queue failed or cancelled runs again, unpublished (the caller commits, then publishes); they keep
    their attempt count and checkpoint, so each resumes where it stopped."""
    rows = session.execute(
        update(Run)
        .where(Run.id.in_(run_ids), Run.status.in_(RETRYABLE))
        .values(status=RunStatus.QUEUED, published_at=None, **_LAST_ATTEMPT_FORGOTTEN)
        .returning(Run.id)
    )
    return [str(r[0]) for r in rows]
