"""Per-owner quotas: stored bytes (datasets and weights together) and jobs in flight (429 with the limit and
what to do).

The per-job ceilings (runs per job, samples trained per job, epochs) are checked with the spec in
`app.services.jobs` and answer 422, since they are about the spec, not about the account.

Each check first takes a per-owner transaction-scoped lock on Postgres (`pg_advisory_xact_lock`), so
the count and the insert that follows it in the same transaction cannot interleave with another
request of the same owner; the lock is released by the commit (or rollback) of that transaction.
SQLite serialises writers on its own.
"""

from __future__ import annotations

from sqlalchemy import func, select, text
from sqlalchemy.orm import Session

from app.config import Settings
from app.core.run_states import ACTIVE
from app.core.units import human_bytes
from app.errors import QuotaExceeded
from app.tables import Dataset, Job, Run, Weights


def lock_owner(session: Session, owner: str, what: str) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(hashtext(:key))"), {"key": f"normbench:{what}:{owner}"})


def dataset_bytes_used(session: Session, owner: str) -> int:
    """Bytes counted against the owner's storage quota: their datasets and their weights."""
    datasets = session.scalar(select(func.coalesce(func.sum(Dataset.size_bytes), 0)).where(Dataset.owner == owner))
    weights = session.scalar(select(func.coalesce(func.sum(Weights.size_bytes), 0)).where(Weights.owner == owner))
    return int(datasets or 0) + int(weights or 0)


def check_dataset_bytes(
    session: Session, settings: Settings, owner: str, new_bytes: int, what: str = "this dataset"
) -> None:
    """Call inside the transaction that inserts the dataset (or weights) row."""
    limit = settings.max_dataset_bytes_per_owner
    lock_owner(session, owner, "datasets")  # one lock for both: they share the quota
    used = dataset_bytes_used(session, owner)
    if used + new_bytes > limit:
        raise QuotaExceeded(
            f"storing {what} ({human_bytes(new_bytes)}) would bring your datasets and weights to "
            f"{human_bytes(used + new_bytes)}, over your quota of {human_bytes(limit)} "
            "(NORMBENCH_MAX_DATASET_BYTES_PER_OWNER); " + what_to_delete(session, owner)
        )


def refuse_when_full(session: Session, settings: Settings, owner: str, what: str) -> None:
    """A cheap early answer before an upload is read: the owner's storage quota is used up already (`what`: what
    counts, for the message). The exact check, under the owner's lock, is check_dataset_bytes."""
    used = dataset_bytes_used(session, owner)
    if used >= settings.max_dataset_bytes_per_owner:
        raise QuotaExceeded(
            f"your {what} already use {human_bytes(used)}, your quota is "
            f"{human_bytes(settings.max_dataset_bytes_per_owner)} (NORMBENCH_MAX_DATASET_BYTES_PER_OWNER); "
            + what_to_delete(session, owner)
        )


def what_to_delete(session: Session, owner: str, shown: int = 3) -> str:
    """The end of a dataset-quota 429: the owner's largest datasets, and how to free one that jobs still use."""
    rows = session.execute(
        select(Dataset.id, Dataset.name, Dataset.size_bytes, func.count(Job.id))
        .outerjoin(Job, Job.dataset_id == Dataset.id)
        .where(Dataset.owner == owner)
        .group_by(Dataset.id, Dataset.name, Dataset.size_bytes)
        .order_by(Dataset.size_bytes.desc(), Dataset.id)
        .limit(shown)
    ).all()
    largest = ", ".join(
        f"{name!r} ({dataset_id}, {human_bytes(size)}{f', used by {jobs} job(s)' if jobs else ''})"
        for dataset_id, name, size, jobs in rows
    )
    return (
        (f"your largest datasets: {largest}. " if largest else "")
        + "Delete datasets you no longer need (DELETE /v1/datasets/{id}); one that jobs use can be deleted once "
        "those jobs are (DELETE /v1/jobs/{id} also deletes their runs, metrics and checkpoints). Uploaded weights "
        "count too (GET /v1/weights, DELETE /v1/weights/{id})"
    )


def active_jobs(session: Session, owner: str) -> int:
    stmt = select(func.count(func.distinct(Run.job_id))).where(Run.owner == owner, Run.status.in_(ACTIVE))
    return int(session.scalar(stmt) or 0)


def check_active_jobs(session: Session, settings: Settings, owner: str) -> None:
    """Call in the session (transaction) that will insert the job."""
    limit = settings.max_active_jobs_per_owner
    lock_owner(session, owner, "jobs")
    n = active_jobs(session, owner)
    if n >= limit:
        raise QuotaExceeded(
            f"you have {n} jobs with queued or running runs; the limit is {limit} at a time "
            "(NORMBENCH_MAX_ACTIVE_JOBS_PER_OWNER): wait for one to finish, cancel one (POST /v1/jobs/{id}/cancel) "
            "or delete one you no longer need (DELETE /v1/jobs/{id})"
        )
