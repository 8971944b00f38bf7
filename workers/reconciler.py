"""The reconciler: Postgres is the referee, so it repairs whatever the broker or a dead worker lost.

- queued runs never published (the API died between commit and publish), or published long ago
  (the broker lost its messages), are published again; a duplicate task finds nothing to claim;
- running runs whose lease expired (the worker died or froze) go back to the queue, or fail once
  they used up `max_attempts`;
- queued runs of cancelled jobs are cancelled.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import session_scope
from app.tables import Job, Run, utcnow

log = logging.getLogger(__name__)
Publish = Callable[[str], None]


def reconcile_once(session: Session, settings: Settings, publish: Publish) -> dict[str, int]:
    now = utcnow()
    counts = {"cancelled": 0, "failed": 0, "requeued": 0, "published": 0}
    cancelled_jobs = select(Job.id).where(Job.cancel_requested)

    cancelled = session.execute(
        update(Run)
        .where(Run.status == "queued", Run.job_id.in_(cancelled_jobs))
        .values(status="cancelled", finished_at=now, error="cancelled by user before it started")
        .returning(Run.id)
    ).all()

    expired = (Run.status == "running") & (Run.lease_expires_at < now)
    # A lost worker's run in a cancelled job ends cancelled, never back in the queue.
    cancelled = [
        *cancelled,
        *session.execute(
            update(Run)
            .where(expired, Run.job_id.in_(cancelled_jobs))
            .values(status="cancelled", finished_at=now, lease_expires_at=None, error="cancelled by user")
            .returning(Run.id)
        ).all(),
    ]
    counts["cancelled"] = len(cancelled)
    failed = session.execute(
        update(Run)
        .where(expired, Run.attempt >= settings.max_attempts)
        .values(
            status="failed",
            finished_at=now,
            lease_expires_at=None,
            error=f"the worker was lost (killed, out of memory or unreachable) on all {settings.max_attempts} attempts",
        )
        .returning(Run.id)
    ).all()
    counts["failed"] = len(failed)
    requeued = session.execute(
        update(Run)
        .where(expired, Run.attempt < settings.max_attempts)
        .values(status="queued", lease_expires_at=None, published_at=now)
        .returning(Run.id)
    ).all()
    counts["requeued"] = len(requeued)

    stale = now - timedelta(seconds=settings.republish_after_seconds)
    unpublished = session.execute(
        update(Run)
        .where(Run.status == "queued", (Run.published_at.is_(None)) | (Run.published_at < stale))
        .values(published_at=now)
        .returning(Run.id)
    ).all()
    session.commit()
    to_publish = [r[0] for r in requeued] + [r[0] for r in unpublished]
    for run_id in to_publish:
        publish(run_id)
    counts["published"] = len(to_publish)
    if any(counts.values()):
        log.warning("reconciler: %s", counts)
    return counts


class ReconcilerThread(threading.Thread):
    """Runs `reconcile_once` every `reconcile_seconds` inside a worker process."""

    def __init__(self, settings: Settings, publish: Publish) -> None:
        super().__init__(name="normbench-reconciler", daemon=True)
        self.settings, self.publish = settings, publish
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.settings.reconcile_seconds):
            try:
                with session_scope(self.settings.resolved_database_url) as session:
                    reconcile_once(session, self.settings, self.publish)
            except Exception:  # the database or broker is down: try again next round
                log.exception("reconciler round failed")
