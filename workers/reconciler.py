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

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.config import Settings
from app.db import session_scope
from app.repositories import runs
from app.tables import Job, utcnow

log = logging.getLogger(__name__)
Publish = Callable[[str], None]


def reconcile_once(session: Session, settings: Settings, publish: Publish) -> dict[str, int]:
    """One round of repairs, committed before anything is published; returns what it did, by kind."""
    now = utcnow()
    cancelled = runs.cancel_queued(session, select(Job.id).where(Job.cancel_requested))
    lost = runs.requeue_expired(session, settings.max_attempts, now)
    unpublished = runs.take_unpublished(session, now - timedelta(seconds=settings.republish_after_seconds), now)
    session.commit()
    to_publish = lost.requeued + unpublished
    for run_id in to_publish:
        publish(run_id)
    counts = {
        "cancelled": len(cancelled) + len(lost.cancelled),
        "failed": len(lost.failed),
        "requeued": len(lost.requeued),
        "published": len(to_publish),
    }
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
