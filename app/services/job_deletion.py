"""Deleting a job: its runs, their metric points and checkpoint files go with it, so the dataset it used can be
deleted too. Unfinished runs are cancelled first; nothing is deleted under a worker that still trains."""

from __future__ import annotations

import logging

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.core.run_states import RunStatus
from app.errors import Conflict
from app.repositories import runs as run_repo
from app.services.jobs import get_job
from app.storage import Storage
from app.tables import Job, MetricPoint, Run, utcnow

log = logging.getLogger(__name__)


def delete_job(session: Session, storage: Storage, owner: str, job_id: str) -> None:
    """Delete the owner's job (another owner's is a 404), or cancel it and answer 409 while runs still train.

    Cancellation is cooperative: a running run sees its job's flag at its next heartbeat and stops within
    seconds. Until then its worker would keep writing progress and checkpoints, so the job is not deleted
    under it: its queued runs are cancelled, the job is flagged, and the caller is told to come back (the CLI
    waits). A run whose lease expired has no live worker (or one that lost its claim): it is deleted with the
    rest, and any late write of that worker matches no row, since every worker write is fenced by run and attempt.

    The job row, then its runs, are locked first (in id order) so no worker claims or renews a run between
    the check and the delete; checkpoint files are removed after the commit, so a failed delete loses nothing.
    """
    job = get_job(session, owner, job_id)
    session.execute(select(Job.id).where(Job.id == job.id).with_for_update())
    session.execute(select(Run.id).where(Run.job_id == job.id).order_by(Run.id).with_for_update())
    live = int(
        session.scalar(
            select(func.count()).where(
                Run.job_id == job.id, Run.status == RunStatus.RUNNING, Run.lease_expires_at >= utcnow()
            )
        )
        or 0
    )
    if live:
        job.cancel_requested = True
        run_repo.cancel_queued(session, [job.id])
        session.commit()
        raise Conflict(
            f"job '{job.id}' still has {live} running run(s); they have been asked to stop and do so within "
            f"seconds (its queued runs are cancelled): DELETE it again once GET /v1/jobs/{job.id} shows no running "
            "runs (`normbench jobs rm JOB` waits by itself)"
        )
    uris = [uri for uri in session.scalars(select(Run.checkpoint_uri).where(Run.job_id == job.id)) if uri]
    run_ids = select(Run.id).where(Run.job_id == job.id).scalar_subquery()
    session.execute(delete(MetricPoint).where(MetricPoint.run_id.in_(run_ids)))
    session.execute(delete(Run).where(Run.job_id == job.id))
    session.execute(delete(Job).where(Job.id == job.id))
    session.commit()
    for uri in uris:
        try:
            storage.delete(uri)
        except Exception:  # the rows are gone already; a file left behind is only space
            log.exception("could not delete checkpoint %s of deleted job %s", uri, job.id)
